"""Input-adaptive budget policies, simulated on per-example scores.

One checkpoint answers at any budget, so the budget can follow the request. Two policies:

  cascade  answer at the smallest budget of a ladder; while the answer's confidence
           (``answer_prob`` or ``min_token_prob`` of the greedy answer) is below a threshold,
           answer again at the next budget of the ladder on the same ViT features. Its cost
           counts every budget it ran: visual tokens summed over its decoder passes, FLOPs
           = the ViT once + every pass's connector, projection and decoder.
  router   a small learned head (``parcel_jax.router``) reads what exists before the
           decoder (pooled ViT anchors, the prompt) and predicts per budget whether the
           answer there is correct; it picks the smallest budget predicted correct with
           probability >= a threshold. Its cost: the chosen budget plus the head's FLOPs.

Both rules are one test here, ``confident`` (value >= threshold; ``first_confident``: the
first column that passes it, else the last), so that the online cascade in ``parcel_jax.serving``
(``Cascade.next_budget``) and the simulation decide alike. Everything else is a pure
function of arrays shaped as in ``parcel_jax.scores`` (n examples, k budgets ascending)
plus ``vit_flops`` (the ViT's share of every entry of ``flops``).

A sweep of thresholds traces each policy's accuracy against mean visual tokens and mean
FLOPs, overall and per family; ``compare`` puts them next to the fixed budgets and the
oracle and reads off two numbers: the token (and FLOP) saving at <= 1 point accuracy loss
against a reference budget (256), and the accuracy gain at no more mean tokens than the
most accurate fixed budget. The thresholds are swept on the scores the curve is drawn on,
so a point's accuracy is what that threshold gives on those examples. The deployable number
is ``held_out``: the threshold chosen on the training split's scores (the cheapest point
there within 1 point of the reference budget), then applied to the eval examples.

Only scores of the greedy answer (``scores["answers"] == "greedy"``, written by
``parcel_jax.policy_scores``) simulate a cascade: under teacher forcing the probability of
an example answered wrongly is that of the target, which is below 0.5 at the first wrong
token, so a threshold would see the label.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from parcel_jax import scores as scores_lib

CONFIDENCES = ("answer_prob", "min_token_prob")
GREEDY = "greedy"              # scores["answers"] of the greedy answer's probabilities
ACCURACY_LOSS = 0.01           # "at <= 1 point accuracy loss"
REFERENCE_BUDGET = 256
# A threshold no probability reaches: the cascade always runs to the largest budget.
ABOVE_ONE = float(np.nextafter(1.0, 2.0))


def confident(values, threshold: float) -> np.ndarray:
  """Whether each value passes ``threshold`` (>=): the cascade stops, the router accepts."""
  return np.asarray(values) >= threshold


def first_confident(values: np.ndarray, threshold: float) -> np.ndarray:
  """Per row of ``values`` (n, m) the first column that is ``confident``, the last column
  (m - 1) where none is: where a cascade stops, which budget a router picks."""
  ok = confident(values, threshold)
  ok[:, -1] = True
  return np.argmax(ok, axis=1)


@dataclasses.dataclass(frozen=True)
class Cascade:
  """The online cascade: ``budgets`` (ascending) are tried in order until the answer's
  ``confidence`` ("answer_prob" or "min_token_prob") is >= ``threshold`` (0: always the
  first budget; above 1: always the last)."""
  budgets: tuple[int, ...]
  threshold: float
  confidence: str = "answer_prob"

  def __post_init__(self):
    budgets = tuple(int(b) for b in self.budgets)
    object.__setattr__(self, "budgets", budgets)
    if not budgets:
      raise ValueError("cascade budgets are empty; give the ladder of budgets to try, ascending")
    if any(b <= a for a, b in zip(budgets, budgets[1:])):
      raise ValueError(f"cascade budgets must be strictly ascending, got {list(budgets)}")
    if self.confidence not in CONFIDENCES:
      raise ValueError(f"cascade confidence {self.confidence!r} is unknown; allowed: {', '.join(CONFIDENCES)}")
    if not np.isfinite(self.threshold) or self.threshold < 0:
      raise ValueError(f"cascade threshold must be a finite number >= 0, got {self.threshold}")

  def next_budget(self, budget: int, confidence: float) -> int | None:
    """The budget to answer again at after an answer at ``budget`` with ``confidence``;
    None: keep this answer (confident enough, or the ladder's last budget)."""
    i = self.budgets.index(int(budget))
    if bool(confident(confidence, self.threshold)) or i == len(self.budgets) - 1:
      return None
    return self.budgets[i + 1]


# ---------------------------------------------------------------- shared pieces

def columns_of(scores: dict, budgets) -> np.ndarray:
  """The columns of ``budgets`` in ``scores["budgets"]``; ValueError naming a budget that
  was not scored."""
  scored = [int(b) for b in scores["budgets"]]
  missing = [int(b) for b in budgets if int(b) not in scored]
  if missing:
    raise ValueError(f"budget(s) {missing} were not scored; the scores hold {scored}")
  return np.asarray([scored.index(int(b)) for b in budgets], np.int64)


def vit_flops_of(scores: dict) -> float:
  """The ViT's FLOPs per image (``scores["vit_flops"]``); ValueError if the scores lack them."""
  if "vit_flops" not in scores:
    raise ValueError("the scores lack 'vit_flops' (the ViT's share of every budget's FLOPs), which "
                     "a cascade's cost needs; parcel_jax.policy_scores writes it")
  value = float(np.asarray(scores["vit_flops"]))
  if not 0 <= value <= float(np.min(scores["flops"])):
    raise ValueError(f"vit_flops={value} must be in [0, the smallest budget's FLOPs {np.min(scores['flops'])}]")
  return value


def cascade_costs(budgets, flops, vit_flops: float) -> tuple[np.ndarray, np.ndarray]:
  """The cost of a cascade that stops at each step of a ladder: visual tokens (m,) summed
  over the budgets it ran, and FLOPs (m,): the ViT once plus each pass's rest.

  Args: budgets, flops: (m,) the ladder's budgets and their total FLOPs (ViT included)."""
  budgets, flops = np.asarray(budgets, np.float64), np.asarray(flops, np.float64)
  return np.cumsum(budgets), vit_flops + np.cumsum(flops - vit_flops)


def point(scores: dict, column: np.ndarray, tokens: np.ndarray, flops: np.ndarray, **fields) -> dict:
  """One operating point of a policy that answers example i with the budget in column
  ``column[i]`` at a cost of ``tokens[i]`` visual tokens and ``flops[i]`` FLOPs.

  Returns: ``{**fields, "accuracy", "mean_tokens", "mean_flops": {group: value},
  "budget_counts": {str(B): examples answered at B}}``, groups as ``scores.groups``."""
  rows = np.arange(column.size)
  hit = scores["correct"][rows, column]
  out = {**fields, "accuracy": {}, "mean_tokens": {}, "mean_flops": {}}
  for g, sel in scores_lib.groups(scores).items():
    out["accuracy"][g] = float(hit[sel].mean())
    out["mean_tokens"][g] = float(np.mean(tokens[sel]))
    out["mean_flops"][g] = float(np.mean(flops[sel]))
  counts = np.bincount(column, minlength=scores["budgets"].size)
  out["budget_counts"] = {str(int(b)): int(c) for b, c in zip(scores["budgets"], counts)}
  return out


def sweep_thresholds(values: np.ndarray, count: int = 41) -> np.ndarray:
  """Ascending thresholds for a sweep: 0, ``count`` quantiles of ``values`` (where the
  decisions change) and ``ABOVE_ONE``."""
  q = np.quantile(np.asarray(values, np.float64).ravel(), np.linspace(0.0, 1.0, count))
  return np.unique(np.concatenate([[0.0], np.clip(q, 0.0, 1.0), [ABOVE_ONE]]))


# ---------------------------------------------------------------- the two policies

def simulate_cascade(scores: dict, thresholds=None, *, ladder=None, confidence: str = "answer_prob",
                     vit_flops: float | None = None) -> dict:
  """The cascade over ``ladder`` (default: every scored budget) at each threshold.

  Args:
    scores: greedy per-example scores (``scores.check``'s arrays; ``vit_flops`` unless given).
    thresholds: default ``sweep_thresholds`` of the ladder's confidences.
  Returns:
    ``{"ladder", "confidence", "points": [point(...) + "threshold"] (thresholds ascending),
    "stop": (t, n) the ladder step each example stopped at, per threshold}``.
  """
  scores = scores_lib.check(scores)
  if confidence not in CONFIDENCES:
    raise ValueError(f"confidence {confidence!r} is unknown; allowed: {', '.join(CONFIDENCES)}")
  ladder = tuple(int(b) for b in (scores["budgets"] if ladder is None else ladder))
  Cascade(ladder, 0.0, confidence)                         # the same checks as online
  cols = columns_of(scores, ladder)
  vit = vit_flops_of(scores) if vit_flops is None else float(vit_flops)
  step_tokens, step_flops = cascade_costs(ladder, scores["flops"][cols], vit)
  conf = scores[confidence][:, cols]
  thresholds = sweep_thresholds(conf) if thresholds is None else np.asarray(thresholds, np.float64)
  points, stops = [], []
  for t in thresholds:
    stop = first_confident(conf, t)
    stops.append(stop)
    points.append(point(scores, cols[stop], step_tokens[stop], step_flops[stop], threshold=float(t)))
  return {"ladder": list(ladder), "confidence": confidence, "points": points,
          "stop": np.stack(stops) if stops else np.zeros((0, conf.shape[0]), np.int64)}


def simulate_router(scores: dict, prob_correct: np.ndarray, thresholds=None, *,
                    router_flops: float = 0.0) -> dict:
  """The router at each threshold: example i at the smallest budget whose predicted
  probability of a correct answer ``prob_correct[i]`` (n, k; columns as ``scores["budgets"]``)
  is >= the threshold, the largest where none is; each example also pays ``router_flops``.

  Returns: ``{"points": [point(...) + "threshold"], "choice": (t, n) columns}``."""
  scores = scores_lib.check(scores)
  prob = np.asarray(prob_correct, np.float64)
  if prob.shape != scores["correct"].shape:
    raise ValueError(f"prob_correct has shape {prob.shape}; expected (examples, budgets) = "
                     f"{scores['correct'].shape}")
  thresholds = sweep_thresholds(prob) if thresholds is None else np.asarray(thresholds, np.float64)
  tokens = scores["budgets"].astype(np.float64)
  points, choices = [], []
  for t in thresholds:
    col = first_confident(prob, t)
    choices.append(col)
    points.append(point(scores, col, tokens[col], scores["flops"][col] + router_flops, threshold=float(t)))
  return {"points": points, "choice": np.stack(choices) if choices else np.zeros((0, prob.shape[0]), np.int64)}


def fixed_points(scores: dict) -> list[dict]:
  """Every example at one budget, for each budget: ``point``s with ``"budget"``."""
  scores = scores_lib.check(scores)
  n = scores["index"].size
  out = []
  for j, b in enumerate(scores["budgets"]):
    col = np.full(n, j)
    out.append(point(scores, col, np.full(n, float(b)), np.full(n, float(scores["flops"][j])), budget=int(b)))
  return out


def oracle_point(scores: dict) -> dict:
  """``scores.oracle``'s choice (the cheapest correct budget) as a ``point``."""
  scores = scores_lib.check(scores)
  col = scores_lib.oracle(scores["correct"])
  return point(scores, col, scores["budgets"][col].astype(np.float64), scores["flops"][col])


# ---------------------------------------------------------------- headline numbers

_COST = {"tokens": "mean_tokens", "flops": "mean_flops"}


def saving_at_accuracy(points: list[dict], reference: dict, *, group: str = "overall",
                       axis: str = "tokens", loss: float = ACCURACY_LOSS) -> dict | None:
  """The cheapest of ``points`` whose accuracy is at most ``loss`` below ``reference``'s
  (a ``point``, e.g. B = 256) and its saving, 1 - its cost / the reference's (mean tokens
  or FLOPs per ``axis``); None if no point is that accurate."""
  key = _COST[axis]
  ok = [p for p in points if p["accuracy"][group] >= reference["accuracy"][group] - loss - 1e-12]
  if not ok:
    return None
  best = min(ok, key=lambda p: (p[key][group], -p["accuracy"][group]))
  return {"saving": 1.0 - best[key][group] / reference[key][group], "cost": best[key][group],
          "accuracy": best["accuracy"][group], "reference_cost": reference[key][group],
          "reference_accuracy": reference["accuracy"][group], **_where(best)}


def gain_at_cost(points: list[dict], fixed: list[dict], *, group: str = "overall",
                 axis: str = "tokens") -> dict | None:
  """The accuracy gain of the best of ``points`` that costs no more (mean tokens or FLOPs)
  than the most accurate fixed budget (ties: the cheaper), over that budget; None if every
  point costs more."""
  key = _COST[axis]
  best_fixed = max(fixed, key=lambda p: (p["accuracy"][group], -p[key][group]))
  ok = [p for p in points if p[key][group] <= best_fixed[key][group] * (1 + 1e-9)]
  if not ok:
    return None
  best = max(ok, key=lambda p: (p["accuracy"][group], -p[key][group]))
  return {"gain": best["accuracy"][group] - best_fixed["accuracy"][group],
          "accuracy": best["accuracy"][group], "cost": best[key][group],
          "fixed_budget": best_fixed["budget"], "fixed_accuracy": best_fixed["accuracy"][group],
          "fixed_cost": best_fixed[key][group], **_where(best)}


def _where(p: dict) -> dict:
  return {k: p[k] for k in ("threshold", "budget") if k in p}


def reference_point(fixed: list[dict], budget: int = REFERENCE_BUDGET) -> dict:
  """The fixed point at ``budget``, else the largest scored budget (``"budget"`` says which)."""
  by_budget = {p["budget"]: p for p in fixed}
  return by_budget.get(int(budget), fixed[-1])


def choose_threshold(points: list[dict], scores: dict, *, reference_budget: int = REFERENCE_BUDGET,
                     axis: str = "tokens") -> float | None:
  """The threshold a deployment would fix from ``scores`` (the training split's): that of the
  cheapest of ``points`` (a sweep on those scores) whose overall accuracy is at most
  ``ACCURACY_LOSS`` below the reference budget's there; None if no point is that accurate."""
  reference = reference_point(fixed_points(scores), reference_budget)
  chosen = saving_at_accuracy(points, reference, axis=axis)
  return None if chosen is None else chosen["threshold"]


def held_out(threshold: float | None, train_points: list[dict], eval_point: dict | None,
             eval_fixed: list[dict], *, reference_budget: int = REFERENCE_BUDGET) -> dict | None:
  """A threshold chosen on the training split (``choose_threshold``) and what it gives on the
  eval examples, against the eval reference budget: ``{"threshold", "train_accuracy",
  "train_tokens", "accuracy", "mean_tokens", "mean_flops", "reference_accuracy",
  "tokens_saving", "flops_saving", "loss"}`` overall; None without a threshold."""
  if threshold is None or eval_point is None:
    return None
  on_train = next(p for p in train_points if p["threshold"] == threshold)
  ref = reference_point(eval_fixed, reference_budget)
  acc, tokens, flops = (eval_point[k]["overall"] for k in ("accuracy", "mean_tokens", "mean_flops"))
  return {"threshold": threshold, "train_accuracy": on_train["accuracy"]["overall"],
          "train_tokens": on_train["mean_tokens"]["overall"], "accuracy": acc, "mean_tokens": tokens,
          "mean_flops": flops, "reference_accuracy": ref["accuracy"]["overall"],
          "tokens_saving": 1.0 - tokens / ref["mean_tokens"]["overall"],
          "flops_saving": 1.0 - flops / ref["mean_flops"]["overall"],
          "loss": ref["accuracy"]["overall"] - acc}


# ---------------------------------------------------------------- the comparison

def compare(scores: dict, *, cascade: dict | None = None, router: dict | None = None,
            reference_budget: int = REFERENCE_BUDGET, held_out_results: dict | None = None) -> dict:
  """Fixed budgets, the oracle and the simulated policies on the same examples, and the
  headline numbers of each policy, per group.

  Args:
    scores: greedy per-example scores (the examples every curve is measured on).
    cascade / router: ``simulate_cascade`` / ``simulate_router`` results on ``scores``.
    held_out_results: ``{policy: held_out(...)}``, thresholds fixed on the training split.
  Returns: ``{"examples", "groups", "reference_budget", "fixed": [points], "oracle": point,
  "cascade": {..., "points"}, "router": {..., "points"}, "headline": {policy: {group:
  {"tokens_saving", "flops_saving", "tokens_gain", "flops_gain"}}}, "held_out": {policy:
  ...}}`` (policy: fixed, oracle, cascade, router; a number is None where no point qualifies).
  """
  scores = scores_lib.check(scores)
  if scores.get("answers") != GREEDY:
    raise ValueError(f"the scores are of the {scores.get('answers', 'teacher-forced target')!r} answers; "
                     f"policies are compared on the greedy answers' scores (parcel_jax.policy_scores): "
                     f"under teacher forcing a wrong answer's probability gives the label away")
  fixed = fixed_points(scores)
  oracle = oracle_point(scores)
  reference = reference_point(fixed, reference_budget)
  policies = {"fixed": fixed, "oracle": [oracle]}
  out = {"examples": int(scores["index"].size), "groups": list(scores_lib.groups(scores)),
         "reference_budget": reference["budget"], "fixed": fixed, "oracle": oracle}
  for name, result in (("cascade", cascade), ("router", router)):
    if result is not None:
      out[name] = {k: v for k, v in result.items() if k not in ("stop", "choice")}
      policies[name] = result["points"]
  out["headline"] = {
      name: {g: {"tokens_saving": saving_at_accuracy(points, reference, group=g, axis="tokens"),
                 "flops_saving": saving_at_accuracy(points, reference, group=g, axis="flops"),
                 "tokens_gain": gain_at_cost(points, fixed, group=g, axis="tokens"),
                 "flops_gain": gain_at_cost(points, fixed, group=g, axis="flops")}
             for g in out["groups"]}
      for name, points in policies.items()}
  if held_out_results is not None:
    out["held_out"] = dict(held_out_results)
  return out


def _row(label: str, p: dict, groups: list[str]) -> str:
  return (f"{label:>16} {p['mean_tokens']['overall']:>8.1f} {p['mean_flops']['overall'] / 1e9:>9.4f} "
          + " ".join(f"{100 * p['accuracy'][g]:>10.1f}" for g in groups))


def _thin(points: list[dict], rows: int) -> list[dict]:
  """At most ``rows`` of ``points``, evenly spread, the first and last kept."""
  if len(points) <= rows:
    return points
  keep = np.unique(np.round(np.linspace(0, len(points) - 1, rows)).astype(int))
  return [points[i] for i in keep]


def format_comparison(result: dict, rows: int = 12) -> str:
  """The comparison as tables (exact match % per group; mean tokens and GFLOPs overall) and
  the headline numbers."""
  groups = result["groups"]
  head = f"{'':>16} {'tokens':>8} {'GFLOPs':>9} " + " ".join(f"{g:>10}" for g in groups)
  lines = [f"exact match % on {result['examples']} examples (greedy answers); mean visual tokens and "
           f"GFLOPs per example, every pass a policy ran counted", head]
  for p in result["fixed"]:
    lines.append(_row(f"B={p['budget']}", p, groups))
  lines.append(_row("oracle", result["oracle"], groups))
  if "cascade" in result:
    c = result["cascade"]
    lines.append(f"cascade over {c['ladder']}, {c['confidence']} >= threshold stops:")
    lines += [_row(f"t={p['threshold']:.4g}", p, groups) for p in _thin(c["points"], rows)]
  if "router" in result:
    r = result["router"]
    lines.append(f"router ({r.get('description', 'learned')}), P(correct) >= threshold picks the budget:")
    lines += [_row(f"t={p['threshold']:.4g}", p, groups) for p in _thin(r["points"], rows)]
  ref = result["reference_budget"]
  lines.append(f"headline (overall): saving at <= {100 * ACCURACY_LOSS:g} point below B={ref}; gain at "
               f"<= the mean cost of the most accurate fixed budget")
  for name, per_group in result["headline"].items():
    h = per_group["overall"]
    lines.append(f"{name:>16} " + "; ".join(_headline_text(h, axis) for axis in ("tokens", "flops")))
  if result.get("held_out"):
    lines.append(f"threshold fixed on the training split (cheapest within {100 * ACCURACY_LOSS:g} point of "
                 f"B={ref} there), applied to these examples:")
    for name, h in result["held_out"].items():
      lines.append(f"{name:>16} " + ("no threshold within 1 point on the training split" if h is None else
                   f"t={h['threshold']:.4g}: EM {100 * h['accuracy']:.1f} vs {100 * h['reference_accuracy']:.1f} "
                   f"at B={ref} ({100 * h['loss']:+.1f} points lost), {h['mean_tokens']:.1f} mean tokens "
                   f"(saving {100 * h['tokens_saving']:.1f}%), GFLOPs saving {100 * h['flops_saving']:.1f}%; "
                   f"train EM {100 * h['train_accuracy']:.1f} at {h['train_tokens']:.1f} tokens"))
  return "\n".join(lines)


def _headline_text(h: dict, axis: str) -> str:
  unit = "tokens" if axis == "tokens" else "GFLOPs"
  scale = 1.0 if axis == "tokens" else 1e-9
  s, g = h[f"{axis}_saving"], h[f"{axis}_gain"]
  saving = ("no point within 1 point" if s is None else
            f"{unit} saving {100 * s['saving']:.1f}% ({s['cost'] * scale:.4g} vs {s['reference_cost'] * scale:.4g}, "
            f"EM {100 * s['accuracy']:.1f} vs {100 * s['reference_accuracy']:.1f})")
  gain = ("no point that cheap" if g is None else
          f"gain {100 * g['gain']:+.1f} points at {g['cost'] * scale:.4g} {unit} vs B={g['fixed_budget']}")
  return f"{saving}, {gain}"


def plot_comparison(result: dict, path: str, families_path: str | None = None) -> None:
  """Exact match vs mean visual tokens and vs mean GFLOPs (PNG at ``path``); with
  ``families_path`` also one panel per family vs mean tokens."""
  import matplotlib
  matplotlib.use("Agg")  # headless
  import matplotlib.pyplot as plt
  from matplotlib import ticker

  budgets = [p["budget"] for p in result["fixed"]]

  def draw(ax, group, key, scale):
    xs = lambda ps: [p[key][group] * scale for p in ps]
    ys = lambda ps: [100 * p["accuracy"][group] for p in ps]
    ax.plot(xs(result["fixed"]), ys(result["fixed"]), "o-", color="k", label="fixed budget")
    ax.plot(xs([result["oracle"]]), ys([result["oracle"]]), "*", color="gold", ms=12, mec="k", label="oracle")
    for name, style in (("cascade", "s-"), ("router", "^-")):
      if name in result:
        pts = sorted(result[name]["points"], key=lambda p: p[key][group])
        ax.plot(xs(pts), ys(pts), style, ms=3, lw=1, label=name)
    ax.set_xscale("log")
    if key == "mean_tokens":   # ticks at the scored budgets
      ax.set_xticks(budgets, [str(b) for b in budgets])
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    else:
      ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
      ax.xaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    ax.grid(alpha=0.3, which="both")
    ax.set_ylabel("exact match (%)")

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  draw(axes[0], "overall", "mean_tokens", 1.0)
  draw(axes[1], "overall", "mean_flops", 1e-9)
  axes[0].set_xlabel("mean visual tokens per example")
  axes[1].set_xlabel("mean GFLOPs per example (Appendix C)")
  axes[0].legend(fontsize=8)
  fig.suptitle(f"Budget policies on {result['examples']} examples")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  families = [g for g in result["groups"] if g != "overall"]
  if families_path and families:
    cols = min(3, len(families))
    rows = -(-len(families) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, g in zip(axes.ravel(), families):
      draw(ax, g, "mean_tokens", 1.0)
      ax.set_title(g)
      ax.set_xlabel("mean visual tokens")
    for ax in axes.ravel()[len(families):]:
      ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(families_path, dpi=110)
    plt.close(fig)
