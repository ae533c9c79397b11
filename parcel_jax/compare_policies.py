r"""Command line: input-adaptive budget policies against fixed budgets, for one run.

    python -m parcel_jax.compare_policies --workdir=RUN [--out=DIR] [--budgets=16,32,64,128,256] \
        [--num_examples=N] [--train_examples=M] [--cascade_budgets=16,64,256] \
        [--confidence=answer_prob|min_token_prob] [--router_hidden=0] [--reuse]

1. Scores the greedy answers of the first N eval examples and of the first M training
   examples at every budget (``policy_scores.collect``; each image encoded once) and writes
   ``DIR/scores_eval.npz`` and ``DIR/scores_train.npz`` (``--reuse`` reads them back instead
   when they hold the same budgets and example counts).
2. Trains the router on the training examples only and writes ``DIR/router.safetensors``
   (``predict --auto_policy=router`` serves with it).
3. On the eval examples: the fixed budgets, the oracle, the cascade swept over thresholds
   and the router swept over thresholds; prints accuracy vs mean visual tokens and mean
   FLOPs per family and the headline numbers (``policies.format_comparison``), then each
   policy at the threshold fixed on the training scores (``policies.choose_threshold``), and writes
   ``DIR/policies.json``, ``DIR/policies.png`` (overall) and ``DIR/policies_families.png``.

Defaults: DIR = RUN/policies; budgets: the run's ``eval.budgets`` it was trained on; N: the
run's ``eval.num_examples``; the cascade's ladder: every scored budget.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from parcel_jax import cli, evaluation, policies, policy_scores, runs, scores
from parcel_jax import router as router_lib


def _scores(run, budgets, split: str, num_examples: int, path: str, *, batch_size: int, reuse: bool) -> dict:
  """The split's greedy scores: read from ``path`` with ``reuse`` when they match, else
  collected and written there."""
  if reuse and os.path.isfile(path):
    table = scores.load(path)
    same = (table["budgets"].tolist() == list(budgets) and table.get("split") == split
            and table["index"].size + int(table.get("skipped", 0)) == num_examples)
    if same:
      logging.info("reusing %s", path)
      return table
    logging.info("%s holds other budgets or examples; scoring again", path)
  table = policy_scores.collect(run, budgets, split=split, num_examples=num_examples, batch_size=batch_size)
  scores.save(path, table, method=run.method, label=run.label(), workdir=run.workdir, step=run.step)
  return scores.load(path)


def _held_out(evals: dict, train: dict, router, *, cascade_budgets, confidence: str,
              reference_budget: int) -> dict:
  """Each policy's threshold fixed on the training scores (``policies.choose_threshold``; the
  router's own training examples, the only labelled data besides eval), applied to eval."""
  simulate = {
      "cascade": lambda table, t=None: policies.simulate_cascade(table, t, ladder=cascade_budgets,
                                                                  confidence=confidence),
      "router": lambda table, t=None: policies.simulate_router(
          table, router.probabilities(table["anchors"], table["prompt"]), t, router_flops=router.flops)}
  out = {}
  for name, sim in simulate.items():
    train_points = sim(train)["points"]
    t = policies.choose_threshold(train_points, train, reference_budget=reference_budget)
    eval_point = None if t is None else sim(evals, [t])["points"][0]
    out[name] = policies.held_out(t, train_points, eval_point, policies.fixed_points(evals),
                                  reference_budget=reference_budget)
  return out


