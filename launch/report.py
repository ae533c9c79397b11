r"""Summarises a sweep: exact match per variant, budget and task family, over seeds.

    python -m launch.report --root=workdirs/sweep --out=docs/sweep_report \
        [--reference=method=none]

finds every run under ROOT, i.e. every directory holding the ``eval.json`` that
``parcel_jax.train`` writes when a run ends (the workdirs ``launch/sweep.py`` creates,
``ROOT/<swept key=value,...>``). A run's variant is its directory name without the
``seed=...`` part (``method=m3,budgets=16,seed=1`` -> ``method=m3,budgets=16``); runs in
subdirectories of ROOT get the subdirectory as a prefix (``ablations/routing=fixed4x4``).
Runs that have a checkpoint but no ``eval.json`` yet are listed as unfinished.

For every variant, budget and task family (and ``overall``) it computes the mean and
sample standard deviation (ddof=1; none for one seed) of the exact match over seeds,
and n, the number of seeds that have the budget. Seeds that the other variants have
and a variant lacks are reported as missing. Retention = 100 x mean score / mean score
of the reference variant (default: the one with method ``none``, at its single
budget), per family and budget, as ``parcel_jax.evaluate`` computes it for single runs.

Where a run still has its checkpoints, the config saved with them labels the variant
(method, specialist budgets) and checks that all runs saw the same eval stream.

Writes OUT/summary.json (scores as in eval.json, in [0, 1]; retention in %),
OUT/summary.md (one table per budget, ``mean ± std`` in %, and a retention table; also
printed), OUT/pareto.png (overall exact match vs budget, one line per variant with std
error bars, log2 budget axis) and OUT/families.png (the same per task family). OUT
defaults to ROOT/report. No run under ROOT: exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

import ml_collections
import numpy as np

from parcel_jax import budgets as budgets_lib
from parcel_jax import evaluation as evaluate_lib
from parcel_jax import runs as runs_lib
from parcel_jax.data import synthetic

DONE_FILE = "eval.json"  # as launch/sweep.py: written by train when a run ends
SEED_KEY = "seed"
OVERALL = "overall"


class ReportError(Exception):
  """A problem with the arguments or the root; reported with exit status 2."""


# ------------------------------------------------------------------------- runs

def parse_name(name: str) -> tuple[str, int | str | None]:
  """``method=m3,budgets=16,seed=1`` -> (``method=m3,budgets=16``, 1). Names are
  sweep.py's ``key=value`` parts joined by commas (values never hold commas)."""
  parts, seed = [], None
  for part in name.split(","):
    key, sep, value = part.partition("=")
    if sep and key == SEED_KEY:
      seed = int(value) if value.lstrip("-").isdigit() else value
    else:
      parts.append(part)
  return ",".join(parts) or "run", seed


def _seed_order(seed):
  return (isinstance(seed, str), seed)


def _read_config(path: str, warnings: list[str]) -> dict | None:
  """The config saved with the run's latest checkpoint, or None (no or unreadable checkpoints)."""
  if not os.path.isdir(runs_lib.checkpoint_dir(path)):
    return None
  try:
    return runs_lib.saved_config(path)[1]
  except Exception as e:  # noqa: BLE001 -- the config only labels and checks; go on without it
    warnings.append(f"{path}: cannot read the saved config ({type(e).__name__}: {e})")
    return None


