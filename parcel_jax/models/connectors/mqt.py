"""MQT (Matryoshka Query Transformer): the first B queries of an ordered bank, one
cross-attention block to the ViT grid and one MLP; no anchors.

Budgets: even B from 2 to min(grid**2, bank_size). The bank holds grid**2 queries unless
``bank_size`` says otherwise. Cost (one frame, our accounting with the paper's terms):
4 (B + N_v) D^2 + 4 B N_v D + 4 B D M, plus 8 B D^2 + 4 B^2 D with ``extra_self_attn``
(one self-attention over the queries before the cross-attention: an ablation).
"""

from __future__ import annotations

import dataclasses

import einops
import jax
from flax import nnx

from parcel_jax import flop_terms
from parcel_jax.models.connectors import base, blocks

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class MQTConfig(blocks.ResamplerConfig):
  extra_self_attn: bool = False   # the queries self-attend before the cross-attention


@base.register
class MQT(base.Connector):
  """Matryoshka Query Transformer: an ordered query bank + one cross-attention block."""
  name, order, Config = "mqt", 2, MQTConfig

  @classmethod
  def budget_space(cls, cfg: MQTConfig) -> tuple[int, ...]:
    full = cfg.grid_size ** 2
    return base.even_range(2, min(full, cfg.bank_size) if cfg.bank_size else full)

  @classmethod
  def route(cls, cfg: MQTConfig, budget: int) -> tuple[int, int]:
    return 0, budget

  @classmethod
  def bank_size(cls, cfg: MQTConfig) -> int:
    return cfg.bank_size or cfg.grid_size ** 2

  @classmethod
  def flops(cls, cfg: MQTConfig, n_p: int, n_q: int, n_v: int, d: int) -> int:
    out = flop_terms.cross_attention_flops(n_q, n_v, d) + flop_terms.mlp_flops(n_q, d, cfg.mlp_dim)
    return out + (flop_terms.self_attention_flops(n_p + n_q, d) if cfg.extra_self_attn else 0)

  def __init__(self, cfg: MQTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.resampler = blocks.QueryResampler(
        cfg, self.bank_size(cfg), conditioning="self_attn" if cfg.extra_self_attn else "none", rngs=rngs)

  def __call__(self, features, bucket, budgets):
    self.check_features(features)
    flat = einops.rearrange(features, "b h w d -> b (h w) d")
    return self.resampler(flat, bucket.query_slots, budgets)

  def slot_cells(self, bucket):
    """Queries at their home cells with ``query_prior='local'``, else None."""
    if self.cfg.query_prior != "local":
      return None
    return blocks.query_homes(bucket.query_slots, self.cfg.grid_size)

  def query_attention(self, features: Array, bucket, budgets: Array) -> Array:
    """As ``Parcel.query_attention``: (b, g, g, d) -> (b, bucket.query_slots, g*g)."""
    self.check_features(features)
    flat = einops.rearrange(features, "b h w d -> b (h w) d")
    return self.resampler.cross_attention_weights(flat, bucket.query_slots, budgets)