def compare_run(run, out: str, *, budgets=None, num_examples: int | None = None, train_examples: int = 2048,
                batch_size: int = 32, cascade_budgets=None, confidence: str = "answer_prob",
                router_hidden: int = 0, router_steps: int = 500, router_threshold: float = 0.5,
                reference_budget: int = policies.REFERENCE_BUDGET, reuse: bool = False) -> dict:
  """The command's work for one ``runs.Run``; returns ``policies.compare``'s result (with
  ``"files"``: what was written under ``out``)."""
  _, budgets = evaluation.run_budgets(run, budgets)
  if not budgets:
    raise ValueError(f"none of the requested budgets is in the space of method {run.method!r}")
  num_examples = num_examples or int(run.config.eval.num_examples)
  os.makedirs(out, exist_ok=True)
  files = {name: os.path.join(out, name) for name in
           ("scores_eval.npz", "scores_train.npz", "router.safetensors", "policies.json", "policies.png",
            "policies_families.png")}
  evals = _scores(run, budgets, "eval", num_examples, files["scores_eval.npz"], batch_size=batch_size, reuse=reuse)
  train = _scores(run, budgets, "train", train_examples, files["scores_train.npz"], batch_size=batch_size,
                  reuse=reuse)
  router = router_lib.train(train, hidden=router_hidden, steps=router_steps, threshold=router_threshold)
  router.save(files["router.safetensors"])
  cascade = policies.simulate_cascade(evals, ladder=cascade_budgets, confidence=confidence)
  routed = policies.simulate_router(evals, router.probabilities(evals["anchors"], evals["prompt"]),
                                    router_flops=router.flops)
  routed["description"] = router.describe()
  held_out = _held_out(evals, train, router, cascade_budgets=cascade_budgets, confidence=confidence,
                       reference_budget=reference_budget)
  result = policies.compare(evals, cascade=cascade, router=routed, reference_budget=reference_budget,
                            held_out_results=held_out)
  result.update(workdir=run.workdir, step=run.step, label=run.label(),
                train_examples=int(train["index"].size), files=sorted(files.values()))
  with open(files["policies.json"], "w") as f:
    json.dump(result, f, indent=2)
  policies.plot_comparison(result, files["policies.png"], files["policies_families.png"])
  return result


def main(argv) -> None:
  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  try:
    run = runs.load_run(f.workdir, f.step)
    result = compare_run(
        run, f.out or os.path.join(f.workdir, "policies"),
        budgets=[int(b) for b in f.budgets] if f.budgets else None, num_examples=f.num_examples,
        train_examples=f.train_examples, batch_size=f.batch_size,
        cascade_budgets=[int(b) for b in f.cascade_budgets] if f.cascade_budgets else None,
        confidence=f.confidence, router_hidden=f.router_hidden, router_steps=f.router_steps,
        router_threshold=f.router_threshold, reference_budget=f.reference_budget, reuse=f.reuse)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from e
  print(f"{result['label']} (step {result['step']}): router fit on {result['train_examples']} training examples")
  print(policies.format_comparison(result), flush=True)
  print("wrote " + ", ".join(result["files"]), flush=True)


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/policies).")
  flags.DEFINE_list("budgets", None, "Budgets to score (default: the run's trained eval.budgets).")
  flags.DEFINE_integer("num_examples", None, "Eval examples (default: the run's eval.num_examples).")
  flags.DEFINE_integer("train_examples", 2048, "Training-split examples the router is fit on.")
  flags.DEFINE_integer("batch_size", 32, "Rows per encoder and decoder batch.")
  flags.DEFINE_list("cascade_budgets", None, "The cascade's ladder, ascending (default: every scored budget).")
  flags.DEFINE_enum("confidence", "answer_prob", list(policies.CONFIDENCES), "The cascade's confidence.")
  flags.DEFINE_integer("router_hidden", 0, "Router hidden width (0: logistic regression).")
  flags.DEFINE_integer("router_steps", 500, "Router training steps (full batch).")
  flags.DEFINE_float("router_threshold", 0.5, "The router's default threshold when serving.")
  flags.DEFINE_integer("reference_budget", policies.REFERENCE_BUDGET, "The budget savings are measured "
                       "against (the largest scored one if it was not scored).")
  flags.DEFINE_bool("reuse", False, "Reuse DIR/scores_*.npz when they hold the same budgets and examples.")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
