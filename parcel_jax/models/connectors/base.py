"""The connector interface, the method registry, and what every method's config holds.

A method is one class in one module of this package::

    @base.register
    class Subset(base.Connector):
      name = "subset"                    # the value of model.connector.method
      Config = SubsetConfig              # frozen dataclass of the model.connector fields it reads

      @classmethod
      def budget_space(cls, cfg): ...    # every budget it serves, sorted
      @classmethod
      def route(cls, cfg, budget): ...   # budget (in the space) -> (num_anchors, num_queries)
      @classmethod
      def flops(cls, cfg, n_p, n_q, n_v, d): ...   # one frame, Appendix C accounting
      def __call__(self, features, bucket, budgets): ...

The package imports every module in it, so the class is found with no edit elsewhere;
``budgets.py`` and ``flops.py`` ask the class, they hold no per-method branch.

Token layout is always ``[anchors (num_anchors, raster order); query slots]``; query slot ``i``
of an example is valid iff ``i < budget - num_anchors``. ``num_anchors`` must be a square (the
bucket stores its side).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Sequence

import chex
import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

SHARED = "shared"   # dataclass field metadata key, see ``shared``


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodConfig:
  """What every method's config holds: its name and what the model gives it (not the
  ``model.connector`` section). Subclasses add the section's fields the method reads."""
  method: str
  grid_size: int                # side of the ViT feature grid
  width: int = 0                # the ViT width; the connector runs at it (0: only budgets / FLOPs asked)
  dtype: object = None
  param_dtype: object = jnp.float32


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(MethodConfig))


def shared(default):
  """A field every connector with attention has (heads, MLP width). Configs set it once for
  all methods (the paper's recipe, the tests' tiny sizes), so a method that does not read it
  ignores it rather than refusing it; any other field of another method is refused."""
  return dataclasses.field(default=default, metadata={SHARED: True})


