"""SigLIP-style vision transformer (the PaliGemma image encoder, without its MAP head).

images (b, H, W, 3) -> patch embedding (a linear map of each p x p x 3 patch, with
bias) + position embedding -> ``depth`` pre-LayerNorm blocks (multi-head attention
with biases; GELU-tanh MLP with biases) -> final LayerNorm -> features
(b, grid, grid, width). The connector consumes the features after the final norm,
as PaliGemma's projection does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import einops
import jax
import jax.numpy as jnp
from flax import nnx

from parcel_jax import sharding
from parcel_jax.models import layers

Array = jax.Array

POSEMBS = ("learn", "sincos2d")

# Model sizes by name, the one table of them: ``vit_config(name)``, and ``model.vision.variant``
# in a config (it fills the size fields the config leaves at 0; see ``vlm.preset_sizes``).
# Sizes only: every other field keeps its own default (SigLIP's) or the config's value.
SIZE_FIELDS = ("image_size", "patch_size", "width", "depth", "mlp_dim", "num_heads")
PRESETS: dict[str, dict[str, int]] = {
    # The embedded default (configs/base.py): 64 px / patch 4 keeps the paper's 16 x 16 feature
    # grid. One block: 0.7-0.85x the step time of two, and no slower to learn positions. Few,
    # wide heads: at widths this small the per-head attention maps (masks, softmax, layout
    # copies) cost more than the matmuls.
    "tiny": dict(image_size=64, patch_size=4, width=64, depth=1, mlp_dim=256, num_heads=2),
    # SigLIP So400m/14 (PaliGemma-2); at 224 px a 16 x 16 grid. ``image_size=448`` gives 32 x 32.
    "so400m_14": dict(image_size=224, patch_size=14, width=1152, depth=27, mlp_dim=4304,
                      num_heads=16),
}
# Names configs saved before the presets carried as a label.
_OLD_NAMES = {"So400m/14": "so400m_14"}


def preset(name: str, field: str = "model.vision.variant") -> dict[str, int]:
  """The size fields of preset ``name``; an unknown name is an error naming ``field``."""
  name = _OLD_NAMES.get(name, name)
  if name not in PRESETS:
    raise ValueError(f"{field}={name!r} is not a vision preset; presets: {', '.join(PRESETS)}")
  return dict(PRESETS[name])


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  posemb: str = "learn"        # learn | sincos2d
  center_input: bool = False   # subtract each image's per-channel mean before patchifying
  attn_window: int = 0         # > 0: blocks attend within non-overlapping attn_window^2-patch
                               # windows (ViTDet-style local attention); 0 = global attention
  global_blocks: int = 0       # with attn_window: the last this-many blocks attend globally
  dtype: Any = None            # compute dtype; None = float32
  param_dtype: Any = jnp.float32
  scan: bool = False           # run the blocks as one scanned layer
  remat: str = "none"          # none | full | dots | dots_no_batch

  def __post_init__(self):
    for name in ("image_size", "patch_size", "width", "depth", "mlp_dim", "num_heads"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"ViTConfig.{name}={getattr(self, name)} must be positive")
    if self.image_size % self.patch_size:
      raise ValueError(f"ViTConfig.image_size={self.image_size} must be a multiple of "
                       f"patch_size={self.patch_size}")
    if self.width % self.num_heads:
      raise ValueError(f"ViTConfig.width={self.width} must be a multiple of num_heads={self.num_heads}")
    if self.posemb not in POSEMBS:
      raise ValueError(f"ViTConfig.posemb={self.posemb!r} is unknown; allowed: {', '.join(POSEMBS)}")
    if self.posemb == "sincos2d" and self.width % 4:
      raise ValueError(f"ViTConfig.width={self.width} must be a multiple of 4 for posemb='sincos2d'")
    layers.check_remat(self.remat, "ViTConfig.remat")
    if self.attn_window < 0 or (self.attn_window and self.grid_size % self.attn_window):
      raise ValueError(f"ViTConfig.attn_window={self.attn_window} must be 0 (global) or divide the "
                       f"feature grid {self.grid_size}")
    if not 0 <= self.global_blocks <= self.depth:
      raise ValueError(f"ViTConfig.global_blocks={self.global_blocks} must be in [0, depth={self.depth}]")
    if self.scan and self.attn_window and 0 < self.global_blocks < self.depth:
      raise ValueError("ViTConfig.global_blocks mixes local and global blocks, which scan=True "
                       "cannot run as one layer; use scan=False")

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


def vit_config(name: str, **overrides) -> ViTConfig:
  """Preset ``name`` with ``overrides`` (any ViTConfig field) on top."""
  return ViTConfig(**{**preset(name, "vision preset"), **overrides})


class ViTBlock(nnx.Module):
  """Pre-LN encoder block: x + MHA(LN(x)); x + MLP(LN(x)). (b, n, width) -> same."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    kw = dict(param_dtype=cfg.param_dtype, rngs=rngs)
    self.norm1 = layers.layer_norm(cfg.width, **kw)
    self.attn = layers.Attention(cfg.width, cfg.num_heads, cfg.head_dim, use_bias=True,
                                 dtype=cfg.dtype, **kw)
    self.norm2 = layers.layer_norm(cfg.width, **kw)
    self.mlp = layers.Mlp(cfg.width, cfg.mlp_dim, gated=False, use_bias=True, dtype=cfg.dtype, **kw)

  def __call__(self, x: Array) -> Array:
    # LayerNorm statistics are float32; the residual stream stays in the compute dtype.
    x = x + self.attn(self.norm1(x)).astype(x.dtype)
    return sharding.constrain(x + self.mlp(self.norm2(x)).astype(x.dtype), layers.BTD)


