r"""Expands a grid of ml_collections overrides into training runs.

    python launch/sweep.py --config=configs/base.py --workdir_root=workdirs/sweep \
        --grid 'model.connector.method=parcel,m3,mqt,none' --grid 'seed=0,1,2' \
        [--set train.num_steps=2000] [--preset=reproduction] [--dry-run] \
        [--launcher=local|tpu_pod|slurm] [--launcher_args='--tpu=pod --zone=z']

Runs are (preset variants) x (cartesian product of the grids), each with the --set
overrides; a run's workdir is WORKDIR_ROOT/<swept key=value,...>, e.g.
``method=parcel,seed=1``. Every key is checked against the config (and every run's
overrides parsed by ml_collections, as train would) before anything is launched; an
unknown key or a bad value exits with status 2.

Grid values are separated by commas, or by ``|`` when any is present; a tuple-valued
field (e.g. ``model.connector.budgets``) only splits on ``|``, so its values keep their
commas: ``--grid 'model.connector.budgets=16,|64,'``.

A ``{key}`` in a --set value is replaced by each run's value of that swept key, so that
stage-2 runs find the shared stage 1 of their seed (the paper's two-stage recipe)::

    python launch/sweep.py --workdir_root=w/stage1 --grid 'seed=0,1,2' \
        --set model.connector.method=none
    python launch/sweep.py --workdir_root=w/stage2 --preset=reproduction \
        --set 'init.stage1_workdir=w/stage1/seed={seed}'

Launchers: ``local`` runs the commands one after another and skips runs whose workdir
already holds ``eval.json`` (rerunning an interrupted sweep resumes it; train itself
resumes a half-finished run from its checkpoint); with ``--parallel=N`` it keeps N runs
going, each pinned to its own CPU with one XLA thread (on a small CPU machine N one-core
runs finish sooner than N runs one after another on all cores: small models scale
poorly across threads) and logging to WORKDIR_ROOT/<name>.log; ``slurm`` submits one
``launch/slurm.sbatch`` job per run (same skip, for a workdir visible from here);
``tpu_pod`` runs ``launch/tpu_pod.sh`` per run, one after another (no skip: the workdir
is usually on GCS; train resumes or re-evaluates). ``--dry-run`` prints one shell command
per line instead, for the runs that would be launched.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

from absl import flags
import ml_collections
from ml_collections import config_flags

# Presets are data: `variants` (each a dict of overrides) x product of `grid` (key ->
# values), plus `set` on every run. Values are written as on the command line.
PRESETS = {
    "reproduction": {
        "help": "paper table: PARCEL, M3, MQT, no connector, and M3 pooling specialists "
                "at 16 and 64 tokens, 3 seeds each (18 runs)",
        "variants": [
            {"model.connector.method": "parcel"},
            {"model.connector.method": "m3"},
            {"model.connector.method": "mqt"},
            {"model.connector.method": "none"},
            {"model.connector.method": "m3", "model.connector.budgets": "16,"},
            {"model.connector.method": "m3", "model.connector.budgets": "64,"},
        ],
        "grid": {"seed": ["0", "1", "2"]},
        "set": {},
    },
    "ablations": {
        "help": "PARCEL routing and conditioning ablations, 3 seeds each (12 runs)",
        "variants": [
            {"model.connector.routing": "fixed4x4"},
            {"model.connector.routing": "fixed2x2"},
            {"model.connector.conditioning": "none"},
            {"model.connector.conditioning": "dual_cross"},
        ],
        "grid": {"seed": ["0", "1", "2"]},
        "set": {"model.connector.method": "parcel"},
    },
    "study": {
        "help": "the whole comparison, meant as stage 2 of shared stage-1 runs (--set "
                "'init.stage1_workdir=ROOT/stage1/seed={seed}'): no connector, PARCEL, M3 (one "
                "scale per batch, and all scales per step), MQT (content+pos and pos_only keys), "
                "the paper's ablations, M3 / MQT + self-attention, pooling specialists at 16 and "
                "64 and image downsampling, 3 seeds each (45 runs)",
        "variants": [
            {"model.connector.method": "none"},
            {"model.connector.method": "parcel"},
            {"model.connector.method": "m3"},
            {"model.connector.method": "m3", "budget.sampling": "all_scales"},
            {"model.connector.method": "mqt"},
            {"model.connector.method": "mqt", "model.connector.key_mode": "pos_only"},
            {"model.connector.method": "parcel", "model.connector.routing": "fixed4x4"},
            {"model.connector.method": "parcel", "model.connector.routing": "fixed2x2"},
            {"model.connector.method": "parcel", "model.connector.conditioning": "none"},
            {"model.connector.method": "parcel", "model.connector.conditioning": "dual_cross"},
            {"model.connector.method": "m3", "model.connector.extra_self_attn": "True"},
            {"model.connector.method": "mqt", "model.connector.extra_self_attn": "True"},
            {"model.connector.method": "m3", "model.connector.budgets": "16,"},
            {"model.connector.method": "m3", "model.connector.budgets": "64,"},
            {"model.connector.method": "downsample"},
        ],
        "grid": {"seed": ["0", "1", "2"]},
        "set": {},
    },
}

LAUNCHERS = ("local", "tpu_pod", "slurm")
HERE = os.path.dirname(os.path.abspath(__file__))
DONE_FILE = "eval.json"


class SweepError(Exception):
  """A problem with the sweep's arguments; reported with exit status 2."""


