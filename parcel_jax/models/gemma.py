"""Gemma / Gemma-2 decoder used as a prefix-LM (PaliGemma convention).

Inputs are already-embedded tokens ``x`` (visual tokens from the projection,
then text from ``embed``) with two boolean masks:

- ``input_mask`` (b, S): False marks an invalid slot (padding, or a visual slot
  beyond an example's budget). Invalid slots never attend, are never attended
  to and do not advance positions, so padding anywhere leaves every valid
  position's output unchanged.
- ``ar_mask`` (b, S): True marks an auto-regressive (causal) token. Token i may
  attend to j iff both are valid and ``cumsum(ar)[j] <= cumsum(ar)[i]``; so the
  prefix (ar False) is bidirectional and the suffix causal.

Gemma-2 features are switches: GQA, post-attention/post-MLP RMSNorms, attention
and final logit soft-capping, and alternating local (sliding window) / global
layers. Layers can run as an ``nnx.scan`` (one compiled layer per layer type)
with optional rematerialisation; ``to_scanned``/``from_scanned`` convert the
parameter layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from parcel_jax import sharding
from parcel_jax.models import layers

Array = jax.Array

WINDOW_PREFIX_MODES = ("window", "full")

# Model sizes by name, the one table of them: ``decoder_config(name)``, and
# ``model.decoder.variant`` in a config (it fills the size fields the config leaves at 0; see
# ``vlm.preset_sizes``). Sizes only: the architecture switches are fields of their own, whose
# defaults are Gemma-2's.
SIZE_FIELDS = ("vocab_size", "width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")
PRESETS: dict[str, dict[str, int]] = {
    # The embedded default (configs/base.py); no vocabulary: the data's tokenizer sets it.
    "tiny": dict(width=64, depth=2, mlp_dim=256, num_heads=2, num_kv_heads=1, head_dim=32),
    # Gemma-2 2B as in PaliGemma-2 3B (its 257,152-token vocabulary: Gemma's plus location and
    # segmentation tokens).
    "gemma2_2b": dict(vocab_size=257_152, width=2304, depth=26, mlp_dim=9216, num_heads=8,
                      num_kv_heads=4, head_dim=256),
}


def preset(name: str, field: str = "model.decoder.variant") -> dict[str, int]:
  """The size fields of preset ``name``; an unknown name is an error naming ``field``."""
  if name not in PRESETS:
    raise ValueError(f"{field}={name!r} is not a decoder preset; presets: {', '.join(PRESETS)}")
  return dict(PRESETS[name])


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Zero (as ml_collections configs write "off") is normalised to None for
  ``attn_softcap``, ``final_softcap``, ``sliding_window`` and ``query_scale``."""
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  # The switches default to Gemma-2 (2B) as PaliGemma-2 uses it; Gemma-1 is all of them off.
  post_norms: bool = True               # Gemma-2 post-attention / post-MLP RMSNorms
  attn_softcap: float | None = 50.0     # Gemma-2 attention-logit soft-cap
  final_softcap: float | None = 30.0    # Gemma-2 output-logit soft-cap
  sliding_window: int | None = 4096     # window of local layers (|pos_i - pos_j| < window)
  local_global: bool = True             # alternate local / global layers, local first
  query_scale: float | None = None      # None: head_dim ** -0.5 (Gemma-2 2B: 256 ** -0.5)
  rope_base: float = 10_000.0
  # Token shift on the prompt (not in Gemma; 0 = off): each prefix text token's embedding plus a
  # learned per-channel mix of the embeddings of the this-many text tokens before it. A word's
  # role then shows in its own embedding (``red`` after ``is the`` vs after ``to the``), which a
  # two-layer decoder otherwise has to work out with attention before it can use it.
  prefix_token_shift: int = 0
  # How local (sliding-window) layers treat the bidirectional prefix (image + prompt):
  # 'window': every pair needs |pos_i - pos_j| < window, prefix included (big_vision);
  # 'full': prefix tokens see the whole prefix, the window applies to suffix queries
  # only, looking back (Hugging Face transformers' PaliGemma-2). Equal while the prefix
  # is shorter than the window (PaliGemma-2: 4096).
  window_prefix: str = "window"
  dtype: Any = None                     # compute dtype; None = float32
  param_dtype: Any = jnp.float32
  scan: bool = False                    # scan over layers (pairs of local/global layers)
  remat: str = "none"                   # none | full | dots | dots_no_batch

  def __post_init__(self):
    for name in ("attn_softcap", "final_softcap", "sliding_window", "query_scale"):
      if not getattr(self, name):
        object.__setattr__(self, name, None)
    for name in ("vocab_size", "width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"DecoderConfig.{name}={getattr(self, name)} must be positive")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"DecoderConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"DecoderConfig.head_dim={self.head_dim} must be even (RoPE)")
    if self.local_global and not self.sliding_window:
      raise ValueError("DecoderConfig.local_global=True needs sliding_window > 0")
    if self.window_prefix not in WINDOW_PREFIX_MODES:
      raise ValueError(f"DecoderConfig.window_prefix={self.window_prefix!r} is unknown; allowed: "
                       f"{', '.join(WINDOW_PREFIX_MODES)}")
    if self.sliding_window is not None and self.sliding_window < 0:
      raise ValueError(f"DecoderConfig.sliding_window={self.sliding_window} must be positive")
    if self.local_global and self.scan and self.depth % 2:
      raise ValueError(f"DecoderConfig.depth={self.depth} must be even with local_global and scan "
                       "(layers are scanned in (local, global) pairs)")
    if int(self.prefix_token_shift) < 0:
      raise ValueError(f"DecoderConfig.prefix_token_shift={self.prefix_token_shift} must be >= 0")
    layers.check_remat(self.remat, "DecoderConfig.remat")

  def is_local(self, layer: int) -> bool:
    """Gemma-2 alternates local and global layers, starting with a local one."""
    return self.local_global and layer % 2 == 0