def check_choice(field: str, value, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(f"model.connector.{field}={value!r} is unknown; allowed: {', '.join(allowed)}")


def avg_pool(features: Array, out_grid: int) -> Array:
  """(b, g, g, d) -> (b, out_grid**2, d): non-overlapping average pooling, raster order."""
  g = features.shape[1]
  if out_grid < 1 or g % out_grid:
    raise ValueError(f"cannot average-pool a {g}x{g} feature grid to {out_grid}x{out_grid}")
  k = g // out_grid
  return einops.reduce(features, "b (h kh) (w kw) d -> b (h w) d", "mean", kh=k, kw=k)


def pooled_cells(grid: int, side: int) -> np.ndarray:
  """(side*side,) raster cells standing for the tokens of ``avg_pool(., side)``: the patch just
  below and right of each block's centre (the block itself when side == grid). At side =
  grid / 2 that is each 2x2 block's bottom-right patch, the one cell the first 3/4 of the
  query homes (``blocks.query_homes``) leave out."""
  k = grid // side
  rows, cols = np.divmod(np.arange(side * side), side)
  return ((rows * k + k // 2) * grid + cols * k + k // 2).astype(np.int32)


def even_range(low: int, high: int) -> tuple[int, ...]:
  """Even budgets low..high (both even)."""
  return tuple(range(low, high + 1, 2))


class Connector(nnx.Module):
  """One elastic connector method: the module and, as class methods, its budget mechanics.

  ``tokens, mask = connector(features, bucket, budgets)``: features (batch, grid, grid, width);
  bucket a static ``budgets.Bucket``; budgets (batch,) int32 -> tokens (batch, bucket.num_slots,
  width), mask (batch, num_slots). Invalid slots are zero and receive zero gradient.
  """
  name: ClassVar[str] = ""
  Config: ClassVar[type[MethodConfig]] = MethodConfig
  order: ClassVar[int] = 100    # place in listings (``budgets.METHODS``); then by name
  # False: the ViT features of an image serve every budget (evaluation, generation and serving
  # encode it once). True: the ViT input depends on the bucket (``vision_grid``,
  # ``vision_input``), so each budget's features are encoded for it.
  encodes_per_budget: ClassVar[bool] = False

  def __init__(self, cfg: MethodConfig, *, rngs: nnx.Rngs):
    del rngs
    self.cfg = cfg

  @classmethod
  def budget_space(cls, cfg: MethodConfig) -> tuple[int, ...]:
    """Every budget the method serves at ``cfg.grid_size`` (and its query bank), sorted."""
    raise NotImplementedError

  @classmethod
  def route(cls, cfg: MethodConfig, budget: int) -> tuple[int, int]:
    """``budget`` (already checked to be in the space) -> (num_anchors, num_queries)."""
    raise NotImplementedError

  @classmethod
  def bank_size(cls, cfg: MethodConfig) -> int:
    """Learned queries the module holds (0: none)."""
    del cfg
    return 0

  @classmethod
  def flops(cls, cfg: MethodConfig, n_p: int, n_q: int, n_v: int, d: int) -> int:
    """One frame through the connector at the vision width ``d``: ``n_p`` anchors, ``n_q``
    queries, ``n_v`` ViT tokens (``flops.py``'s conventions)."""
    raise NotImplementedError

  @classmethod
  def vision_grid(cls, cfg: MethodConfig, bucket) -> int:
    """Side of the grid the ViT runs at for ``bucket``: the full grid unless the method
    encodes per budget."""
    del bucket
    return cfg.grid_size

  def vision_input(self, images: Array, bucket) -> Array:
    """The images the ViT encodes for ``bucket``, (b, S, S, 3) -> (b, s, s, 3) with
    s = ``vision_grid`` x patch size; only asked when ``encodes_per_budget``."""
    raise NotImplementedError(f"method {self.name!r} encodes once for every budget")

  def slot_cells(self, bucket) -> np.ndarray | None:
    """(bucket.num_slots,) int: the raster cell of the feature grid each slot stands for,
    read by ``model.visual_positions='spatial'``; None when the method's slots have no place
    on the grid (learned queries without a home)."""
    del bucket
    return None

  def check_features(self, features: Array) -> None:
    chex.assert_rank(features, 4)
    cfg = self.cfg
    if features.shape[1:] != (cfg.grid_size, cfg.grid_size, cfg.width):
      raise ValueError(f"connector expects features (batch, {cfg.grid_size}, {cfg.grid_size}, "
                       f"{cfg.width}), got {features.shape}")

  def query_attention(self, features: Array, bucket, budgets: Array) -> Array:
    """Head-averaged attention of the query slots over the ViT grid (spectral analysis):
    (b, g, g, d) -> (b, bucket.query_slots, g*g); methods with queries define it."""
    raise ValueError(f"method {self.name!r} has no query attention to analyse")


_REGISTRY: dict[str, type[Connector]] = {}
_REQUIRED = ("budget_space", "route", "flops", "__call__")


def register(cls: type[Connector]) -> type[Connector]:
  """Class decorator: makes ``cls`` the method ``cls.name``."""
  if not (isinstance(cls, type) and issubclass(cls, Connector)) or not cls.name:
    raise TypeError(f"{cls!r}: a connector method subclasses base.Connector and sets name")
  if _REGISTRY.get(cls.name, cls) is not cls:
    raise TypeError(f"method {cls.name!r} is defined twice: {_REGISTRY[cls.name]} and {cls}")
  own = cls.__mro__[:cls.__mro__.index(Connector)]
  missing = [m for m in _REQUIRED if not any(m in k.__dict__ for k in own)]
  if missing:
    raise TypeError(f"method {cls.name!r} ({cls.__qualname__}) does not define {', '.join(missing)}")
  if not (issubclass(cls.Config, MethodConfig) and cls.Config.__dataclass_params__.frozen):
    raise TypeError(f"method {cls.name!r}: Config must be a frozen dataclass subclassing MethodConfig")
  _REGISTRY[cls.name] = cls
  return cls


def method_names() -> tuple[str, ...]:
  """Every registered method, the paper's first (``Connector.order``)."""
  return tuple(sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n)))


def method_class(name: str) -> type[Connector]:
  if name not in _REGISTRY:
    raise ValueError(f"model.connector.method={name!r} is unknown; allowed: {', '.join(method_names())}")
  return _REGISTRY[name]
