"""``none``: every grid token, B = grid**2 (the uncompressed reference every retention number
is relative to). Parameter-free, cost 0."""

from __future__ import annotations

import einops
import jax.numpy as jnp
import numpy as np

from parcel_jax.models.connectors import base


@base.register
class Uncompressed(base.Connector):
  """Every grid token (the reference every retention number is relative to)."""
  name, order = "none", 3

  @classmethod
  def budget_space(cls, cfg: base.MethodConfig) -> tuple[int, ...]:
    return (cfg.grid_size ** 2,)

  @classmethod
  def route(cls, cfg: base.MethodConfig, budget: int) -> tuple[int, int]:
    return budget, 0

  @classmethod
  def flops(cls, cfg: base.MethodConfig, n_p: int, n_q: int, n_v: int, d: int) -> int:
    return 0

  def slot_cells(self, bucket):
    del bucket
    return np.arange(self.cfg.grid_size ** 2, dtype=np.int32)

  def __call__(self, features, bucket, budgets):
    self.check_features(features)
    del bucket, budgets
    tokens = einops.rearrange(features, "b h w d -> b (h w) d")
    return tokens, jnp.ones(tokens.shape[:2], bool)
