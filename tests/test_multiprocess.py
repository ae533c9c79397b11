"""Two JAX processes on localhost (gloo CPU collectives) == one process, end to end.

``python -m parcel_jax.train`` runs three times at once: once alone, and as processes
0 and 1 of a two-process job (``--coordinator_address/--num_processes/--process_id``)
with the same global batch. The two-process job stops at step 2 and is restarted, so
Orbax multi-process save *and* restore (every process calls both) and the per-process
Grain iterator checkpoints are on the path. Per-example budgets are on, so a wrong
assignment of budgets to the rows of each process would change the loss.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 3
TIMEOUT_S = 240

TINY = {
    "model.vision.image_size": 32, "model.vision.patch_size": 2, "model.vision.width": 32,
    "model.vision.depth": 1, "model.vision.mlp_dim": 64, "model.vision.num_heads": 2,
    "model.connector.num_heads": 2, "model.connector.mlp_dim": 64,
    "model.connector.budgets": "18,30",
    "model.decoder.width": 32, "model.decoder.depth": 1, "model.decoder.mlp_dim": 64,
    "model.decoder.num_heads": 2, "model.decoder.num_kv_heads": 2, "model.decoder.head_dim": 16,
    "budget.sampling": "per_example",
    "data.num_threads": 0,
    "train.batch_size": 8, "train.num_steps": NUM_STEPS, "train.log_every": 1,
    "train.checkpoint_every": 1000,
    "optim.warmup_steps": 0,
    "eval.budgets": "18,", "eval.batch_size": 8, "eval.num_examples": 12,
}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_cmd(workdir, *extra) -> list[str]:
  return [sys.executable, "-m", "parcel_jax.train", "--config=configs/base.py",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in TINY.items()), *extra]


def launch(cmds, logs_dir, tag):
  # Cache every program (the default skips those compiling in under a second).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  procs = []
  for i, cmd in enumerate(cmds):
    log = open(os.path.join(logs_dir, f"{tag}_{i}.log"), "w")
    procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  return procs


def wait(procs):
  """Waits for all; kills the rest if one fails or time runs out (a hung collective)."""
  try:
    for p, _ in procs:
      p.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
      log.close()
  codes = [p.returncode for p, _ in procs]
  if any(codes):
    tails = []
    for p, log in procs:
      with open(log.name) as f:
        tails.append(f"--- {log.name} (exit {p.returncode}):\n" + "".join(f.readlines()[-25:]))
    raise AssertionError(f"exit codes {codes}\n" + "\n".join(tails))


def two_process_cmds(workdir, *extra):
  port = free_port()
  return [train_cmd(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                    f"--process_id={i}", *extra) for i in range(2)]


def restore_params(workdir, step):
  """Checkpointed params as numpy, whatever mesh or process count wrote them."""
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return state["params"]


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def rel(a, e) -> float:
  a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
  return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def test_two_processes_match_one(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  # The two-process job uses the persistent compilation cache: its second leg reuses
  # the first leg's programs.
  cache = str(tmp_path / "jax_cache")
  two_flags = [f"--config.train.compilation_cache_dir={cache}"]
  # One process (to the end) and the first leg of the two-process job, concurrently.
  procs = launch([train_cmd(one)], str(tmp_path), "one")
  procs += launch(two_process_cmds(two, f"--config.train.stop_at={NUM_STEPS - 1}", *two_flags),
                  str(tmp_path), "two_a")
  wait(procs)
  assert os.listdir(cache)  # compilation_cache_dir is wired
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == [str(NUM_STEPS - 1)]
  # Each process checkpointed its own Grain iterator.
  data_dir = os.path.join(two, "checkpoints", str(NUM_STEPS - 1), "data")
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
  # Second leg: both processes restore step 2 and finish (final eval included).
  wait(launch(two_process_cmds(two, *two_flags), str(tmp_path), "two_b"))

  # Parameters after the last step.
  p1, p2 = restore_params(one, NUM_STEPS), restore_params(two, NUM_STEPS)
  flat1 = jax.tree_util.tree_leaves_with_path(p1)
  flat2 = jax.tree.leaves(p2)
  assert len(flat1) == len(flat2)
  whole = float(np.sqrt(sum(np.sum((np.float64(a) - np.float64(b)) ** 2)
                            for (_, a), b in zip(flat1, flat2))
                        / sum(np.sum(np.float64(a) ** 2) for _, a in flat1)))
  print(f"two processes vs one after {NUM_STEPS} steps: params rel. error {whole:.1e}")
  assert whole <= 1e-5

  # Metrics: written once (process 0), one record per step, same losses.
  m1, m2 = read_jsonl(os.path.join(one, "metrics.jsonl")), read_jsonl(os.path.join(two, "metrics.jsonl"))
  assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, NUM_STEPS + 1))
  losses = [rel(b["loss"], a["loss"]) for a, b in zip(m1, m2)]
  print("per-step loss rel. errors:", ", ".join(f"{e:.1e}" for e in losses))
  assert max(losses) <= 1e-5
  assert [r["budget"] for r in m1] == [r["budget"] for r in m2]

  # Final evaluation: every process evaluates its share; process 0 writes the same result.
  with open(os.path.join(one, "eval.json")) as f:
    e1 = json.load(f)
  with open(os.path.join(two, "eval.json")) as f:
    e2 = json.load(f)
  assert e1["num_examples"] == e2["num_examples"] == TINY["eval.num_examples"]
  assert e1["budgets"] == e2["budgets"]
  for b, row in e1["token_metrics"].items():
    for k, v in row.items():
      assert rel(e2["token_metrics"][b][k], v) <= 1e-5, (b, k, v, e2["token_metrics"][b][k])
