"""Elastic visual connectors: ViT feature grid + budget -> visual tokens + validity mask.

Every method is one module with the same call::

    tokens, mask = connector(features, bucket, budgets)
    # features (batch, grid, grid, width); bucket: budgets.Bucket (static);
    # budgets (batch,) int32 -> tokens (batch, bucket.num_slots, width), mask (batch, num_slots)

Token layout is always ``[anchors (bucket.num_anchors, raster order); query slots]``.
Query slot ``i`` of an example is valid iff ``i < budget - num_anchors``. Invalid
slots never attend, are never attended to, are zero, and receive zero gradient.

Choices the paper leaves open (all config fields, defaults in brackets):
  key_pos      position code added to the cross-attention keys ['sincos2d' | 'learned' | 'none'].
  key_mode     cross-attention keys from 'content+pos' [Qwen-VL style] or 'pos_only'
               (what the official MQT code does); values are always the content.
  anchor_pos   position code added to anchors *inside* the self-attention
               ['sincos2d' at the anchor cell centres | 'none']; the emitted anchors stay raw.
  norms        pre-LayerNorm residual blocks (as the SigLIP tower) [fixed].
  mlp          one MLP on the query tokens only, after the cross-attention [fixed].
  output_norm  LayerNorm on emitted query tokens so they share the scale of the
               (post-norm) ViT features the anchors pool [True].
  query_init_std  normal init of the query bank [0.02].
  bank_size    0 = exactly what the budget space needs (PARCEL 192 / MQT 256 at grid 16).
"""

from __future__ import annotations

import dataclasses

import chex
import einops
import jax
import jax.numpy as jnp
from flax import nnx

from parcel_jax import budgets as budgets_lib
from parcel_jax.models import layers

Array = jax.Array

CONDITIONINGS = ("self_attn", "none", "dual_cross")
KEY_POS = ("sincos2d", "learned", "none")
KEY_MODES = ("content+pos", "pos_only")
ANCHOR_POS = ("sincos2d", "none")


@dataclasses.dataclass(frozen=True)
class ConnectorConfig:
  method: str
  width: int                    # the ViT width; the connector runs at it (paper: 1152)
  grid_size: int                # side of the ViT feature grid
  num_heads: int = 12
  mlp_dim: int = 4304
  bank_size: int = 0            # 0: as many queries as the budget space needs
  routing: str = "piecewise"
  conditioning: str = "self_attn"   # PARCEL: how queries see the anchors
  extra_self_attn: bool = False     # M3 / MQT + self-attention ablation
  key_mode: str = "content+pos"
  key_pos: str = "sincos2d"
  anchor_pos: str = "sincos2d"
  output_norm: bool = True
  query_init_std: float = 0.02
  dtype: object = None
  param_dtype: object = jnp.float32

  def __post_init__(self):
    budgets_lib.validate_method(self.method, self.routing)
    for field, value, allowed in (("conditioning", self.conditioning, CONDITIONINGS),
                                  ("key_pos", self.key_pos, KEY_POS),
                                  ("key_mode", self.key_mode, KEY_MODES),
                                  ("anchor_pos", self.anchor_pos, ANCHOR_POS)):
      if value not in allowed:
        raise ValueError(f"model.connector.{field}={value!r} is unknown; allowed: {', '.join(allowed)}")
    if self.width % self.num_heads:
      raise ValueError(f"model.connector.num_heads={self.num_heads} must divide the vision width {self.width}")
    if self.key_mode == "pos_only" and self.key_pos == "none":
      raise ValueError("model.connector.key_mode='pos_only' needs a key_pos other than 'none'")


def avg_pool(features: Array, out_grid: int) -> Array:
  """(b, g, g, d) -> (b, out_grid**2, d): non-overlapping average pooling, raster order."""
  g = features.shape[1]
  if out_grid < 1 or g % out_grid:
    raise ValueError(f"cannot average-pool a {g}x{g} feature grid to {out_grid}x{out_grid}")
  k = g // out_grid
  return einops.reduce(features, "b (h kh) (w kw) d -> b (h w) d", "mean", kh=k, kw=k)