def find_runs(root: str) -> tuple[list[dict], list[dict], list[str]]:
  """Every run directory under ``root``: (finished runs, unfinished runs, warnings).

  A run is ``{"name", "path", "variant", "seed", "eval" (the eval.json dict), "config"
  (saved config dict or None)}``; an unfinished one has no ``eval``.
  """
  if not os.path.isdir(root):
    raise ReportError(f"--root={root} is not a directory")
  finished, unfinished, warnings = [], [], []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    is_run = DONE_FILE in filenames or "checkpoints" in dirnames or "metrics.jsonl" in filenames
    if not is_run:
      continue
    dirnames[:] = []  # checkpoints, tensorboard, evaluate's budget_eval/: not runs
    rel = os.path.relpath(dirpath, root)
    name = os.path.basename(os.path.abspath(root)) if rel == "." else os.path.basename(rel)
    prefix = "" if rel == "." else os.path.dirname(rel)
    variant, seed = parse_name(name)
    run = {"name": name if not prefix else f"{prefix}/{name}", "path": dirpath,
           "variant": f"{prefix}/{variant}" if prefix else variant, "seed": seed}
    if DONE_FILE not in filenames:
      unfinished.append(run)
      continue
    try:
      with open(os.path.join(dirpath, DONE_FILE)) as f:
        result = json.load(f)
      if not isinstance(result.get("budgets"), dict) or "method" not in result:
        raise ValueError("no 'method' or 'budgets'")
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
      warnings.append(f"{os.path.join(dirpath, DONE_FILE)} is not a train eval.json, skipped: {e}")
      unfinished.append(run)
      continue
    run["eval"] = result
    run["config"] = _read_config(dirpath, warnings)
    finished.append(run)
  return finished, unfinished, warnings


# ---------------------------------------------------------------------- summary

def mean_std(values: Sequence[float]) -> dict:
  """``{"mean", "std", "n"}``: sample std (ddof=1), None for fewer than two values."""
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
          "n": int(v.size)}


def score_keys(keys) -> list[str]:
  """``overall``, the synthetic task families in their usual order, then any others."""
  keys = set(keys)
  return ([k for k in (OVERALL, *synthetic.FAMILIES) if k in keys]
          + sorted(keys - {OVERALL, *synthetic.FAMILIES}))


def _variant_meta(name: str, group: list[dict], warnings: list[str]) -> dict:
  methods = sorted({r["eval"]["method"] for r in group})
  if len(methods) > 1:
    warnings.append(f"variant {name} mixes methods {methods}")
  method = "/".join(methods)
  configs = [r["config"] for r in group if r["config"] is not None]
  trained = sorted({tuple(c["model"]["connector"]["budgets"]) for c in configs})
  if len(trained) > 1:
    warnings.append(f"variant {name} mixes trained budgets {[list(t) for t in trained]}")
  budgets = {b for r in group for b in r["eval"]["budgets"]}
  if configs:  # () = the method's whole space; a subset trains a specialist
    specialist = method != "none" and bool(trained[0])
  else:  # without a config: evaluated at one budget only
    specialist = method != "none" and len(budgets) == 1
  keys = [part.partition("=")[0].rsplit("/", 1)[-1].split(".")[-1] for part in name.split(",")]
  label = name
  if name == "run":
    label = method
  elif "method" not in keys and name.rsplit("/", 1)[-1] != method:
    label = f"{name} ({method})"
  if specialist and "budgets" not in keys:
    shown = trained[0] if configs else sorted(int(b) for b in budgets)
    label += f" [B={','.join(map(str, shown))}]"
  return {"label": label, "method": method, "specialist": specialist,
          "trained_budgets": [list(t) for t in trained][0] if len(trained) == 1 else None}


def _order(item):
  name, v = item
  method = v["method"]
  rank = budgets_lib.METHODS.index(method) if method in budgets_lib.METHODS else len(budgets_lib.METHODS)
  return (rank, v["specialist"], name)


def _pick_reference(variants: dict, reference: str | None, warnings: list[str]) -> str | None:
  if reference is not None:
    if reference not in variants:
      raise ReportError(f"--reference={reference} is not a variant; variants: {', '.join(variants)}")
    return reference
  candidates = [n for n, v in variants.items() if v["method"] == "none"]
  if not candidates:
    warnings.append("no variant with method 'none': no retention (pass --reference=VARIANT)")
    return None
  preferred = [n for n in candidates if n == "method=none"] or candidates
  if len(candidates) > 1:
    warnings.append(f"several variants with method 'none' ({', '.join(candidates)}); "
                    f"retention is against {preferred[0]}")
  return preferred[0]


