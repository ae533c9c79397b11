r"""Command line: evaluate checkpoints at many budgets (the library is ``parcel_jax.evaluation``).

    python -m parcel_jax.evaluate --workdir=RUN [--workdir=RUN2 ...] [--budgets=16,64,256] \
        [--reference=NONE_RUN] [--out=DIR] [--num_examples=N] [--batch_size=N] [--per_example]

writes ``DIR/budgets.json`` (exact match per budget and task family, loss, Appendix C FLOPs,
retention against ``--reference``) and ``DIR/pareto.png``; see ``parcel_jax.evaluation``.
``--per_example`` also writes ``DIR/per_example_<i>.npz`` per run and prints its fixed-budget
curve and oracle (``parcel_jax.scores``).
"""

from __future__ import annotations

import os

from absl import app, flags

from parcel_jax import cli, host_memory
from parcel_jax import evaluation, scores


def main(argv) -> None:
  del argv
  host_memory.configure("auto")  # before JAX's backend starts
  cli.quiet_library_logs()
  f = flags.FLAGS
  out = f.out or os.path.join(f.workdir[0], "budget_eval")
  try:
    budgets = [int(b) for b in f.budgets] if f.budgets else None
    report = evaluation.evaluate_workdirs(f.workdir, budgets=budgets, reference=f.reference, out=out,
                                          num_examples=f.num_examples, batch_size=f.batch_size,
                                          per_example=f.per_example)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from e
  print(evaluation.format_report(report))
  for run in report["runs"]:
    if run.get("per_example_file"):
      path = os.path.join(out, run["per_example_file"])
      print(f"\n{run['label']}: {scores.format_summary(scores.load(path))}\nwrote {path}", flush=True)
  print(f"wrote {os.path.join(out, 'budgets.json')} and {os.path.join(out, 'pareto.png')}", flush=True)


def _define_flags() -> None:
  flags.DEFINE_multi_string("workdir", None, "Training workdir(s); repeat for several runs.")
  flags.DEFINE_list("budgets", None, "Budgets to evaluate (default: each run's eval.budgets).")
  flags.DEFINE_string("reference", None, "Workdir of an uncompressed (method 'none') run: retention.")
  flags.DEFINE_string("out", None, "Output directory (default: FIRST_WORKDIR/budget_eval).")
  flags.DEFINE_integer("num_examples", None, "Eval examples (default: the first run's eval.num_examples).")
  flags.DEFINE_integer("batch_size", None, "Eval batch size (default: each run's eval.batch_size).")
  flags.DEFINE_bool("per_example", False, "Also write every example's correctness and answer "
                    "confidence at every budget (DIR/per_example_<i>.npz) and print the oracle.")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