class _Block(nnx.Module):
  """Pre-LayerNorm attention block: ``x + Attn(LN(x), LN(context))``."""

  def __init__(self, cfg: ConnectorConfig, *, rngs: nnx.Rngs):
    kw = dict(param_dtype=cfg.param_dtype, rngs=rngs)
    self.norm_q = layers.layer_norm(cfg.width, **kw)
    self.norm_kv = layers.layer_norm(cfg.width, **kw)
    self.attn = layers.Attention(cfg.width, cfg.num_heads, cfg.width // cfg.num_heads,
                                 use_bias=True, dtype=cfg.dtype, **kw)

  def __call__(self, x: Array, context: Array | None, mask: Array, *,
               key_pos: Array | None = None, pos_only: bool = False) -> Array:
    """x (b, t, d); context (b, s, d) or None for self-attention; mask (b, t, s);
    key_pos (s, d) added to the normalised keys (or used alone when ``pos_only``)."""
    q_in = self.norm_q(x)
    kv_in = q_in if context is None else self.norm_kv(context)
    keys = kv_in
    if key_pos is not None:
      key_pos = jnp.broadcast_to(key_pos.astype(kv_in.dtype), kv_in.shape)
      keys = key_pos if pos_only else kv_in + key_pos
    return x + self.attn(q_in, keys, mask=mask, values_from=kv_in)

  def attention_weights(self, x: Array, context: Array, mask: Array, *,
                        key_pos: Array | None = None, pos_only: bool = False) -> Array:
    """Post-softmax attention of ``__call__`` (same arguments, with a context):
    (b, heads, t, s); rows of fully masked queries are zero."""
    q = self.attn.project_q(self.norm_q(x))
    kv_in = self.norm_kv(context)
    keys = kv_in
    if key_pos is not None:
      key_pos = jnp.broadcast_to(key_pos.astype(kv_in.dtype), kv_in.shape)
      keys = key_pos if pos_only else kv_in + key_pos
    k, _ = self.attn.project_kv(keys)
    return layers.attention_probs(q, k, mask, softcap=self.attn.softcap)