def decoder_config(name: str, **overrides) -> DecoderConfig:
  """Preset ``name`` with ``overrides`` (any DecoderConfig field) on top."""
  return DecoderConfig(**{**preset(name, "decoder preset"), **overrides})


# ------------------------------------------------------------------- masks

def default_positions(input_mask: Array) -> Array:
  """(b, S) bool -> (b, S) int32 positions; invalid slots do not advance them."""
  return jnp.cumsum(input_mask.astype(jnp.int32), axis=1) - 1


def make_attention_mask(input_mask: Array, ar_mask: Array, positions: Array | None = None,
                        sliding_window: int | None = None, window_prefix: str = "window") -> Array:
  """Prefix-LM attention mask (b, S, S): [i, j] True iff token i may attend to j.

  i attends j iff both are valid and ``cumsum(ar)[j] <= cumsum(ar)[i]``; with a
  ``sliding_window`` also ``|pos_i - pos_j| < sliding_window``. The cumulative
  sum counts valid ar tokens only, so even an invalid slot marked ar does not
  split a segment: the mask on valid tokens is that of the compact sequence.
  ``window_prefix='full'`` exempts pairs of prefix tokens (segment 0) from the
  window and applies it as ``pos_i - pos_j < sliding_window`` (see DecoderConfig).
  """
  chex.assert_equal_shape([input_mask, ar_mask])
  input_mask = input_mask.astype(bool)
  segment = jnp.cumsum(ar_mask.astype(bool) & input_mask, axis=1)
  mask = segment[:, None, :] <= segment[:, :, None]
  mask &= input_mask[:, None, :] & input_mask[:, :, None]
  if sliding_window:
    positions = default_positions(input_mask) if positions is None else positions
    delta = positions[:, :, None] - positions[:, None, :]
    if window_prefix == "full":
      prefix = segment == 0
      mask &= (delta < sliding_window) | (prefix[:, :, None] & prefix[:, None, :])
    else:
      mask &= jnp.abs(delta) < sliding_window
  return sharding.constrain(mask, ("activation_batch", None, None))


