"""``random_subset``: B of the grid*grid ViT tokens, the first B of one fixed random order.

A parameter-free token-selection baseline (``--config.model.connector.method=random_subset``).
The order is drawn once from ``subset_seed``, so smaller budgets keep a prefix of the tokens
larger ones keep: one checkpoint serves every budget, even B from 2 to grid**2, as query
slots (no anchors) masked beyond each example's budget. Cost 0 (a gather).
"""

from __future__ import annotations

import dataclasses

import einops
import jax
import jax.numpy as jnp
import numpy as np

from parcel_jax.models.connectors import base

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class RandomSubsetConfig(base.MethodConfig):
  subset_seed: int = 0   # which fixed order of the grid tokens


@base.register
class RandomSubset(base.Connector):
  """The first B tokens of a fixed random permutation of the ViT grid."""
  name, Config = "random_subset", RandomSubsetConfig

  @classmethod
  def budget_space(cls, cfg: RandomSubsetConfig) -> tuple[int, ...]:
    return base.even_range(2, cfg.grid_size ** 2)

  @classmethod
  def route(cls, cfg: RandomSubsetConfig, budget: int) -> tuple[int, int]:
    return 0, budget

  @classmethod
  def flops(cls, cfg: RandomSubsetConfig, n_p: int, n_q: int, n_v: int, d: int) -> int:
    return 0

  def token_order(self) -> np.ndarray:
    """(grid*grid,) the token order, raster indices; a constant of the config, not a parameter."""
    return np.random.default_rng(self.cfg.subset_seed).permutation(self.cfg.grid_size ** 2)

  def slot_cells(self, bucket):
    return self.token_order()[:bucket.query_slots].astype(np.int32)

  def __call__(self, features, bucket, budgets):
    self.check_features(features)
    keep = self.token_order()[:bucket.query_slots]
    tokens = einops.rearrange(features, "b h w d -> b (h w) d")[:, keep]   # (b, slots, d)
    valid = jnp.arange(bucket.query_slots)[None, :] < budgets[:, None]
    return jnp.where(valid[..., None], tokens, 0.0), valid

  def query_attention(self, features: Array, bucket, budgets: Array) -> Array:
    """Each kept token's slot 'attends' to its own grid cell only: (b, slots, g*g) one-hot rows,
    inactive slots zero (what the spectral analysis reads for query methods)."""
    self.check_features(features)
    keep = self.token_order()[:bucket.query_slots]
    valid = jnp.arange(bucket.query_slots)[None, :] < budgets[:, None]
    return jnp.where(valid[..., None], jax.nn.one_hot(keep, self.cfg.grid_size ** 2), 0.0)