class QueryResampler(nnx.Module):
  """Ordered learned queries -> [condition on a context] -> cross-attend to features -> MLP.

  Shared by PARCEL (context = pooled anchors) and MQT (no context). Queries are
  independent of each other unless ``self_attend`` is set, which is what makes
  MQT's nested prefix property hold.
  """

  def __init__(self, cfg: ConnectorConfig, bank_size: int, *, conditioning: str,
               rngs: nnx.Rngs):
    self.cfg, self.conditioning = cfg, conditioning
    self.bank = nnx.Param(layers.param_init(nnx.initializers.normal(cfg.query_init_std), ("queries", "embed"))(
        rngs.params(), (bank_size, cfg.width), cfg.param_dtype))
    self.condition = None if conditioning == "none" else _Block(cfg, rngs=rngs)
    self.cross = _Block(cfg, rngs=rngs)
    self.mlp_norm = layers.layer_norm(cfg.width, param_dtype=cfg.param_dtype, rngs=rngs)
    self.mlp = layers.Mlp(cfg.width, cfg.mlp_dim, param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
    self.out_norm = (layers.layer_norm(cfg.width, param_dtype=cfg.param_dtype, rngs=rngs)
                     if cfg.output_norm else None)
    learned = layers.param_init(nnx.initializers.normal(cfg.width ** -0.5), ("tokens", "embed"))
    self.key_pos = (nnx.Param(learned(rngs.params(), (cfg.grid_size ** 2, cfg.width), cfg.param_dtype))
                    if cfg.key_pos == "learned" else None)

  def _feature_pos(self) -> Array | None:
    if self.cfg.key_pos == "sincos2d":
      return layers.sincos_2d(self.cfg.grid_size, self.cfg.width)
    return None if self.key_pos is None else self.key_pos[...]

  def __call__(self, features: Array, num_slots: int, num_active: Array,
               context: Array | None = None) -> tuple[Array, Array]:
    """Args:
      features: (b, g*g, d) keys/values of the cross-attention.
      num_slots: static number of query slots (a prefix of the bank).
      num_active: (b,) int, active queries per example (<= num_slots).
      context: (b, c, d) always-valid tokens the queries condition on (anchors).
    Returns: queries (b, num_slots, d) with inactive slots zeroed, valid (b, num_slots).
    """
    x, valid = self._conditioned_queries(features, num_slots, num_active, context)
    key_mask = valid[:, :, None] & jnp.ones((1, 1, features.shape[1]), bool)
    x = self.cross(x, features, key_mask, key_pos=self._feature_pos(),
                   pos_only=self.cfg.key_mode == "pos_only")
    x = x + self.mlp(self.mlp_norm(x))
    if self.out_norm is not None:
      x = self.out_norm(x)
    return jnp.where(valid[..., None], x, 0.0), valid

  def cross_attention_weights(self, features: Array, num_slots: int, num_active: Array,
                              context: Array | None = None) -> Array:
    """Head-averaged post-softmax cross-attention of the queries over ``features``.

    Same arguments as ``__call__``. Returns (b, num_slots, g*g): each active query's row
    sums to 1 over the source tokens (raster order); inactive rows are zero.
    """
    x, valid = self._conditioned_queries(features, num_slots, num_active, context)
    key_mask = valid[:, :, None] & jnp.ones((1, 1, features.shape[1]), bool)
    probs = self.cross.attention_weights(x, features, key_mask, key_pos=self._feature_pos(),
                                         pos_only=self.cfg.key_mode == "pos_only")
    return probs.mean(axis=1)

  def _conditioned_queries(self, features, num_slots, num_active, context):
    """The first ``num_slots`` bank queries after conditioning on ``context``:
    (b, num_slots, d) and their validity (b, num_slots)."""
    b = features.shape[0]
    if num_slots > self.bank.shape[0]:
      raise ValueError(f"{num_slots} query slots exceed the query bank ({self.bank.shape[0]}); "
                       "raise model.connector.bank_size")
    valid = jnp.arange(num_slots)[None, :] < num_active[:, None]             # (b, q)
    x = jnp.broadcast_to(self.bank[:num_slots].astype(features.dtype), (b, num_slots, features.shape[-1]))
    if self.conditioning == "self_attn":
      c = 0 if context is None else context.shape[1]
      seq = x if context is None else jnp.concatenate([context, x], axis=1)
      seq_valid = jnp.concatenate([jnp.ones((b, c), bool), valid], axis=1)
      mask = seq_valid[:, :, None] & seq_valid[:, None, :]
      x = self.condition(seq, None, mask)[:, c:]
    elif self.conditioning == "dual_cross":
      mask = valid[:, :, None] & jnp.ones((1, 1, context.shape[1]), bool)
      x = self.condition(x, context, mask)
    return x, valid


def _check(features: Array, cfg: ConnectorConfig) -> None:
  chex.assert_rank(features, 4)
  if features.shape[1:] != (cfg.grid_size, cfg.grid_size, cfg.width):
    raise ValueError(f"connector expects features (batch, {cfg.grid_size}, {cfg.grid_size}, {cfg.width}), "
                     f"got {features.shape}")


class Parcel(nnx.Module):
  """Pooled spatial anchors + pool-conditioned elastic queries (PCQR)."""

  def __init__(self, cfg: ConnectorConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    space = budgets_lib.budget_space("parcel", cfg.grid_size, routing=cfg.routing)
    needed = max(b - budgets_lib.route("parcel", b, cfg.grid_size, cfg.routing)[0] for b in space)
    self.resampler = QueryResampler(cfg, cfg.bank_size or needed, conditioning=cfg.conditioning, rngs=rngs)

  def __call__(self, features, bucket, budgets):
    _check(features, self.cfg)
    anchors = avg_pool(features, bucket.anchor_grid)                          # (b, a, d)
    b = features.shape[0]
    if bucket.query_slots == 0:   # B = 16 or 64: pure pooling, the query path is off
      return anchors, jnp.ones((b, bucket.num_anchors), bool)
    queries, valid = self.resampler(
        einops.rearrange(features, "b h w d -> b (h w) d"), bucket.query_slots,
        budgets - bucket.num_anchors, context=self._context(anchors, bucket))
    tokens = jnp.concatenate([anchors, queries], axis=1)
    return tokens, jnp.concatenate([jnp.ones((b, bucket.num_anchors), bool), valid], axis=1)

  def _context(self, anchors: Array, bucket) -> Array:
    """What the queries condition on: the anchors (b, a, d), plus their position code."""
    if self.cfg.anchor_pos == "sincos2d":
      return anchors + layers.sincos_2d(bucket.anchor_grid, self.cfg.width,
                                        frame=self.cfg.grid_size).astype(anchors.dtype)
    return anchors

  def query_attention(self, features: Array, bucket, budgets: Array) -> Array:
    """Head-averaged cross-attention of the query slots over the ViT grid (spectral analysis):
    features (b, g, g, d) -> (b, bucket.query_slots, g*g); inactive slots are zero rows."""
    _check(features, self.cfg)
    anchors = avg_pool(features, bucket.anchor_grid)
    return self.resampler.cross_attention_weights(
        einops.rearrange(features, "b h w d -> b (h w) d"), bucket.query_slots,
        budgets - bucket.num_anchors, context=self._context(anchors, bucket))


class M3(nnx.Module):
  """Nested square average pooling (Matryoshka Multimodal Models)."""

  def __init__(self, cfg: ConnectorConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.self_attn = _Block(cfg, rngs=rngs) if cfg.extra_self_attn else None

  def __call__(self, features, bucket, budgets):
    _check(features, self.cfg)
    del budgets  # every budget of a bucket is the same square grid
    tokens = avg_pool(features, bucket.anchor_grid)
    if self.self_attn is not None:
      tokens = self.self_attn(tokens, None, jnp.ones((1, tokens.shape[1], tokens.shape[1]), bool))
    return tokens, jnp.ones(tokens.shape[:2], bool)


class MQT(nnx.Module):
  """Matryoshka Query Transformer: an ordered query bank + one cross-attention block."""

  def __init__(self, cfg: ConnectorConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.resampler = QueryResampler(cfg, cfg.bank_size or cfg.grid_size ** 2,
                                    conditioning="self_attn" if cfg.extra_self_attn else "none",
                                    rngs=rngs)

  def __call__(self, features, bucket, budgets):
    _check(features, self.cfg)
    flat = einops.rearrange(features, "b h w d -> b (h w) d")
    return self.resampler(flat, bucket.query_slots, budgets)

  def query_attention(self, features: Array, bucket, budgets: Array) -> Array:
    """As ``Parcel.query_attention``: (b, g, g, d) -> (b, bucket.query_slots, g*g)."""
    _check(features, self.cfg)
    flat = einops.rearrange(features, "b h w d -> b (h w) d")
    return self.resampler.cross_attention_weights(flat, bucket.query_slots, budgets)


class Uncompressed(nnx.Module):
  """Every grid token (the reference every retention number is relative to)."""

  def __init__(self, cfg: ConnectorConfig, *, rngs: nnx.Rngs):
    del rngs
    self.cfg = cfg

  def __call__(self, features, bucket, budgets):
    _check(features, self.cfg)
    del bucket, budgets
    tokens = einops.rearrange(features, "b h w d -> b (h w) d")
    return tokens, jnp.ones(tokens.shape[:2], bool)


CONNECTORS = {"parcel": Parcel, "m3": M3, "mqt": MQT, "none": Uncompressed}


def make_connector(cfg: ConnectorConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  return CONNECTORS[cfg.method](cfg, rngs=rngs)
