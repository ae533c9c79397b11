"""Visual-token budgets: the one place for budget spaces, routing, buckets and sampling.

Vocabulary:
  budget   B, the number of visual tokens the LLM sees.
  route    B -> (num_anchors, num_queries): pooled anchors + learned queries.
  bucket   a static shape (anchor grid, query slots) that serves a range of budgets.
           Slots beyond an example's budget are masked, so every budget in a bucket
           shares one compiled program (see ``VLM`` for the masking contract).
  sampler  a pure function of (seed, step): every host draws the same budget with
           no communication, and a resumed run draws the same sequence.

Each method's budget space and routing are its own (``models/connectors/<method>.py``,
class methods ``budget_space`` and ``route`` of its class); this module asks the method and
holds nothing per method (grid = side of the square ViT feature grid):
  parcel   even B from 16 to grid**2: (16, B-16) for 16 <= B < 64, (64, B-64) for
           64 <= B <= 256 at grid 16 (routing='piecewise'; fixed4x4 / fixed2x2 ablations).
  m3       pure pooling, B = s*s for s dividing grid, s >= 2 (the paper's {4,16,64,256}).
  mqt      pure queries, even B from 2 to min(grid**2, bank size).
  none     all grid tokens, B = grid**2.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from parcel_jax.models import connectors

METHODS = connectors.method_names()   # every registered method, the paper's first
DISTRIBUTIONS = ("uniform", "log_uniform")
SAMPLING_MODES = ("per_batch", "per_example", "all_scales")


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
  """A static token layout: ``anchor_grid**2`` pooled anchors then ``query_slots`` queries."""
  anchor_grid: int
  query_slots: int

  @property
  def num_anchors(self) -> int:
    return self.anchor_grid * self.anchor_grid

  @property
  def num_slots(self) -> int:
    return self.num_anchors + self.query_slots

  def __str__(self) -> str:
    return f"{self.anchor_grid}x{self.anchor_grid}+{self.query_slots}q"


def _fail(method: str, budget, allowed: Sequence[int], why: str = "") -> ValueError:
  shown = _describe(allowed)
  return ValueError(f"budget {budget!r} is not valid for method {method!r}{why}; allowed budgets: {shown}")


def _describe(allowed: Sequence[int]) -> str:
  allowed = list(allowed)
  if len(allowed) > 6 and all(b - a == 2 for a, b in zip(allowed, allowed[1:])):
    return f"even integers {allowed[0]}..{allowed[-1]}"
  return "{" + ", ".join(map(str, allowed)) + "}"


def space_of(cfg: connectors.MethodConfig) -> tuple[int, ...]:
  """Every budget the method of ``cfg`` (a method config, ``connectors.method_config``) serves."""
  return connectors.method_class(cfg.method).budget_space(cfg)


def route_of(cfg: connectors.MethodConfig, budget, allowed: Sequence[int] | None = None
             ) -> tuple[int, int]:
  """Splits ``budget`` into (num_anchors, num_queries) for the method of ``cfg``.

  Raises ValueError naming the method and its allowed budgets (``allowed``, default its
  whole space) when ``budget`` is not an integer among them.
  """
  allowed = space_of(cfg) if allowed is None else allowed
  if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
    raise _fail(cfg.method, budget, allowed, " (budgets are integers)")
  budget = int(budget)
  if budget not in allowed:
    odd = budget % 2 and (budget - 1 in allowed or budget + 1 in allowed)
    raise _fail(cfg.method, budget, allowed, " (odd)" if odd else "")
  return connectors.method_class(cfg.method).route(cfg, budget)


def budget_space(method: str, grid_size: int, *, routing: str = "piecewise",
                 bank_size: int | None = None, **fields) -> tuple[int, ...]:
  """Every budget ``method`` supports at a ``grid_size`` x ``grid_size`` feature grid
  (``fields``: other ``model.connector`` fields of the method)."""
  return space_of(connectors.method_config(method, grid_size=grid_size, routing=routing,
                                           bank_size=bank_size or 0, **fields))


def validate_method(method: str, routing: str = "piecewise", **fields) -> None:
  """Raises ValueError naming the field when ``method`` or one of its fields is unknown."""
  connectors.method_config(method, grid_size=0, routing=routing, **fields)


def route(method: str, budget: int, grid_size: int, routing: str = "piecewise",
          **fields) -> tuple[int, int]:
  """Splits ``budget`` into (num_anchors, num_queries) for ``method`` (see ``route_of``)."""
  return route_of(connectors.method_config(method, grid_size=grid_size, routing=routing, **fields),
                  budget)


@dataclasses.dataclass(frozen=True)
class BudgetSpec:
  """Budgets of one connector configuration: space, routing, buckets, sampler.

  Attributes:
    method, grid_size, routing: as in ``route``.
    budgets: the trained/evaluated space (a subset of the method's space, e.g. a
      pooling specialist trains at one budget).
    query_bucket: query slots are rounded up to a multiple of this (capped at the
      regime's maximum), trading padding compute for fewer compiled programs.
    method_cfg: the method's config (``connectors.method_config``) its routing reads;
      None = built from ``method``, ``grid_size`` and ``routing``.
  """
  method: str
  grid_size: int
  budgets: tuple[int, ...]
  routing: str = "piecewise"
  query_bucket: int = 64
  method_cfg: connectors.MethodConfig | None = None

  def __post_init__(self):
    if self.method_cfg is None:
      object.__setattr__(self, "method_cfg", connectors.method_config(
          self.method, grid_size=self.grid_size, routing=self.routing))

  @classmethod
  def from_config(cls, connector_cfg, grid_size: int) -> "BudgetSpec":
    c = connector_cfg
    method_cfg = connectors.config_from_section(c, grid_size=grid_size)
    full = space_of(method_cfg)
    chosen = tuple(c.budgets) if c.get("budgets") else full
    bad = [b for b in chosen if b not in full]
    if bad:
      raise ValueError(f"model.connector.budgets has {bad} outside the space of method "
                       f"{c.method!r} at grid {grid_size} (bank {c.get('bank_size')}): {_describe(full)}")
    if c.query_bucket < 1:
      raise ValueError(f"model.connector.query_bucket must be >= 1, got {c.query_bucket}")
    return cls(c.method, grid_size, tuple(sorted(set(chosen))), c.get("routing", "piecewise"),
               c.query_bucket, method_cfg)

  def route(self, budget: int) -> tuple[int, int]:
    if budget not in self.budgets:
      raise _fail(self.method, budget, self.budgets, " for this configuration")
    return route_of(self.method_cfg, budget, self.budgets)

  def bucket(self, budget: int) -> Bucket:
    """The static layout that serves ``budget``."""
    anchors, queries = self.route(budget)
    anchor_grid = math.isqrt(anchors)
    if queries == 0:
      return Bucket(anchor_grid, 0)
    regime_max = max(self.route(b)[1] for b in self.budgets if self.route(b)[0] == anchors)
    slots = min(-(-queries // self.query_bucket) * self.query_bucket, regime_max)
    return Bucket(anchor_grid, slots)

  def compact_bucket(self, budget: int) -> Bucket:
    """The exact layout of ``budget`` (no padding): what inference and evaluation run."""
    anchors, queries = self.route(budget)
    return Bucket(math.isqrt(anchors), queries)

  def encoding_bucket(self, budget: int) -> Bucket | None:
    """What the ViT features for ``budget`` depend on besides the image, for
    ``VLM.encode_images``: None when one encoding serves every budget; the compact bucket
    when the method encodes per budget (``Connector.encodes_per_budget``). Callers that
    encode once and score many budgets (evaluation, generation, serving) encode once per
    distinct value, and a feature cache keys on it."""
    return self.compact_bucket(budget) if self.encodes_per_budget else None

  @property
  def encodes_per_budget(self) -> bool:
    """Whether the ViT features depend on the budget (``Connector.encodes_per_budget``)."""
    return connectors.method_class(self.method).encodes_per_budget

  @property
  def buckets(self) -> tuple[Bucket, ...]:
    return tuple(sorted({self.bucket(b) for b in self.budgets}))

  @property
  def max_queries(self) -> int:
    return max(self.route(b)[1] for b in self.budgets)


def _step_rng(seed: int, step: int, stream: int) -> np.random.Generator:
  # Philox-style counter seeding: a pure function of (seed, step), independent per stream.
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), stream])


def _weights(budgets: Sequence[int], distribution: str) -> np.ndarray:
  if distribution == "uniform":
    w = np.ones(len(budgets))
  elif distribution == "log_uniform":  # uniform in log B: favours small budgets
    b = np.asarray(budgets, np.float64)
    edges = np.log(np.concatenate([b[:1], (b[1:] + b[:-1]) / 2, b[-1:]]))
    w = np.maximum(np.diff(edges), 1e-12)
  else:
    raise ValueError(f"budget.distribution={distribution!r} is unknown; allowed: {', '.join(DISTRIBUTIONS)}")
  return w / w.sum()


def ramp_fraction(config) -> float:
  """``budget.ramp_fraction``; configs saved before the field existed have no curriculum (0)."""
  return config.budget.get("ramp_fraction", 0.0)


def ramp_steps(config) -> int:
  """Length in steps of the budget curriculum: ``budget.ramp_fraction`` of ``train.num_steps``
  (the schedule's length, so a resumed or ``stop_at`` run ramps identically)."""
  return int(round(ramp_fraction(config) * config.train.num_steps))


def budget_cap(spec: BudgetSpec, step: int, ramp_steps: int = 0) -> int:
  """The largest budget open at ``step``. With ``ramp_steps`` > 0 it rises geometrically from
  the smallest budget (step 0) to the largest (step ``ramp_steps`` on); 0 = all open."""
  lo, hi = spec.budgets[0], spec.budgets[-1]
  if ramp_steps <= 0 or step >= ramp_steps:
    return hi
  cap = lo * (hi / lo) ** (step / ramp_steps)
  return max(b for b in spec.budgets if b <= cap + 1e-9)


def _open_weights(spec: BudgetSpec, step: int, distribution: str, ramp_steps: int):
  """Budgets open at ``step`` (a prefix of the sorted space) and their sampling probabilities."""
  w = _weights(spec.budgets, distribution)
  cap = budget_cap(spec, step, ramp_steps)
  if cap == spec.budgets[-1]:
    return spec.budgets, w  # exactly the un-ramped draw
  n = spec.budgets.index(cap) + 1
  return spec.budgets[:n], w[:n] / w[:n].sum()


def _draw(spec: BudgetSpec, seed: int, step: int, distribution: str, ramp_steps: int):
  """The step's budget, and the open budgets and probabilities it was drawn from."""
  budgets, p = _open_weights(spec, step, distribution, ramp_steps)
  return int(_step_rng(seed, step, 0).choice(budgets, p=p)), budgets, p


def sample_budget(spec: BudgetSpec, seed: int, step: int, distribution: str = "uniform",
                  ramp_steps: int = 0) -> int:
  """The step's budget: a pure function of (seed, step), drawn from the budgets open at
  ``step`` (``budget_cap``) with ``distribution`` renormalised over them."""
  return _draw(spec, seed, step, distribution, ramp_steps)[0]


def sample_step(spec: BudgetSpec, seed: int, step: int, batch_size: int, *,
                mode: str = "per_batch", distribution: str = "uniform",
                ramp_steps: int = 0) -> tuple[Bucket, np.ndarray]:
  """The step's static bucket and per-example budgets (batch_size,) int32.

  ``all_scales`` (M3's original objective): every budget each step (the ramp does not apply), as a
  tuple of (bucket, budget) pairs for ``train_step.make_train_step`` (whose loss is then the
  mean over them) and the largest budget per example.

  ``per_batch``: one budget for the whole batch. ``per_example``: the step's bucket
  is chosen by a batch-level draw (so shapes stay static), then every example draws
  its own budget among the open budgets of that bucket; the marginal per example is the
  configured distribution. ``ramp_steps``: see ``budget_cap``.
  """
  if mode not in SAMPLING_MODES:
    raise ValueError(f"budget.sampling={mode!r} is unknown; allowed: {', '.join(SAMPLING_MODES)}")
  lead, budgets, weights = _draw(spec, seed, step, distribution, ramp_steps)
  if mode == "all_scales":  # no draw, no ramp: every budget each step, in one program
    scales = tuple((spec.bucket(b), int(b)) for b in spec.budgets)
    return scales, np.full((batch_size,), spec.budgets[-1], np.int32)
  bucket = spec.bucket(lead)
  if mode == "per_batch":
    return bucket, np.full((batch_size,), lead, np.int32)
  members = [b for b in budgets if spec.bucket(b) == bucket]
  p = weights[[budgets.index(b) for b in members]]
  rng = _step_rng(seed, step, 1)
  return bucket, rng.choice(members, size=batch_size, p=p / p.sum()).astype(np.int32)
