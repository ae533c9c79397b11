"""M3 (Matryoshka Multimodal Models): nested square average pooling.

Budgets B = s*s for every s >= 2 dividing the grid (the paper's {4, 16, 64, 256} at grid 16);
all anchors, no queries. Parameter-free (cost 0) unless ``extra_self_attn`` adds one
self-attention block over the B pooled tokens (an ablation): 8 B D^2 + 4 B^2 D.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from parcel_jax import flop_terms
from parcel_jax.models.connectors import base, blocks


@dataclasses.dataclass(frozen=True, kw_only=True)
class M3Config(blocks.AttentionConfig):
  extra_self_attn: bool = False   # add a self-attention block over the pooled tokens


@base.register
class M3(base.Connector):
  """Nested square average pooling (Matryoshka Multimodal Models)."""
  name, order, Config = "m3", 1, M3Config

  @classmethod
  def budget_space(cls, cfg: M3Config) -> tuple[int, ...]:
    g = cfg.grid_size
    return tuple(s * s for s in range(2, g + 1) if g % s == 0)

  @classmethod
  def route(cls, cfg: M3Config, budget: int) -> tuple[int, int]:
    return budget, 0

  @classmethod
  def flops(cls, cfg: M3Config, n_p: int, n_q: int, n_v: int, d: int) -> int:
    return flop_terms.self_attention_flops(n_p + n_q, d) if cfg.extra_self_attn else 0

  def __init__(self, cfg: M3Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.self_attn = blocks.Block(cfg, rngs=rngs) if cfg.extra_self_attn else None

  def slot_cells(self, bucket):
    return base.pooled_cells(self.cfg.grid_size, bucket.anchor_grid)

  def __call__(self, features, bucket, budgets):
    self.check_features(features)
    del budgets  # every budget of a bucket is the same square grid
    tokens = base.avg_pool(features, bucket.anchor_grid)
    if self.self_attn is not None:
      tokens = self.self_attn(tokens, None, jnp.ones((1, tokens.shape[1], tokens.shape[1]), bool))
    return tokens, jnp.ones(tokens.shape[:2], bool)
