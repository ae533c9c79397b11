"""PARCEL: pooled spatial anchors + pool-conditioned elastic queries (PCQR).

Routing (grid = side of the square ViT feature grid), ``routing='piecewise'``: anchor grids
a = 4, 8, 16, ... (< grid); budget B uses the largest a with a*a <= B, and B - a*a queries.
At grid 16: (16, B-16) for 16 <= B < 64 and (64, B-64) for 64 <= B <= 256; at grid 32 a third
regime (256, B-256) for 256 <= B <= 1024. Even budgets from 16 to grid**2. Ablations:
``routing='fixed4x4'`` (16 anchors always) and ``'fixed2x2'`` (a 2x2 pooling kernel, i.e.
(grid/2)**2 anchors always).

Fields of its own (besides the resampler's, ``blocks.ResamplerConfig``):
  routing       piecewise | fixed4x4 | fixed2x2 (above).
  conditioning  how the queries see the anchors: one self-attention over [anchors; queries]
                ['self_attn'], none (ViT-only cross-attention), or 'dual_cross' (cross-attend
                to the anchors, then to the features).
  anchor_pos    position code added to anchors *inside* the conditioning
                ['sincos2d' at the anchor cell centres | 'none']; the emitted anchors stay raw.

Cost (Appendix C, one frame, only when N_q > 0: at B = 16 and 64 it is pure pooling, 0):
  8 B D^2 + 4 B^2 D (self-attention over [anchors; queries]) + 4 (N_q + N_v) D^2
  + 4 N_q N_v D (cross-attention to the grid) + 4 N_q D M (MLP); conditioning='none' drops
  the first term, 'dual_cross' replaces it by 4 (N_q + N_p) D^2 + 4 N_q N_p D.
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parcel_jax import flop_terms
from parcel_jax.models import layers
from parcel_jax.models.connectors import base, blocks

Array = jax.Array

ROUTINGS = ("piecewise", "fixed4x4", "fixed2x2")
ANCHOR_POS = ("sincos2d", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParcelConfig(blocks.ResamplerConfig):
  routing: str = "piecewise"
  conditioning: str = "self_attn"
  anchor_pos: str = "sincos2d"

  def __post_init__(self):
    base.check_choice("routing", self.routing, ROUTINGS)
    base.check_choice("conditioning", self.conditioning, blocks.CONDITIONINGS)
    base.check_choice("anchor_pos", self.anchor_pos, ANCHOR_POS)
    super().__post_init__()


def anchor_grid(budget: int, grid_size: int, routing: str = "piecewise") -> int:
  """Side of the anchor grid PARCEL uses for ``budget`` (see the module docstring)."""
  if routing == "fixed4x4":
    return 4
  if routing == "fixed2x2":
    return grid_size // 2
  side = 4
  while side * 2 < grid_size and (side * 2) ** 2 <= budget:
    side *= 2
  return side


@base.register
class Parcel(base.Connector):
  """Pooled spatial anchors + pool-conditioned elastic queries (PCQR)."""
  name, order, Config = "parcel", 0, ParcelConfig

  @classmethod
  def budget_space(cls, cfg: ParcelConfig) -> tuple[int, ...]:
    grid, full = cfg.grid_size, cfg.grid_size ** 2
    if grid % 4:
      raise ValueError(f"parcel needs a feature grid divisible by 4 for its 4x4 anchors; got grid {grid}")
    lowest = anchor_grid(0, grid, cfg.routing) ** 2
    top = full
    if cfg.bank_size:  # the bank must cover the largest query count
      fits = [b for b in base.even_range(lowest, full)
              if b - anchor_grid(b, grid, cfg.routing) ** 2 <= cfg.bank_size]
      top = min(top, max(fits))
    return base.even_range(lowest, top)

  @classmethod
  def route(cls, cfg: ParcelConfig, budget: int) -> tuple[int, int]:
    anchors = anchor_grid(budget, cfg.grid_size, cfg.routing) ** 2
    return anchors, budget - anchors

  @classmethod
  def bank_size(cls, cfg: ParcelConfig) -> int:
    if cfg.bank_size:
      return cfg.bank_size
    full = dataclasses.replace(cfg, bank_size=0)
    return max(b - cls.route(full, b)[0] for b in cls.budget_space(full))

  @classmethod
  def flops(cls, cfg: ParcelConfig, n_p: int, n_q: int, n_v: int, d: int) -> int:
    if n_q == 0:  # pure pooling: the query path is off
      return 0
    condition = {"self_attn": lambda: flop_terms.self_attention_flops(n_p + n_q, d),
                 "none": lambda: 0,
                 "dual_cross": lambda: flop_terms.cross_attention_flops(n_q, n_p, d)}[cfg.conditioning]()
    return (condition + flop_terms.cross_attention_flops(n_q, n_v, d)
            + flop_terms.mlp_flops(n_q, d, cfg.mlp_dim))

  def __init__(self, cfg: ParcelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.resampler = blocks.QueryResampler(cfg, self.bank_size(cfg), conditioning=cfg.conditioning,
                                           rngs=rngs)

  def __call__(self, features, bucket, budgets):
    self.check_features(features)
    anchors = base.avg_pool(features, bucket.anchor_grid)                     # (b, a, d)
    b = features.shape[0]
    if bucket.query_slots == 0:   # B = 16 or 64: pure pooling, the query path is off
      return anchors, jnp.ones((b, bucket.num_anchors), bool)
    queries, valid = self.resampler(
        einops.rearrange(features, "b h w d -> b (h w) d"), bucket.query_slots,
        budgets - bucket.num_anchors, context=self._context(anchors, bucket))
    tokens = jnp.concatenate([anchors, queries], axis=1)
    return tokens, jnp.concatenate([jnp.ones((b, bucket.num_anchors), bool), valid], axis=1)

  def slot_cells(self, bucket):
    """Anchors at their blocks (``base.pooled_cells``), queries at their home cells; None
    without ``query_prior='local'`` (a query then has no place)."""
    if self.cfg.query_prior != "local":
      return None
    grid = self.cfg.grid_size
    return np.concatenate([base.pooled_cells(grid, bucket.anchor_grid),
                           blocks.query_homes(bucket.query_slots, grid)])

  def _context(self, anchors: Array, bucket) -> Array:
    """What the queries condition on: the anchors (b, a, d), plus their position code."""
    if self.cfg.anchor_pos == "sincos2d":
      return anchors + layers.sincos_2d(bucket.anchor_grid, self.cfg.width,
                                        frame=self.cfg.grid_size).astype(anchors.dtype)
    return anchors

  def query_attention(self, features: Array, bucket, budgets: Array) -> Array:
    """Head-averaged cross-attention of the query slots over the ViT grid (spectral analysis):
    features (b, g, g, d) -> (b, bucket.query_slots, g*g); inactive slots are zero rows."""
    self.check_features(features)
    anchors = base.avg_pool(features, bucket.anchor_grid)
    return self.resampler.cross_attention_weights(
        einops.rearrange(features, "b h w d -> b (h w) d"), bucket.query_slots,
        budgets - bucket.num_anchors, context=self._context(anchors, bucket))