def _check_eval_streams(runs: list[dict], warnings: list[str]) -> None:
  """Retention and comparisons only mean something on the same eval examples."""
  counts = sorted({r["eval"].get("num_examples") for r in runs}, key=str)
  if len(counts) > 1:
    warnings.append(f"runs were evaluated on different numbers of examples: {counts}")
  streams: dict[str, list[str]] = {}
  for r in runs:
    if r["config"] is not None:
      key = evaluate_lib.eval_stream_key(ml_collections.ConfigDict(r["config"]))
      streams.setdefault(key, []).append(r["name"])
  if len(streams) > 1:
    groups = "; ".join(f"{', '.join(names)}: {key}" for key, names in streams.items())
    warnings.append(f"runs have different eval streams (data config), scores and retention "
                    f"compare different examples: {groups}")


def summarise(runs: list[dict], unfinished: Sequence[dict] = (), *, reference: str | None = None,
              warnings: Sequence[str] = (), root: str = "") -> dict:
  """The report as a JSON-able dict (see the module docstring and ``summary.json``)."""
  warnings = list(warnings)
  if not runs:
    raise ReportError(f"no runs under {root or 'the root'}: no directory holds {DONE_FILE} "
                      f"(finished runs of parcel_jax.train / launch/sweep.py)"
                      + (f"; {len(unfinished)} unfinished" if unfinished else ""))
  all_seeds = sorted({r["seed"] for r in runs} - {None}, key=_seed_order)
  groups: dict[str, list[dict]] = {}
  for r in runs:
    groups.setdefault(r["variant"], []).append(r)

  variants = {}
  for name, group in groups.items():
    group.sort(key=lambda r: _seed_order(r["seed"]))
    seeds = [r["seed"] for r in group]
    dupes = sorted({s for s in seeds if seeds.count(s) > 1}, key=_seed_order)
    if dupes:
      warnings.append(f"variant {name} has several runs for seed(s) {dupes}; all are averaged")
    entry = _variant_meta(name, group, warnings)
    budgets = sorted({int(b) for r in group for b in r["eval"]["budgets"]})
    entry.update({
        "runs": [r["name"] for r in group], "seeds": seeds,
        "missing_seeds": [s for s in all_seeds if s not in seeds],
        "unfinished": [r["name"] for r in unfinished if r["variant"] == name],
        "num_examples": sorted({r["eval"].get("num_examples") for r in group}, key=str),
        "steps": sorted({r["eval"].get("steps") for r in group}, key=str),
        "budgets": {}})
    for b in budgets:
      rows = [(r["seed"], r["eval"]["budgets"][str(b)]) for r in group if str(b) in r["eval"]["budgets"]]
      have = [s for s, _ in rows]
      keys = score_keys(k for _, row in rows for k in row)
      entry["budgets"][str(b)] = {
          "n": len(rows), "seeds": have,
          "missing_seeds": [s for s in (all_seeds or seeds) if s not in have],
          "scores": {k: mean_std([row[k] for _, row in rows if k in row]) for k in keys},
          "retention": None}
    variants[name] = entry
  variants = dict(sorted(variants.items(), key=_order))

  ref_name = _pick_reference(variants, reference, warnings)
  ref = None
  if ref_name is not None:
    ref_budgets = variants[ref_name]["budgets"]
    ref_budget = max(ref_budgets, key=int)
    if len(ref_budgets) > 1:
      warnings.append(f"reference {ref_name} has several budgets {list(ref_budgets)}; using {ref_budget}")
    ref_mean = {k: s["mean"] for k, s in ref_budgets[ref_budget]["scores"].items()}
    ref = {"variant": ref_name, "label": variants[ref_name]["label"], "budget": int(ref_budget),
           "n": ref_budgets[ref_budget]["n"], "mean": ref_mean}
    for v in variants.values():
      for row in v["budgets"].values():
        mean = {k: s["mean"] for k, s in row["scores"].items()}
        row["retention"] = evaluate_lib.retention(mean, ref_mean)

  _check_eval_streams(runs, warnings)
  return {
      "root": os.path.abspath(root) if root else None,
      "num_runs": len(runs), "seeds": all_seeds,
      "budgets": sorted({int(b) for v in variants.values() for b in v["budgets"]}),
      "keys": score_keys(k for v in variants.values() for row in v["budgets"].values()
                         for k in row["scores"]),
      "reference": ref, "variants": variants,
      "unfinished": [{"name": r["name"], "path": r["path"], "variant": r["variant"], "seed": r["seed"]}
                     for r in unfinished],
      "warnings": warnings,
      "runs": [{"name": r["name"], "path": r["path"], "variant": r["variant"], "seed": r["seed"],
                "method": r["eval"]["method"], "num_examples": r["eval"].get("num_examples"),
                "steps": r["eval"].get("steps"), "budgets": r["eval"]["budgets"]} for r in runs],
  }


