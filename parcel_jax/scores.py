"""Per-example scores at every budget: saved arrays, the oracle and the fixed-budget curve.

``evaluation.evaluate(..., per_example=True)`` scores every eval example at every budget
from one checkpoint (each image encoded once); ``save`` writes those arrays as an ``.npz``
(``python -m parcel_jax.evaluate --per_example`` writes one per run next to budgets.json).
Everything else here is a pure function of the saved arrays:

  n examples, k budgets (ascending)
  budgets         (k,) int     visual tokens B
  flops           (k,) float   Appendix C total inference FLOPs at each budget (``flops.cost``)
  index           (n,) int     eval-stream index of each example
  family          (n,) int     task family id (``family_names``; -1: real data, "all")
  correct         (n, k) bool  exact match (teacher-forced argmax on every answer token and EOS)
  answer_prob     (n, k)       product of the answer tokens' probabilities (EOS included)
  min_token_prob  (n, k)       the smallest of them

``evaluate`` scores the target answer under teacher forcing (``answers = "teacher_forced"``);
``policy_scores`` scores the greedy answer that serving would return (``answers = "greedy"``),
which is what a confidence cascade sees. Both give the same ``correct``; they differ in the
probabilities of the examples answered wrongly. A file may hold more arrays than these
(``policy_scores``: the router's inputs), kept as they are.

The oracle picks, per example, the cheapest budget that answers it correctly; an example
wrong at every budget counts at the smallest budget (M3's protocol), so the oracle's
accuracy is the fraction correct at some budget and its cost a lower bound for any policy
with that accuracy.
"""

from __future__ import annotations

import numpy as np

from parcel_jax.data import synthetic

ARRAYS = ("budgets", "flops", "index", "family", "correct", "answer_prob", "min_token_prob")
REAL_FAMILY_NAME = "all"


def family_name(family_id: int) -> str:
  return REAL_FAMILY_NAME if family_id < 0 else synthetic.FAMILIES[family_id]


def check(scores: dict) -> dict:
  """``scores`` with every array present and of consistent shape; ValueError naming the field."""
  missing = [k for k in ARRAYS if k not in scores]
  if missing:
    raise ValueError(f"per-example scores lack {missing}; expected {list(ARRAYS)}")
  out = {k: np.asarray(scores[k]) for k in ARRAYS}
  k = out["budgets"].shape
  n = out["index"].shape
  if len(k) != 1 or out["flops"].shape != k:
    raise ValueError(f"budgets {out['budgets'].shape} and flops {out['flops'].shape} must be one (k,) vector each")
  if np.any(np.diff(out["budgets"]) <= 0):
    raise ValueError(f"budgets must be strictly ascending, got {out['budgets'].tolist()}")
  if out["family"].shape != n or len(n) != 1:
    raise ValueError(f"index {n} and family {out['family'].shape} must be one (n,) vector each")
  for key in ("correct", "answer_prob", "min_token_prob"):
    if out[key].shape != n + k:
      raise ValueError(f"{key} has shape {out[key].shape}; expected (examples, budgets) = {n + k}")
  out["correct"] = out["correct"].astype(bool)
  return {**{key: v for key, v in scores.items() if key not in ARRAYS}, **out}


def save(path: str, per_example: dict, *, flops=None, **meta) -> None:
  """Writes ``evaluate``'s ``per_example`` arrays with the FLOPs per budget (k,) (``flops``,
  or already in ``per_example``), any further arrays in ``per_example`` as they are, and
  metadata as strings (``method``, ``label``, ...) to ``path`` (.npz)."""
  scores = check({**per_example, **({} if flops is None else {"flops": np.asarray(flops, np.float64)})})
  extra = {k: np.asarray(v) for k, v in per_example.items() if k not in ARRAYS and k not in meta}
  np.savez(path, **{k: scores[k] for k in ARRAYS}, **extra,
           **{k: np.asarray(str(v)) for k, v in meta.items()})