# ------------------------------------------------------------------ layers

class KVCache(NamedTuple):
  """Decoding state (a pytree). T = cache_size.

  k, v: (depth, b, T, kv_heads, head_dim) projected keys (RoPE applied) and values.
  valid: (b, T) bool, slots that may be attended to.
  positions: (b, T) int32 token position of each slot (for sliding windows).
  next_position: (b,) int32 position of the next token.
  index: (b,) int32 slot the next token is written to.
  """
  k: Array
  v: Array
  valid: Array
  positions: Array
  next_position: Array
  index: Array


class Block(nnx.Module):
  """RMSNorm -> GQA attention (RoPE, soft-cap) -> [RMSNorm] -> residual;
  RMSNorm -> GeGLU MLP -> [RMSNorm] -> residual."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.rope_base = cfg.rope_base
    kw = dict(param_dtype=cfg.param_dtype)
    self.pre_attn_norm = layers.RMSNorm(cfg.width, **kw)
    self.attn = layers.Attention(
        cfg.width, cfg.num_heads, cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
        softcap=cfg.attn_softcap, query_scale=cfg.query_scale, dtype=cfg.dtype, rngs=rngs, **kw)
    self.post_attn_norm = layers.RMSNorm(cfg.width, **kw) if cfg.post_norms else None
    self.pre_mlp_norm = layers.RMSNorm(cfg.width, **kw)
    self.mlp = layers.Mlp(cfg.width, cfg.mlp_dim, gated=True, use_bias=False, dtype=cfg.dtype,
                          rngs=rngs, **kw)
    self.post_mlp_norm = layers.RMSNorm(cfg.width, **kw) if cfg.post_norms else None

  def __call__(self, x: Array, positions: Array, mask: Array | None,
               cache: tuple[Array, Array, Array] | None = None) -> tuple[Array, tuple[Array, Array]]:
    """
    Args:
      x: (b, t, width); positions: (b, t) int32.
      mask: bool (b, t, s): s = t, or T when decoding with a cache.
      cache: None, or (k, v, index) with k, v (b, T, kv_heads, head_dim) and index (b,):
        the new token's (t = 1) keys/values are written at ``index`` before attending.
    Returns:
      x (b, t, width), and the keys/values attended over: (b, s, kv_heads, head_dim) each.
    """
    q, k, v = self._qkv(x, positions)
    if cache is not None:
      k_cache, v_cache, index = cache
      rows = jnp.arange(x.shape[0])
      # mode="drop": a write past the cache end is discarded rather than clamped onto the last slot.
      k = k_cache.at[rows, index].set(k[:, 0].astype(k_cache.dtype), mode="drop")
      v = v_cache.at[rows, index].set(v[:, 0].astype(v_cache.dtype), mode="drop")
    o = layers.dot_product_attention(q, k, v, mask, softcap=self.attn.softcap)
    h = self.attn.project_out(o)
    if self.post_attn_norm is not None:
      h = self.post_attn_norm(h)
    x = x + h.astype(x.dtype)
    h = self.mlp(self.pre_mlp_norm(x))
    if self.post_mlp_norm is not None:
      h = self.post_mlp_norm(h)
    return sharding.constrain(x + h.astype(x.dtype), layers.BTD), (k, v)

  def _qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
    """Queries, keys and values (RoPE applied) of the normalised input."""
    h = self.pre_attn_norm(x)
    q = self.attn.project_q(h, positions, self.rope_base)
    k, v = self.attn.project_kv(h, positions, self.rope_base)
    return q, k, v

  def attention_weights(self, x: Array, positions: Array, mask: Array | None) -> Array:
    """Post-softmax attention of ``__call__`` (no cache): (b, heads, t, t) float32."""
    q, k, _ = self._qkv(x, positions)
    return layers.attention_probs(q, k, mask, softcap=self.attn.softcap)


class LocalGlobalPair(nnx.Module):
  """The scanned unit of a Gemma-2 stack: a local then a global layer."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.local_layer = Block(cfg, rngs=rngs)
    self.global_layer = Block(cfg, rngs=rngs)

  def __call__(self, x, positions, masks, cache=None):
    """masks = (global, local); cache k/v carry a leading axis of 2 (local, global)."""
    global_mask, local_mask = masks
    c0 = c1 = None
    if cache is not None:
      k, v, index = cache
      c0, c1 = (k[0], v[0], index), (k[1], v[1], index)
    x, (k0, v0) = self.local_layer(x, positions, local_mask, c0)
    x, (k1, v1) = self.global_layer(x, positions, global_mask, c1)
    return x, (jnp.stack([k0, k1]), jnp.stack([v0, v1]))