# ------------------------------------------------------------------------ config

def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads ``spec`` (``path[:arg]``) and applies ``--config.k=v`` flags, exactly as train does."""
  argv = ["sweep", f"--config={spec}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out += leaf_paths(v, f"{prefix}{k}.")
    else:
      out.append(prefix + k)
  return out


def field_value(config: ml_collections.ConfigDict, key: str, origin: str):
  """The config's value at dotted ``key``; SweepError naming the key when it is not a field."""
  node = config
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      close = difflib.get_close_matches(key, leaf_paths(config), n=1, cutoff=0.8)
      hint = f"; did you mean {' or '.join(close)}?" if close else ""
      raise SweepError(f"unknown config key '{key}' (in {origin}){hint}")
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    raise SweepError(f"config key '{key}' (in {origin}) is a section, not a field; "
                     f"override its fields, e.g. {(leaf_paths(node, key + '.') or ['...'])[0]}")
  return node


# ------------------------------------------------------------------------- runs

def parse_assignment(text: str, origin: str) -> tuple[str, str]:
  key, sep, value = text.partition("=")
  key = key.strip()
  if key.startswith("config."):
    key = key[len("config."):]
  if not sep or not key:
    raise SweepError(f"{origin} {text!r} is not KEY=VALUE")
  return key, value


def split_values(key: str, text: str, is_tuple: bool) -> list[str]:
  if "|" in text:
    values = text.split("|")
  elif is_tuple:
    values = [text]
  else:
    values = text.split(",")
  if any(v == "" for v in values):
    raise SweepError(f"--grid {key}={text!r} has an empty value")
  return values


def sanitize(value: str) -> str:
  """A value as it appears in a workdir name: ``16,`` -> ``16``, ``(16, 64)`` -> ``16-64``."""
  v = value.strip()
  if len(v) >= 2 and v[0] in "([" and v[-1] in ")]":
    v = v[1:-1]
  v = v.strip().rstrip(",")
  v = re.sub(r"\s*,\s*", "-", v)
  v = re.sub(r"[^A-Za-z0-9._+-]", "_", v)
  return v or "empty"


def short_labels(keys: Sequence[str]) -> dict[str, str]:
  """Shortest dotted suffix of each key that no other swept key shares."""
  labels = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      label = ".".join(parts[-n:])
      if not any(o != key and (o == label or o.endswith("." + label)) for o in keys):
        break
    labels[key] = label
  return labels


def fill_template(value: str, point: dict[str, str], labels: dict[str, str], key: str) -> str:
  """``{k}`` in a --set value becomes this run's value of swept key ``k`` (full or short
  label), as it appears in workdir names: ``init.stage1_workdir=w/stage1/seed={seed}`` points
  every run at the stage 1 of its own seed."""
  def sub(match):
    name = match.group(1)
    for k, v in point.items():
      if name in (k, labels.get(k)):
        return sanitize(v)
    raise SweepError(f"--set {key}={value!r}: {{{name}}} names no swept key of this run "
                     f"(swept: {', '.join(labels.get(k, k) for k in point) or 'none'})")
  return re.sub(r"\{([A-Za-z0-9_.]+)\}", sub, value)