def load(path: str) -> dict:
  """The arrays ``save`` wrote (metadata as str); ValueError naming ``path`` if they do not fit."""
  with np.load(path, allow_pickle=False) as f:
    scores = {k: (str(f[k]) if f[k].dtype.kind == "U" else f[k]) for k in f.files}
  try:
    return check(scores)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e


def oracle(correct: np.ndarray) -> np.ndarray:
  """Per example (n,) the column of the cheapest correct budget in ``correct`` (n, k)
  (budgets ascending); 0 (the smallest budget) where no budget is correct."""
  correct = np.asarray(correct, bool)
  return np.where(correct.any(axis=1), np.argmax(correct, axis=1), 0)


def groups(scores: dict) -> dict[str, np.ndarray]:
  """'overall' and every family present -> boolean row selector (n,)."""
  family = scores["family"]
  out = {"overall": np.ones(family.shape, bool)}
  for f in sorted(set(family.tolist())):
    out[family_name(f)] = family == f
  return out


def fixed_budget_curve(scores: dict) -> list[dict]:
  """One row per budget: every example served at that budget.

  Returns: ``[{"budget", "tokens" (= budget), "flops", "accuracy": {"overall", family: ...}}]``,
  budgets ascending; accuracy in [0, 1].
  """
  scores = check(scores)
  selectors = groups(scores)
  return [{"budget": int(b), "tokens": float(b), "flops": float(scores["flops"][j]),
           "accuracy": {g: float(scores["correct"][sel, j].mean()) for g, sel in selectors.items()}}
          for j, b in enumerate(scores["budgets"])]


def oracle_summary(scores: dict) -> dict:
  """The oracle (``oracle``) per group ('overall' and every family): its accuracy, mean
  visual tokens and mean FLOPs, and how many examples it sends to each budget.

  Returns: ``{group: {"accuracy", "mean_tokens", "mean_flops", "examples", "budget_counts":
  {str(B): count}}}``.
  """
  scores = check(scores)
  choice = oracle(scores["correct"])
  rows = np.arange(choice.size)
  hit = scores["correct"][rows, choice]
  tokens = scores["budgets"][choice].astype(np.float64)
  flops = scores["flops"][choice]
  out = {}
  for g, sel in groups(scores).items():
    counts = np.bincount(choice[sel], minlength=scores["budgets"].size)
    out[g] = {"accuracy": float(hit[sel].mean()), "mean_tokens": float(tokens[sel].mean()),
              "mean_flops": float(flops[sel].mean()), "examples": int(sel.sum()),
              "budget_counts": {str(int(b)): int(c) for b, c in zip(scores["budgets"], counts)}}
  return out


def format_summary(scores: dict) -> str:
  """The fixed-budget curve and the oracle, overall and per family, as a table."""
  curve, best = fixed_budget_curve(scores), oracle_summary(scores)
  names = list(best)
  head = f"{'':>10} {'tokens':>8} {'GFLOPs':>9} " + " ".join(f"{g:>10}" for g in names)
  lines = [f"exact match % on {best['overall']['examples']} examples; oracle: cheapest correct budget "
           f"per example (wrong everywhere: the smallest)", head]
  for row in curve:
    lines.append(f"{'B=' + str(row['budget']):>10} {row['tokens']:>8.1f} {row['flops'] / 1e9:>9.3f} "
                 + " ".join(f"{100 * row['accuracy'][g]:>10.1f}" for g in names))
  o = best["overall"]
  lines.append(f"{'oracle':>10} {o['mean_tokens']:>8.1f} {o['mean_flops'] / 1e9:>9.3f} "
               + " ".join(f"{100 * best[g]['accuracy']:>10.1f}" for g in names))
  lines.append(f"{'':>10} oracle mean tokens per group: "
               + ", ".join(f"{g} {best[g]['mean_tokens']:.1f}" for g in names))
  return "\n".join(lines)