def _run_unit(unit, x, positions, masks, cache, *, local: bool, collect: bool):
  """One unit (a Block or a LocalGlobalPair); ``local`` picks a lone Block's mask."""
  if isinstance(unit, LocalGlobalPair):
    x, kv = unit(x, positions, masks, cache)
  else:
    x, kv = unit(x, positions, masks[1] if local else masks[0], cache)
  return x, (kv if collect else None)


class Decoder(nnx.Module):
  """Gemma-style decoder: ``embed`` -> ``__call__`` (hidden after final norm) -> ``logits``."""

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    # std 1/sqrt(width): the sqrt(width) input scaling then gives O(1) embeddings.
    self.embedding = nnx.Param(layers.param_init(
        nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0),
        ("vocab", "embed"))(rngs.params(), (cfg.vocab_size, cfg.width), cfg.param_dtype))
    if cfg.scan:
      unit = LocalGlobalPair if cfg.local_global else Block
      num = cfg.depth // 2 if cfg.local_global else cfg.depth
      self.layers = layers.create_stack(lambda r: unit(cfg, rngs=r), num, rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.final_norm = layers.RMSNorm(cfg.width, param_dtype=cfg.param_dtype)
    if cfg.prefix_token_shift:
      # Tap k (row k - 1) weighs the token k places back; all 1 at the start, so the role a
      # word's neighbours give it is visible from step 0 (zeros learn the same taps far later).
      self.token_shift = nnx.Param(layers.param_init(nnx.initializers.ones, (None, "embed"))(
          rngs.params(), (cfg.prefix_token_shift, cfg.width), cfg.param_dtype))

  @property
  def dtype(self):
    return self.cfg.dtype or jnp.float32

  def embed(self, tokens: Array, shift_mask: Array | None = None) -> Array:
    """(b, L) int32 -> (b, L, width), scaled by sqrt(width) in the compute dtype (as Gemma).

    shift_mask: None, or (b, L) bool: the positions that take ``prefix_token_shift`` (the
      prompt's valid tokens), mixing in the valid tokens before them. None (decoding one
      answer token at a time) applies no shift, as the suffix never has one.
    """
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)
    x = sharding.constrain(x * jnp.sqrt(self.cfg.width).astype(self.dtype), layers.BTD)
    if not self.cfg.prefix_token_shift or shift_mask is None:
      return x
    shift_mask = shift_mask.astype(bool)
    taps = self.token_shift[...].astype(self.dtype)
    source = x * shift_mask[..., None]     # only prompt tokens are mixed in
    mixed = x
    for k in range(1, self.cfg.prefix_token_shift + 1):
      before = jnp.pad(source, ((0, 0), (k, 0), (0, 0)))[:, :x.shape[1]]
      mixed = mixed + taps[k - 1] * before
    return jnp.where(shift_mask[..., None], mixed, x)

  def logits(self, hidden: Array) -> Array:
    """(..., width) -> float32 (..., vocab): tied embedding, final soft-cap."""
    return self.logits_fn()(hidden)

  def logits_fn(self):
    """``logits`` as a pure function of the hidden states over this decoder's current
    embedding (for use inside ``jax.lax`` loops, e.g. a chunked loss)."""
    table, dtype, cap = self.embedding[...].astype(self.dtype), self.dtype, self.cfg.final_softcap

    def fn(hidden):
      out = jnp.einsum("...d,vd->...v", hidden.astype(dtype), table, preferred_element_type=jnp.float32)
      if out.ndim == 3:
        out = sharding.constrain(out, ("activation_batch", "activation_length", "activation_vocab"))
      return layers.soft_cap(out, cap)
    return fn

  def _layers(self, x, positions, masks, kv=None, index=None, collect=False):
    """All layers. kv: None or (k, v) (depth, b, T, kh, hd) caches written at ``index``.
    Returns x and, if collecting or decoding, the stacked (k, v) (depth, b, s, kh, hd)."""
    cfg = self.cfg
    collect = collect or kv is not None
    # Static flags are bound before remat so that they are not traced.
    def make_run(local):
      def run(unit, x, positions, masks, cache):
        return _run_unit(unit, x, positions, masks, cache, local=local, collect=collect)
      return layers.maybe_remat(run, cfg.remat)
    run = {False: make_run(False), True: make_run(True)}
    if not cfg.scan:
      outs = []
      for i, layer in enumerate(self.layers):
        cache = None if kv is None else (kv[0][i], kv[1][i], index)
        x, out = run[cfg.is_local(i)](layer, x, positions, masks, cache)
        outs.append(out)
      return x, (jax.tree.map(lambda *a: jnp.stack(a), *outs) if collect else None)

    pairs = cfg.local_global
    if kv is not None and pairs:  # (depth, ...) -> (depth/2, 2, ...): one slice per pair
      kv = jax.tree.map(lambda a: a.reshape(cfg.depth // 2, 2, *a.shape[1:]), kv)

    def body(x, unit, kv_slice):
      cache = None if kv_slice is None else (*kv_slice, index)
      return run[False](unit, x, positions, masks, cache)

    x, out = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))(x, self.layers, kv)
    if collect and pairs:
      out = jax.tree.map(lambda a: a.reshape(cfg.depth, *a.shape[2:]), out)
    return x, out

  def _masks(self, input_mask, ar_mask, positions):
    full = make_attention_mask(input_mask, ar_mask)
    local = (make_attention_mask(input_mask, ar_mask, positions, self.cfg.sliding_window,
                                 self.cfg.window_prefix)
             if self.cfg.local_global else None)
    return full, local

  def _check(self, x, input_mask, ar_mask, positions):
    b, s = x.shape[:2]
    chex.assert_shape(x, (b, s, self.cfg.width))
    chex.assert_shape([input_mask, ar_mask], (b, s))
    positions = default_positions(input_mask) if positions is None else positions
    chex.assert_shape(positions, (b, s))
    return positions

  def __call__(self, x: Array, *, input_mask: Array, ar_mask: Array,
               positions: Array | None = None) -> Array:
    """x (b, S, width), input_mask/ar_mask (b, S) bool -> hidden (b, S, width) after the final norm.

    ``positions`` (b, S) default to ``cumsum(input_mask) - 1``."""
    positions = self._check(x, input_mask, ar_mask, positions)
    x, _ = self._layers(x.astype(self.dtype), positions, self._masks(input_mask, ar_mask, positions))
    return self.final_norm(x)

  def attention_maps(self, x: Array, *, input_mask: Array, ar_mask: Array,
                     positions: Array | None = None) -> Array:
    """Every layer's attention weights for the inputs of ``__call__`` (the same ``positions``):
    (depth, b, heads, S, S) float32 (diagnostics, e.g. ``analysis.probe``). Needs ``scan=False``."""
    if self.cfg.scan:
      raise ValueError("Decoder.attention_maps needs per-layer modules (DecoderConfig.scan=False)")
    positions = self._check(x, input_mask, ar_mask, positions)
    full, local = self._masks(input_mask, ar_mask, positions)
    x = x.astype(self.dtype)
    maps = []
    for i, layer in enumerate(self.layers):
      mask = local if self.cfg.is_local(i) else full
      maps.append(layer.attention_weights(x, positions, mask))
      x, _ = layer(x, positions, mask)
    return jnp.stack(maps)

  # ---------------------------------------------------------------- decoding

  def prefill(self, x: Array, *, input_mask: Array, ar_mask: Array, cache_size: int,
              positions: Array | None = None) -> tuple[Array, KVCache]:
    """Runs the prompt and returns hidden (b, S, width) and a cache of ``cache_size`` slots.

    Decoding continues after the last slot (S), at the position after the last valid token.
    """
    b, s = x.shape[:2]
    if cache_size < s:
      raise ValueError(f"cache_size={cache_size} is smaller than the prompt length {s}")
    positions = self._check(x, input_mask, ar_mask, positions)
    h, (k, v) = self._layers(x.astype(self.dtype), positions,
                             self._masks(input_mask, ar_mask, positions), collect=True)
    extra = cache_size - s
    pad_kv = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0)))
    pad_slots = lambda a: jnp.pad(a, ((0, 0), (0, extra)))
    cache = KVCache(
        k=pad_kv(k), v=pad_kv(v),
        valid=pad_slots(input_mask.astype(bool)),
        positions=pad_slots(positions.astype(jnp.int32)),
        next_position=jnp.max(jnp.where(input_mask, positions, -1), axis=1).astype(jnp.int32) + 1,
        index=jnp.full((b,), s, jnp.int32))
    return self.final_norm(h), cache

  def decode_step(self, x: Array, cache: KVCache) -> tuple[Array, KVCache]:
    """One causal token per example: x (b, 1, width) -> hidden (b, 1, width), updated cache.

    The token attends to every valid cached slot and to itself (local layers: within
    the window). Steps past ``cache_size`` are dropped silently (size the cache for
    prompt + new tokens)."""
    b = x.shape[0]
    chex.assert_shape(x, (b, 1, self.cfg.width))
    rows = jnp.arange(b)
    pos = cache.next_position
    valid = cache.valid.at[rows, cache.index].set(True, mode="drop")
    slot_pos = cache.positions.at[rows, cache.index].set(pos, mode="drop")
    full = valid[:, None, :]                                              # (b, 1, T)
    local = None
    if self.cfg.local_global:
      local = full & (jnp.abs(pos[:, None, None] - slot_pos[:, None, :]) < self.cfg.sliding_window)
    x, (k, v) = self._layers(x.astype(self.dtype), pos[:, None], (full, local),
                             kv=(cache.k, cache.v), index=cache.index)
    new = KVCache(k=k, v=v, valid=valid, positions=slot_pos, next_position=pos + 1,
                  index=cache.index + 1)
    return self.final_norm(x), new


# ------------------------------------------------------ scanned <-> per-layer params

def to_scanned(params: dict, cfg: DecoderConfig) -> dict:
  """Pure-dict params (``nnx.to_pure_dict``) of a ``scan=False`` decoder -> ``scan=True`` layout."""
  per_layer = [params["layers"][i] for i in range(cfg.depth)]
  if cfg.local_global:
    stacked = {"local_layer": layers.stack_trees(per_layer[0::2]),
               "global_layer": layers.stack_trees(per_layer[1::2])}
  else:
    stacked = layers.stack_trees(per_layer)
  return {**params, "layers": stacked}


def from_scanned(params: dict, cfg: DecoderConfig) -> dict:
  """Inverse of ``to_scanned``."""
  stacked = params["layers"]
  if cfg.local_global:
    local = layers.unstack_tree(stacked["local_layer"], cfg.depth // 2)
    glob = layers.unstack_tree(stacked["global_layer"], cfg.depth // 2)
    per_layer = [layer for pair in zip(local, glob) for layer in pair]
  else:
    per_layer = layers.unstack_tree(stacked, cfg.depth)
  return {**params, "layers": dict(enumerate(per_layer))}