def expand(preset: dict | None, grid: dict[str, list[str]], fixed: dict[str, str]):
  """Returns [(name, {key: value})] in a deterministic order."""
  variants = list(preset["variants"]) if preset else [{}]
  full_grid = dict(preset["grid"]) if preset else {}
  full_grid.update(grid)
  base = dict(preset.get("set", {})) if preset else {}
  base.update(fixed)

  swept = []
  for v in variants:
    swept += [k for k in v if k not in swept]
  swept += [k for k in full_grid if k not in swept]
  for key in base:
    if key in swept:
      raise SweepError(f"config key '{key}' is both swept and set to one value (--set)")
  labels = short_labels(swept)

  runs = []
  for variant in variants:
    for combo in itertools.product(*full_grid.values()):
      point = {**variant, **dict(zip(full_grid, combo))}
      name = ",".join(f"{labels[k]}={sanitize(point[k])}" for k in swept if k in point) or "run"
      fixed_here = {k: fill_template(v, point, labels, k) for k, v in base.items()}
      runs.append((name, {**fixed_here, **point}))
  names = [n for n, _ in runs]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise SweepError(f"runs share a workdir name: {', '.join(dupes)} (repeated grid values?)")
  return runs


# --------------------------------------------------------------------- commands

def _rel(path: str) -> str:
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel


def command(launcher: str, args, name: str, overrides: dict[str, str]) -> list[str]:
  workdir = f"{args.workdir_root.rstrip('/')}/{name}"
  flags_ = [f"--config.{k}={v}" for k, v in overrides.items()]
  extra = shlex.split(args.launcher_args)
  if launcher == "local":
    return [*shlex.split(args.python), "-m", "parcel_jax.train", f"--config={args.config}",
            f"--workdir={workdir}", *flags_]
  if launcher == "tpu_pod":
    return ["bash", _rel(os.path.join(HERE, "tpu_pod.sh")), *extra, f"--config={args.config}",
            f"--workdir={workdir}", "--", *flags_]
  if launcher == "slurm":
    env = [f"CONFIG={args.config}", f"WORKDIR={workdir}"]
    if args.python != "python":
      env.append(f"PYTHON={args.python}")
    return ["env", *env, "sbatch", f"--job-name=parcel:{name}", *extra,
            _rel(os.path.join(HERE, "slurm.sbatch")), *flags_]
  raise ValueError(launcher)


def finished(launcher: str, workdir: str) -> bool:
  return launcher in ("local", "slurm") and os.path.exists(os.path.join(workdir, DONE_FILE))


# --------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="sweep.py", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="presets:\n" + "\n".join(f"  {k}: {v['help']}" for k, v in PRESETS.items()))
  p.add_argument("--config", default="configs/base.py", help="config spec, path[:arg]")
  p.add_argument("--workdir_root", "--workdir-root", required=True,
                 help="parent of the runs' workdirs (local path or gs://)")
  p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                 help="sweep KEY over values (repeatable; product over all grids)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override on every run (repeatable)")
  p.add_argument("--preset", choices=sorted(PRESETS), help="named sweep, see below")
  p.add_argument("--launcher", choices=LAUNCHERS, default="local")
  p.add_argument("--launcher_args", "--launcher-args", default="",
                 help="extra arguments for tpu_pod.sh (e.g. '--tpu=pod --zone=z') or sbatch")
  p.add_argument("--python", default="python",
                 help="interpreter command for local runs (and PYTHON for slurm)")
  p.add_argument("--parallel", type=int, default=1, metavar="N",
                 help="local launcher: N runs at a time, each pinned to one CPU with one XLA "
                      "thread, output in WORKDIR_ROOT/<name>.log (default 1: one after another, "
                      "output to the terminal)")
  p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                 help="print the commands, one per line, instead of running them")
  return p