# --------------------------------------------------------------------- markdown

def _pct(x: float | None, digits: int = 1) -> str:
  return "–" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def _cell(stat: dict | None, n: int) -> str:
  if stat is None:
    return "–"
  text = _pct(stat["mean"]) if stat["std"] is None else f"{_pct(stat['mean'])} ± {_pct(stat['std'])}"
  return text if stat["n"] == n else f"{text} (n={stat['n']})"


def _seeds(seeds) -> str:
  return ", ".join(map(str, seeds))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> list[str]:
  def esc(s):
    return str(s).replace("|", "\\|")
  return (["| " + " | ".join(map(esc, header)) + " |",
           "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
          + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def format_markdown(summary: dict) -> str:
  keys, variants, ref = summary["keys"], summary["variants"], summary["reference"]
  counts = sorted({c for v in variants.values() for c in v["num_examples"]}, key=str)
  lines = [f"# Sweep report: {summary['root'] or ''}".rstrip(), "",
           f"{summary['num_runs']} finished runs in {len(variants)} variants"
           + (f", seeds {_seeds(summary['seeds'])}" if summary["seeds"] else "")
           + f". Exact match (%) on {'/'.join(map(str, counts))} eval examples: mean ± sample std "
           "over seeds; n = seeds with the budget.", ""]
  if summary["warnings"]:
    lines += ["**Warnings**", ""] + [f"- {w}" for w in summary["warnings"]] + [""]

  for b in summary["budgets"]:
    rows = []
    for name, v in variants.items():
      row = v["budgets"].get(str(b))
      if row is not None:
        rows.append([v["label"], str(row["n"])] + [_cell(row["scores"].get(k), row["n"]) for k in keys])
    lines += [f"## Exact match at B = {b}", ""]
    lines += _table(["variant", "n", *keys], rows, ["l", "r"] + ["r"] * len(keys)) + [""]

  if ref:
    lines += [f"## Retention vs {ref['label']} (B = {ref['budget']}, n = {ref['n']})", "",
              "100 x mean exact match / the reference's mean exact match, per family.", ""]
    rows = []
    for name, v in variants.items():
      for b, row in v["budgets"].items():
        ret = row["retention"] or {}
        rows.append([v["label"], b, str(row["n"])]
                    + ["–" if ret.get(k) is None else f"{ret[k]:.1f}" for k in keys])
    lines += _table(["variant", "B", "n", *keys], rows, ["l", "r", "r"] + ["r"] * len(keys)) + [""]
  else:
    lines += ["No reference variant (method `none`): no retention.", ""]

  missing = []
  for name, v in variants.items():
    if v["missing_seeds"]:
      missing.append(f"- {v['label']}: no finished run for seed {_seeds(v['missing_seeds'])}")
    for b, row in v["budgets"].items():
      lost = [s for s in row["missing_seeds"] if s not in v["missing_seeds"]]
      if lost:
        missing.append(f"- {v['label']} at B = {b}: not in the eval.json of seed {_seeds(lost)}")
  for r in summary["unfinished"]:
    missing.append(f"- unfinished (no {DONE_FILE}): {r['name']}")
  lines += ["## Missing", ""] + (missing or ["Nothing: every variant has every seed and budget."])
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------ plots

def _plot_key(ax, summary: dict, key: str) -> None:
  ref = summary["reference"]
  for i, (name, v) in enumerate(summary["variants"].items()):
    if ref and name == ref["variant"]:
      continue
    pts = [(int(b), row["scores"][key]) for b, row in v["budgets"].items() if key in row["scores"]]
    if not pts:
      continue
    pts.sort()
    x = [b for b, _ in pts]
    y = [100 * s["mean"] for _, s in pts]
    err = [100 * (s["std"] or 0.0) for _, s in pts]
    single = len(pts) == 1  # specialists: one point
    ax.errorbar(x, y, yerr=err, marker="s" if single else "o", ls="none" if single else "-",
                capsize=3, ms=6 if single else 4, color=f"C{i % 10}", label=v["label"])
  if ref:
    row = summary["variants"][ref["variant"]]["budgets"][str(ref["budget"])]["scores"].get(key)
    if row is not None:
      ax.axhline(100 * row["mean"], color="k", ls=":", lw=1)
      ax.errorbar([ref["budget"]], [100 * row["mean"]], yerr=[100 * (row["std"] or 0.0)], fmt="k*",
                  ms=10, capsize=3, label=f"reference: {ref['label']}")
  budgets = summary["budgets"]
  ax.set_xscale("log", base=2)
  ax.set_xticks(budgets, [str(b) for b in budgets])
  ax.minorticks_off()
  ax.set_xlabel("visual tokens B")
  ax.set_ylabel("exact match (%)")
  ax.set_title(key)
  ax.grid(alpha=0.3)


def plot(summary: dict, out: str) -> tuple[str, str]:
  """OUT/pareto.png (overall) and OUT/families.png (one subplot per family)."""
  import matplotlib
  matplotlib.use("Agg")  # headless
  import matplotlib.pyplot as plt

  seeds = f"mean ± std over seeds {_seeds(summary['seeds'])}" if summary["seeds"] else "mean ± std"
  pareto = os.path.join(out, "pareto.png")
  fig, ax = plt.subplots(figsize=(7, 4.5))
  _plot_key(ax, summary, OVERALL)
  ax.set_title(f"Overall exact match vs budget ({seeds})")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(pareto, dpi=120)
  plt.close(fig)

  families = [k for k in summary["keys"] if k != OVERALL] or [OVERALL]
  cols = min(3, len(families))
  rows = math.ceil(len(families) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
  for ax, key in zip(axes.flat, families):
    _plot_key(ax, summary, key)
  spare = list(axes.flat)[len(families):]
  for ax in spare:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  if spare:  # the legend in the first empty cell
    spare[0].legend(handles, labels, loc="center", fontsize=8)
  else:
    axes.flat[0].legend(fontsize=7)
  fig.suptitle(f"Exact match per task family ({seeds})")
  fig.tight_layout()
  path = os.path.join(out, "families.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return pareto, path


# ------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="report.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", required=True, help="the sweep's --workdir_root (searched recursively)")
  p.add_argument("--out", default=None, help="output directory (default: ROOT/report)")
  p.add_argument("--reference", default=None, metavar="VARIANT",
                 help="variant to compute retention against (default: the method 'none' variant)")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    runs, unfinished, warnings = find_runs(args.root)
    summary = summarise(runs, unfinished, reference=args.reference, warnings=warnings, root=args.root)
  except ReportError as e:
    print(f"report.py: error: {e}", file=sys.stderr)
    return 2
  out = args.out or os.path.join(args.root, "report")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  markdown = format_markdown(summary)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(markdown)
  plot(summary, out)
  print(markdown, end="", flush=True)
  print(f"# wrote {', '.join(os.path.join(out, n) for n in ('summary.json', 'summary.md', 'pareto.png', 'families.png'))}",
        file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
