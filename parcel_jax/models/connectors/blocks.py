"""Building blocks of the attention connectors: a pre-LayerNorm attention block and the
ordered query resampler PARCEL and MQT share, with the config fields they read.

Choices the paper leaves open (config fields, defaults in brackets):
  key_pos      position code added to the cross-attention keys ['sincos2d' | 'learned' | 'none'].
  key_mode     cross-attention keys from 'content+pos' [Qwen-VL style] or 'pos_only'
               (what the official MQT code does); values are always the content.
  norms        pre-LayerNorm residual blocks (as the SigLIP tower) [fixed].
  mlp          one MLP on the query tokens only, after the cross-attention [fixed].
  output_norm  LayerNorm on emitted query tokens so they share the scale of the
               (post-norm) ViT features the anchors pool [True].
  query_init_std  normal init of the query bank [0.02].
  query_prior  where a query looks first ['none' | 'local']. 'local' gives query i a home cell
               on the feature grid (coarse to fine, so every prefix of the bank covers the
               page evenly: 4 queries one per quadrant, 64 one per 2x2 block at grid 16), adds
               the home's position code to the query and a Gaussian locality term
               -d^2 / (2 sigma_h^2) to its cross-attention logits (d in patches, one learned
               sigma per head, init ``query_prior_sigma``). Why: from a random init the bank
               attends diffusely or collapses onto a few places and never fetches single
               patches; a home makes each query start as a fetch of its own patch.
  query_prior_sigma  initial width of the locality term in patches [1.0].
  fetch_init   start each query as a copy of what it attends to [False]: the cross-attention's
               value and output maps begin as the identity, and the residual branches that would
               add other content at step 0 (the conditioning block's output, the MLP's output)
               begin at zero. Why: with random value / output maps a query's token starts as a
               random linear image of the patches it reads; with the identity (and
               ``query_prior='local'``) it starts as its home patch's layer-normed feature, in
               the space the projection was trained on in stage 1.
  bank_size    0 = exactly what the budget space needs (PARCEL 192 / MQT 256 at grid 16).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parcel_jax.models import layers
from parcel_jax.models.connectors import base

Array = jax.Array

KEY_POS = ("sincos2d", "learned", "none")
KEY_MODES = ("content+pos", "pos_only")
QUERY_PRIORS = ("none", "local")
CONDITIONINGS = ("self_attn", "none", "dual_cross")   # how the queries see a context (PARCEL's anchors)


# Set while ``capture_attention`` runs: blocks then sow their attention weights. Off in training
# (sowing outside ``nnx.capture`` would store them on the module).
_RECORD = contextvars.ContextVar("record_connector_attention", default=False)


def capture_attention(fn, module: nnx.Module, *args, **kwargs):
  """Runs ``fn(module, *args, **kwargs)`` (one forward pass) and returns its output and the
  post-softmax attention every ``Block`` under ``module`` computed: a State whose leaves
  ``<path to the block>/attention`` hold (b, heads, t, s) arrays, one per call."""
  token = _RECORD.set(True)
  try:
    return nnx.capture(fn, nnx.Intermediate)(module, *args, **kwargs)
  finally:
    _RECORD.reset(token)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig(base.MethodConfig):
  """Fields of a connector with attention blocks at the ViT width."""
  num_heads: int = base.shared(12)

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"model.connector.num_heads={self.num_heads} must divide the vision width {self.width}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResamplerConfig(AttentionConfig):
  """Fields ``QueryResampler`` reads (PARCEL and MQT)."""
  mlp_dim: int = base.shared(4304)
  bank_size: int = 0            # 0: as many queries as the budget space needs
  key_mode: str = "content+pos"
  key_pos: str = "sincos2d"
  output_norm: bool = True
  query_init_std: float = 0.02
  query_prior: str = "none"
  query_prior_sigma: float = 1.0
  fetch_init: bool = False

  def __post_init__(self):
    base.check_choice("key_pos", self.key_pos, KEY_POS)
    base.check_choice("key_mode", self.key_mode, KEY_MODES)
    base.check_choice("query_prior", self.query_prior, QUERY_PRIORS)
    if not self.query_prior_sigma > 0:
      raise ValueError(f"model.connector.query_prior_sigma={self.query_prior_sigma} must be > 0 (patches)")
    super().__post_init__()
    if self.key_mode == "pos_only" and self.key_pos == "none":
      raise ValueError("model.connector.key_mode='pos_only' needs a key_pos other than 'none'")
    if self.bank_size < 0:
      raise ValueError(f"model.connector.bank_size={self.bank_size} must be >= 0 (0 = what the budgets need)")


class Block(nnx.Module):
  """Pre-LayerNorm attention block: ``x + Attn(LN(x), LN(context))``."""

  def __init__(self, cfg: AttentionConfig, *, rngs: nnx.Rngs):
    kw = dict(param_dtype=cfg.param_dtype, rngs=rngs)
    self.norm_q = layers.layer_norm(cfg.width, **kw)
    self.norm_kv = layers.layer_norm(cfg.width, **kw)
    self.attn = layers.Attention(cfg.width, cfg.num_heads, cfg.width // cfg.num_heads,
                                 use_bias=True, dtype=cfg.dtype, **kw)

  def __call__(self, x: Array, context: Array | None, mask: Array, *,
               key_pos: Array | None = None, pos_only: bool = False,
               bias: Array | None = None) -> Array:
    """x (b, t, d); context (b, s, d) or None for self-attention; mask (b, t, s);
    key_pos (s, d) added to the normalised keys (or used alone when ``pos_only``);
    bias: logits added before the softmax, broadcastable to (b, heads, t, s)."""
    q_in = self.norm_q(x)
    kv_in = q_in if context is None else self.norm_kv(context)
    keys = kv_in
    if key_pos is not None:
      key_pos = jnp.broadcast_to(key_pos.astype(kv_in.dtype), kv_in.shape)
      keys = key_pos if pos_only else kv_in + key_pos
    q = self.attn.project_q(q_in)
    k, v = self.attn.project_kv(keys, values_from=kv_in)
    if _RECORD.get():  # the weights of this pass (XLA computes the softmax once for both uses)
      self.sow(nnx.Intermediate, "attention",
               layers.attention_probs(q, k, mask, softcap=self.attn.softcap, bias=bias))
    out = layers.dot_product_attention(q, k, v, mask, softcap=self.attn.softcap, bias=bias)
    return x + self.attn.project_out(out)

  def attention_weights(self, x: Array, context: Array, mask: Array, *,
                        key_pos: Array | None = None, pos_only: bool = False,
                        bias: Array | None = None) -> Array:
    """Post-softmax attention of ``__call__`` (same arguments, with a context), read from
    that forward pass: (b, heads, t, s); rows of fully masked queries are zero."""
    _, captured = capture_attention(Block.__call__, self, x, context, mask, key_pos=key_pos,
                                    pos_only=pos_only, bias=bias)
    return captured["attention"][0]


class QueryResampler(nnx.Module):
  """Ordered learned queries -> [condition on a context] -> cross-attend to features -> MLP.

  Shared by PARCEL (context = pooled anchors) and MQT (no context). Queries are
  independent of each other unless ``conditioning='self_attn'``, which is what makes
  MQT's nested prefix property hold.
  """

  def __init__(self, cfg: ResamplerConfig, bank_size: int, *, conditioning: str,
               rngs: nnx.Rngs):
    self.cfg, self.conditioning = cfg, conditioning
    self.bank = nnx.Param(layers.param_init(nnx.initializers.normal(cfg.query_init_std), ("queries", "embed"))(
        rngs.params(), (bank_size, cfg.width), cfg.param_dtype))
    self.condition = None if conditioning == "none" else Block(cfg, rngs=rngs)
    self.cross = Block(cfg, rngs=rngs)
    self.mlp_norm = layers.layer_norm(cfg.width, param_dtype=cfg.param_dtype, rngs=rngs)
    self.mlp = layers.Mlp(cfg.width, cfg.mlp_dim, param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)
    self.out_norm = (layers.layer_norm(cfg.width, param_dtype=cfg.param_dtype, rngs=rngs)
                     if cfg.output_norm else None)
    learned = layers.param_init(nnx.initializers.normal(cfg.width ** -0.5), ("tokens", "embed"))
    self.key_pos = (nnx.Param(learned(rngs.params(), (cfg.grid_size ** 2, cfg.width), cfg.param_dtype))
                    if cfg.key_pos == "learned" else None)
    sigma = layers.param_init(nnx.initializers.constant(math.log(cfg.query_prior_sigma)), ("heads",))
    self.log_prior_sigma = (nnx.Param(sigma(rngs.params(), (cfg.num_heads,), jnp.float32))
                            if cfg.query_prior == "local" else None)
    if cfg.fetch_init:
      self._start_as_fetch()

  def _start_as_fetch(self):
    """fetch_init: value and output maps of the cross-attention = identity (head h carries
    channels [h*k, (h+1)*k)), conditioning and MLP outputs = 0, so at step 0 a query's token is
    its residual plus the attention-weighted average of the layer-normed features it reads."""
    attn, d = self.cross.attn, self.cfg.width
    eye = jnp.eye(d, dtype=attn.v_kernel[...].dtype)
    attn.v_kernel[...] = eye.reshape(attn.v_kernel[...].shape)
    attn.o_kernel[...] = eye.reshape(attn.o_kernel[...].shape)
    self.mlp.wo[...] = jnp.zeros_like(self.mlp.wo[...])
    if self.condition is not None:
      self.condition.attn.o_kernel[...] = jnp.zeros_like(self.condition.attn.o_kernel[...])

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
                   pos_only=self.cfg.key_mode == "pos_only", bias=self._locality_bias(num_slots))
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
    _, captured = capture_attention(QueryResampler.__call__, self, features, num_slots, num_active,
                                    context)
    return captured["cross"]["attention"][0].mean(axis=1)

  def _locality_bias(self, num_slots: int) -> Array | None:
    """query_prior='local': -d^2 / (2 sigma_h^2) between each slot's home cell and every
    feature cell, (1, heads, num_slots, g*g) float32; None otherwise."""
    if self.log_prior_sigma is None:
      return None
    grid = self.cfg.grid_size
    cells = jnp.stack(jnp.divmod(jnp.arange(grid * grid), grid), axis=-1).astype(jnp.float32)
    homes = cells[query_homes(num_slots, grid)]                                # (q, 2)
    dist2 = jnp.sum((homes[:, None, :] - cells[None, :, :]) ** 2, axis=-1)    # (q, g*g)
    inv_var = jnp.exp(-2.0 * self.log_prior_sigma[...])                       # (heads,)
    return (-0.5 * inv_var[:, None, None] * dist2[None])[None]

  def _conditioned_queries(self, features, num_slots, num_active, context):
    """The first ``num_slots`` bank queries after conditioning on ``context``:
    (b, num_slots, d) and their validity (b, num_slots)."""
    b = features.shape[0]
    if num_slots > self.bank.shape[0]:
      raise ValueError(f"{num_slots} query slots exceed the query bank ({self.bank.shape[0]}); "
                       "raise model.connector.bank_size")
    valid = jnp.arange(num_slots)[None, :] < num_active[:, None]             # (b, q)
    bank = self.bank[:num_slots]
    if self.log_prior_sigma is not None:  # each query knows its home cell
      bank = bank + layers.sincos_2d(self.cfg.grid_size, self.cfg.width)[query_homes(num_slots, self.cfg.grid_size)]
    x = jnp.broadcast_to(bank.astype(features.dtype), (b, num_slots, features.shape[-1]))
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


def query_homes(num_slots: int, grid: int):
  """Raster indices (num_slots,) of the home cells of the first ``num_slots`` queries
  (query_prior='local'): the grid's cells ordered coarse to fine by the bit-reversed
  Morton code of (row, column), so each prefix of 4**k cells is one per block of side
  grid / 2**k (for a power-of-two grid). A bank larger than the grid wraps around."""
  bits = max(1, (grid - 1).bit_length())

  def key(cell: int) -> int:
    row, col = divmod(cell, grid)
    morton = 0
    for bit in range(bits):
      morton |= ((col >> bit) & 1) << (2 * bit) | ((row >> bit) & 1) << (2 * bit + 1)
    return int(format(morton, f"0{2 * bits}b")[::-1], 2)

  order = sorted(range(grid * grid), key=key)
  return np.asarray([order[i % len(order)] for i in range(num_slots)], np.int32)