def plan(args) -> list[tuple[str, list[str], str]]:
  """Validates everything and returns [(name, command, workdir)]."""
  try:
    base = load_config(args.config)
  except Exception as e:  # noqa: BLE001 -- any load failure is a usage error here
    raise SweepError(f"cannot load --config={args.config}: {e}") from e

  grid: dict[str, list[str]] = {}
  for text in args.grid:
    key, values = parse_assignment(text, "--grid")
    is_tuple = isinstance(field_value(base, key, f"--grid {text}"), tuple)
    grid[key] = split_values(key, values, is_tuple)
  fixed = {}
  for text in args.set:
    key, value = parse_assignment(text, "--set")
    field_value(base, key, f"--set {text}")
    fixed[key] = value
  preset = PRESETS[args.preset] if args.preset else None
  if preset:
    for part in (*preset["variants"], preset["grid"], preset.get("set", {})):
      for key in part:
        field_value(base, key, f"preset {args.preset}")

  out = []
  for name, overrides in expand(preset, grid, fixed):
    cmd_flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    try:
      load_config(args.config, cmd_flags)
    except Exception as e:  # noqa: BLE001
      raise SweepError(f"run {name}: {e}") from e
    workdir = f"{args.workdir_root.rstrip('/')}/{name}"
    out.append((name, command(args.launcher, args, name, overrides), workdir))
  return out


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    runs = plan(args)
  except SweepError as e:
    print(f"sweep.py: error: {e}", file=sys.stderr)
    return 2

  todo = []
  for name, cmd, workdir in runs:
    if finished(args.launcher, workdir):
      print(f"# skip {name}: {os.path.join(workdir, DONE_FILE)} exists", file=sys.stderr)
    else:
      todo.append((name, cmd))
  if args.dry_run:
    try:
      for _, cmd in todo:
        print(shlex.join(cmd))
      sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0

  if args.parallel > 1:
    if args.launcher != "local":
      print("sweep.py: error: --parallel needs --launcher=local", file=sys.stderr)
      return 2
    return run_parallel(todo, args.parallel, args.workdir_root)
  print(f"# {len(todo)} of {len(runs)} runs to launch ({args.launcher})", file=sys.stderr)
  for i, (name, cmd) in enumerate(todo, 1):
    print(f"# [{i}/{len(todo)}] {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    try:
      rc = subprocess.run(cmd, check=False).returncode
    except FileNotFoundError as e:
      print(f"sweep.py: error: cannot run {cmd[0]!r}: {e}", file=sys.stderr)
      return 2
    if rc:
      print(f"sweep.py: run {name} exited with status {rc}; stopping "
            "(rerun the same command to resume)", file=sys.stderr)
      return rc
  return 0


ONE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def run_parallel(todo: list[tuple[str, list[str]]], parallel: int, workdir_root: str) -> int:
  """Runs ``todo`` with at most ``parallel`` at once, each on its own CPU. After a failure
  no new run starts; the ones going finish (their checkpoints stay whole), then the first
  failure's status is returned."""
  cpus = sorted(os.sched_getaffinity(0))
  if parallel > len(cpus):
    print(f"sweep.py: error: --parallel={parallel} exceeds the {len(cpus)} CPUs this process "
          "may use", file=sys.stderr)
    return 2
  env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD_XLA}".strip()}
  os.makedirs(workdir_root, exist_ok=True)
  free = cpus[:parallel]
  going: dict[subprocess.Popen, tuple[str, int, object]] = {}
  queue = list(todo)
  failure = 0
  print(f"# {len(todo)} runs to launch, {parallel} at a time (local)", file=sys.stderr)
  while queue or going:
    while queue and free and not failure:
      name, cmd = queue.pop(0)
      cpu = free.pop(0)
      log_path = os.path.join(workdir_root, f"{name}.log")
      log = open(log_path, "w")  # noqa: SIM115 -- closed when the run ends
      print(f"# start {name} on CPU {cpu} (log {log_path}): {shlex.join(cmd)}",
            file=sys.stderr, flush=True)
      try:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=lambda c=cpu: os.sched_setaffinity(0, {c}))
      except (FileNotFoundError, subprocess.SubprocessError) as e:
        log.close()
        print(f"sweep.py: error: cannot run {cmd[0]!r}: {e}", file=sys.stderr)
        failure, queue = failure or 2, []
        free.append(cpu)
        continue
      going[proc] = (name, cpu, log)
    if not going:
      break
    pid, status = os.wait()
    proc = next(p for p in going if p.pid == pid)
    proc.returncode = os.waitstatus_to_exitcode(status)
    name, cpu, log = going.pop(proc)
    log.close()
    free.append(cpu)
    if proc.returncode:
      print(f"sweep.py: run {name} exited with status {proc.returncode} (log "
            f"{os.path.join(workdir_root, name + '.log')}); no new runs start (rerun the same "
            "command to resume)", file=sys.stderr, flush=True)
      failure = failure or proc.returncode
      queue = []
    else:
      print(f"# done {name}", file=sys.stderr, flush=True)
  return failure

if __name__ == "__main__":
  sys.exit(main())
