"""``downsample``: the image itself shrunk to the budget's grid, then the same ViT.

The baseline a user tries instead of a connector (``--config.model.connector.method=downsample``):
for B = g*g (M3's space, ``M3.budget_space``: {4, 16, 64, 256} at grid 16) the image is
averaged over exact (grid/g) x (grid/g)-pixel blocks to g * patch pixels a side and encoded
by the ViT at a g x g grid (``ViT.position_codes`` keeps the full grid's coordinate frame);
its g*g features are the visual tokens, as anchors. Parameter-free, connector cost 0; the ViT
term of the cost model is that of g*g patches (``vision_grid``).

The ViT input depends on the budget (``encodes_per_budget``), so evaluation, generation and
serving encode each budget's features for it. Every bucket holds one budget, so training
draws it per batch, and ``budget.sampling=per_example`` gives every example of a batch that
budget (the bucket's only member).
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp

from parcel_jax.models.connectors import base
from parcel_jax.models.connectors.m3 import M3

Array = jax.Array


def block_mean(images: Array, factor: int) -> Array:
  """(b, S, S, c) -> (b, S / factor, S / factor, c): the mean of each factor x factor block."""
  if factor < 1 or images.shape[1] % factor or images.shape[2] % factor:
    raise ValueError(f"cannot average {images.shape[1]}x{images.shape[2]} images over "
                     f"{factor}x{factor} blocks")
  return einops.reduce(images, "b (h kh) (w kw) c -> b h w c", "mean", kh=factor, kw=factor)


@base.register
class Downsample(base.Connector):
  """The ViT features of the image block-averaged to the budget's grid."""
  name = "downsample"
  encodes_per_budget = True

  @classmethod
  def budget_space(cls, cfg: base.MethodConfig) -> tuple[int, ...]:
    return M3.budget_space(cfg)

  @classmethod
  def route(cls, cfg: base.MethodConfig, budget: int) -> tuple[int, int]:
    return budget, 0

  @classmethod
  def flops(cls, cfg: base.MethodConfig, n_p: int, n_q: int, n_v: int, d: int) -> int:
    return 0

  @classmethod
  def vision_grid(cls, cfg: base.MethodConfig, bucket) -> int:
    return bucket.anchor_grid

  def vision_input(self, images: Array, bucket) -> Array:
    grid = self.vision_grid(self.cfg, bucket)
    if grid < 1 or self.cfg.grid_size % grid:
      raise ValueError(f"bucket {bucket} has no {grid}x{grid} grid dividing the "
                       f"{self.cfg.grid_size}x{self.cfg.grid_size} ViT grid")
    return block_mean(images, self.cfg.grid_size // grid)

  def slot_cells(self, bucket):
    """Each coarse patch at its block of the full grid (``base.pooled_cells``)."""
    return base.pooled_cells(self.cfg.grid_size, self.vision_grid(self.cfg, bucket))

  def __call__(self, features, bucket, budgets):
    del budgets  # every budget of a bucket is its square grid
    g = self.vision_grid(self.cfg, bucket)
    if features.ndim != 4 or features.shape[1:] != (g, g, self.cfg.width):
      raise ValueError(f"method 'downsample' at bucket {bucket} expects the features of the image "
                       f"downsampled to its grid, (batch, {g}, {g}, {self.cfg.width}); got "
                       f"{features.shape} (encode them with VLM.encode_images(images, bucket))")
    tokens = einops.rearrange(features, "b h w d -> b (h w) d")
    return tokens, jnp.ones(tokens.shape[:2], bool)