def _run_block(block: ViTBlock, x: Array) -> tuple[Array, None]:
  return block(x), None


class ViT(nnx.Module):
  """images (b, image_size, image_size, 3) -> features (b, grid, grid, width)."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    p, w = cfg.patch_size, cfg.width
    # A p x p stride-p convolution is a linear map of each flattened patch; keeping the
    # (p, p, 3, width) kernel layout matches conv checkpoints.
    self.patch_kernel = nnx.Param(layers.param_init(
        nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                          in_axis=(0, 1, 2), out_axis=3),
        (None, None, None, "embed"))(rngs.params(), (p, p, 3, w), cfg.param_dtype))
    self.patch_bias = nnx.Param(layers.param_init(nnx.initializers.zeros, ("embed",))(
        rngs.params(), (w,), cfg.param_dtype))
    if cfg.posemb == "learn":
      self.posemb = nnx.Param(layers.param_init(nnx.initializers.normal(w ** -0.5), ("tokens", "embed"))(
          rngs.params(), (cfg.grid_size ** 2, w), cfg.param_dtype))
    else:  # fixed sincos2d codes, computed on the fly
      self.posemb = None
    make = lambda r: ViTBlock(cfg, rngs=r)
    if cfg.scan:
      self.blocks = layers.create_stack(make, cfg.depth, rngs)
    else:
      self.blocks = nnx.List([make(rngs) for _ in range(cfg.depth)])
    self.norm = layers.layer_norm(w, param_dtype=cfg.param_dtype, rngs=rngs)

  def position_codes(self, grid: int) -> Array:
    """(grid**2, width) position codes, raster order. Below the full grid (a coarser patching
    of a downsampled image) each coarse patch keeps the full grid's coordinate frame: the
    learned table is block-averaged (the mean over the fine patches it covers) and the sin-cos
    codes sit at the coarse patches' centres on the full grid."""
    cfg, full = self.cfg, self.cfg.grid_size
    if grid == full:
      return self.posemb[...] if self.posemb is not None else layers.sincos_2d(full, cfg.width)
    if grid < 1 or full % grid:
      raise ValueError(f"the ViT cannot run at a {grid}x{grid} grid: it must divide its "
                       f"{full}x{full} grid (model.vision.image_size / model.vision.patch_size)")
    if self.posemb is None:
      return layers.sincos_2d(grid, cfg.width, frame=full)
    table = self.posemb[...].reshape(full, full, cfg.width)
    return einops.reduce(table, "(h kh) (w kw) d -> (h w) d", "mean", kh=full // grid, kw=full // grid)

  def embed_patches(self, images: Array, grid: int | None = None) -> Array:
    """(b, grid * patch, grid * patch, 3) -> (b, grid * grid, width), raster order, position
    code added; ``grid`` None: the full grid."""
    cfg, p = self.cfg, self.cfg.patch_size
    g = grid or cfg.grid_size
    dtype = cfg.dtype or jnp.float32
    b = images.shape[0]
    patches = images.astype(dtype).reshape(b, g, p, g, p, 3)
    x = jnp.einsum("bipjqc,pqcd->bijd", patches, self.patch_kernel[...].astype(dtype))
    x = x.reshape(b, g * g, cfg.width) + self.patch_bias[...].astype(dtype)
    return sharding.constrain(x + self.position_codes(g).astype(dtype), layers.BTD)

  def _windows(self, x: Array, g: int) -> Array:
    """(b, g*g, d) raster -> (b * windows, window^2, d). Windows become batch entries: every
    block op but attention is per token, so whole blocks on windows are local attention, at
    (window^2 / g^2) of global attention's cost."""
    k = self.cfg.attn_window
    return einops.rearrange(x, "b (h kh w kw) d -> (b h w) (kh kw) d", kh=k, kw=k, h=g // k)

  def _unwindows(self, x: Array, g: int) -> Array:
    k = self.cfg.attn_window
    return einops.rearrange(x, "(b h w) (kh kw) d -> b (h kh w kw) d", kh=k, h=g // k, w=g // k)

  def __call__(self, images: Array, grid: int | None = None) -> Array:
    """images (b, S, S, 3) -> features (b, g, g, width). ``grid`` None: S = image_size and g
    the full grid; else S = grid * patch_size (a downsampled image, fewer and coarser patches:
    ``position_codes``) and g = ``grid``."""
    cfg = self.cfg
    g = grid or cfg.grid_size
    size = g * cfg.patch_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
      raise ValueError(f"ViT expects images (batch, {size}, {size}, 3) at a {g}x{g} grid, "
                       f"got shape {tuple(images.shape)}")
    if cfg.attn_window and g % cfg.attn_window:
      raise ValueError(f"model.vision.attn_window={cfg.attn_window} does not divide the {g}x{g} "
                       "grid the ViT runs at; use a window dividing every grid, or 0 (global)")
    if cfg.center_input:
      # From scratch, a per-image colour cast dominates every token (measured: ~99 % of the
      # projected tokens' variance on the synthetic task) and hides position and objects.
      images = images - jnp.mean(images, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(images.dtype)
    x = self.embed_patches(images, g)
    # Blocks [0, num_local) run on windows; scan=True only allows all of them or none.
    num_local = cfg.depth - cfg.global_blocks if cfg.attn_window else 0
    if num_local:
      x = self._windows(x, g)
    run = layers.maybe_remat(_run_block, cfg.remat)
    if cfg.scan:
      x, _ = nnx.scan(lambda c, blk: run(blk, c), in_axes=(nnx.Carry, 0),
                      out_axes=(nnx.Carry, 0))(x, self.blocks)
    else:
      for i, block in enumerate(self.blocks):
        if num_local and i == num_local:   # the first global block
          x = self._unwindows(x, g)
        x, _ = run(block, x)
    if num_local == cfg.depth:
      x = self._unwindows(x, g)
    x = self.norm(x).astype(x.dtype)
    out = x.reshape(images.shape[0], g, g, cfg.width)
    chex.assert_shape(out, (images.shape[0], g, g, cfg.width))
    return out


# ------------------------------------------------------ scanned <-> per-layer params

def to_scanned(params: dict, cfg: ViTConfig) -> dict:
  """Pure-dict params of a ``scan=False`` ViT -> the ``scan=True`` layout."""
  blocks = [params["blocks"][i] for i in range(cfg.depth)]
  return {**params, "blocks": layers.stack_trees(blocks)}


def from_scanned(params: dict, cfg: ViTConfig) -> dict:
  """Inverse of ``to_scanned``."""
  return {**params, "blocks": dict(enumerate(layers.unstack_tree(params["blocks"], cfg.depth)))}
