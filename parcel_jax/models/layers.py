"""Building blocks shared by the vision tower, the connectors and the decoder.

One attention implementation serves every module, so masking semantics (what a
masked slot may see and who may see it) live in exactly one place.

Parameters carry *logical* axis names (``embed``, ``heads``, ``mlp`` ...);
``parcel_jax.sharding`` maps them to mesh axes through the config's rules table.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from parcel_jax import sharding

Array = jax.Array

# Logical names of activations (``sharding.constrain``); parameters carry theirs at creation.
BTD = sharding.BTD
HEADS = ("activation_batch", "activation_length", "activation_heads", None)
KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", None)
MLP_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")

# Parameters are created unsharded and placed by ``parcel_jax.sharding`` (jit
# out_shardings from the logical names + the config's rules), so Flax must not
# try to shard them eagerly at construction time.
nnx.use_eager_sharding(False)


def param_init(init, names: Sequence[str | None]):
  """Wraps an initializer with logical axis names (one per parameter dim)."""
  return nnx.with_partitioning(init, tuple(names))


def dense_init(fan_in_axes=(-2,)):
  # LeCun normal over the contracted axes: keeps activations O(1) for any head split.
  return nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=fan_in_axes, out_axis=-1)


class RMSNorm(nnx.Module):
  """Gemma RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + scale)``; scale starts at 0."""

  def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32,
               rngs: nnx.Rngs | None = None):
    del rngs
    self.eps = eps
    self.scale = nnx.Param(param_init(nnx.initializers.zeros, ("norm",))(
        jax.random.key(0), (dim,), param_dtype))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps) * (1.0 + self.scale[...].astype(jnp.float32))
    return y.astype(x.dtype)


def layer_norm(dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32, eps=1e-6):
  return nnx.LayerNorm(
      dim, epsilon=eps, param_dtype=param_dtype, rngs=rngs,
      scale_init=param_init(nnx.initializers.ones, ("norm",)),
      bias_init=param_init(nnx.initializers.zeros, ("norm",)))


def soft_cap(x: Array, cap: float | None) -> Array:
  """Gemma-2 soft-capping ``cap * tanh(x / cap)``; a no-op for ``cap`` in (None, 0)."""
  if not cap:
    return x
  return cap * jnp.tanh(x / cap)


def rope(x: Array, positions: Array, base: float = 10_000.0) -> Array:
  """Rotary position embedding (half-split layout, as Gemma).

  Args:
    x: (batch, seq, heads, head_dim).
    positions: (batch, seq) integer positions.
  """
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions.astype(jnp.float32)[..., None, None] * freq  # (b, s, 1, half)
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _grouped_probs(q: Array, k: Array, mask: Array | None, softcap: float | None,
                   bias: Array | None = None) -> Array:
  """Softmax attention (b, kv_heads, group, q_len, kv_len) float32; masked entries are 0.
  ``bias``: float logits added after the soft cap, broadcastable to (b, heads, q_len, kv_len)."""
  b, tq, h, d = q.shape
  kh = k.shape[2]
  q = q.reshape(b, tq, kh, h // kh, d)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
  logits = soft_cap(logits, softcap)
  if bias is not None:
    bias = jnp.broadcast_to(bias.astype(jnp.float32), (b, h, tq, k.shape[1]))
    logits = logits + bias.reshape(b, kh, h // kh, tq, k.shape[1])
  if mask is not None:
    mask = jnp.broadcast_to(mask, (b, tq, k.shape[1]))[:, None, None]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if mask is not None:
    probs = jnp.where(mask, probs, 0.0)
  return probs


def attention_probs(q: Array, k: Array, mask: Array | None, *, softcap: float | None = None,
                    bias: Array | None = None) -> Array:
  """The attention weights of ``dot_product_attention`` (same arguments): (batch, heads, q_len,
  kv_len) float32, rows summing to 1 over allowed keys, 0 elsewhere (all 0 if none allowed)."""
  p = _grouped_probs(q, k, mask, softcap, bias)
  return p.reshape(p.shape[0], -1, *p.shape[3:])


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array | None, *,
                          softcap: float | None = None, bias: Array | None = None) -> Array:
  """Masked multi-head attention with grouped K/V heads.

  Args:
    q: (batch, q_len, heads, head_dim), already scaled.
    k, v: (batch, kv_len, kv_heads, head_dim); ``heads % kv_heads == 0``.
    mask: bool, broadcastable to (batch, q_len, kv_len); True = may attend.
    bias: optional float logits added before the softmax, broadcastable to
      (batch, heads, q_len, kv_len).
  Returns:
    (batch, q_len, heads, head_dim). A query row with no allowed key returns
    zeros (not NaN), so fully masked slots stay finite and carry no gradient.
  """
  b, tq, h, d = q.shape
  probs = _grouped_probs(q, k, mask, softcap, bias)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v)
  return out.reshape(b, tq, h, d)


class Attention(nnx.Module):
  """Multi-head (optionally grouped-query) attention with separate q/kv inputs.

  ``project_q``/``project_kv``/``attend``/``project_out`` are exposed separately
  so that a decoder can cache projected keys and values for incremental decoding.
  """

  def __init__(self, q_features: int, num_heads: int, head_dim: int, *,
               kv_features: int | None = None, num_kv_heads: int | None = None,
               out_features: int | None = None, use_bias: bool = False,
               softcap: float | None = None, query_scale: float | None = None,
               param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
    kv_features = kv_features or q_features
    num_kv_heads = num_kv_heads or num_heads
    out_features = out_features or q_features
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.softcap = softcap
    self.query_scale = query_scale if query_scale is not None else head_dim ** -0.5
    self.dtype = dtype

    def general(in_f, shape, names, fan_in_axes=(0,)):
      kernel = nnx.Param(param_init(dense_init(fan_in_axes), names)(
          rngs.params(), (in_f, *shape) if fan_in_axes == (0,) else shape, param_dtype))
      bias = None
      if use_bias:
        bias_shape = shape if fan_in_axes == (0,) else shape[-1:]
        bias_names = names[1:] if fan_in_axes == (0,) else names[-1:]
        bias = nnx.Param(param_init(nnx.initializers.zeros, bias_names)(
            rngs.params(), bias_shape, param_dtype))
      return kernel, bias

    self.q_kernel, self.q_bias = general(q_features, (num_heads, head_dim), ("embed", "heads", "head_dim"))
    self.k_kernel, self.k_bias = general(kv_features, (num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
    self.v_kernel, self.v_bias = general(kv_features, (num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"))
    self.o_kernel, self.o_bias = general(
        None, (num_heads, head_dim, out_features), ("heads", "head_dim", "embed"), fan_in_axes=(0, 1))

  def _proj(self, x, kernel, bias, spec):
    dtype = self.dtype or x.dtype
    y = jnp.einsum(spec, x.astype(dtype), kernel[...].astype(dtype))
    return y if bias is None else y + bias[...].astype(dtype)

  def project_q(self, x: Array, positions: Array | None = None, rope_base: float | None = None) -> Array:
    """(b, t, q_features) -> scaled queries (b, t, heads, head_dim)."""
    q = self._proj(x, self.q_kernel, self.q_bias, "btd,dhk->bthk")
    if rope_base:
      q = rope(q, positions, rope_base)
    return sharding.constrain(q * self.query_scale, HEADS)

  def project_kv(self, x: Array, positions: Array | None = None,
                 rope_base: float | None = None, values_from: Array | None = None
                 ) -> tuple[Array, Array]:
    """(b, s, kv_features) -> keys, values (b, s, kv_heads, head_dim).

    ``values_from`` (b, s, kv_features) lets keys and values come from different
    inputs (e.g. position-only keys over content values)."""
    k = self._proj(x, self.k_kernel, self.k_bias, "bsd,dhk->bshk")
    v = self._proj(x if values_from is None else values_from,
                   self.v_kernel, self.v_bias, "bsd,dhk->bshk")
    if rope_base:
      k = rope(k, positions, rope_base)
    return sharding.constrain(k, KV_HEADS), sharding.constrain(v, KV_HEADS)

  def project_out(self, o: Array) -> Array:
    """(b, t, heads, head_dim) -> (b, t, out_features)."""
    return sharding.constrain(self._proj(o, self.o_kernel, self.o_bias, "bthk,hkd->btd"), BTD)

  def __call__(self, x_q: Array, x_kv: Array | None = None, *, mask: Array | None = None,
               q_positions: Array | None = None, kv_positions: Array | None = None,
               rope_base: float | None = None, values_from: Array | None = None) -> Array:
    """Args: x_q (b, t, q_features); x_kv (b, s, kv_features), defaults to x_q;
    mask bool broadcastable to (b, t, s). Returns (b, t, out_features)."""
    x_kv = x_q if x_kv is None else x_kv
    kv_positions = q_positions if kv_positions is None else kv_positions
    q = self.project_q(x_q, q_positions, rope_base)
    k, v = self.project_kv(x_kv, kv_positions, rope_base, values_from)
    return self.project_out(dot_product_attention(q, k, v, mask, softcap=self.softcap))


class Mlp(nnx.Module):
  """Two-layer MLP; ``gated=True`` is Gemma's GeGLU, otherwise ViT's GELU MLP."""

  def __init__(self, features: int, hidden: int, *, gated: bool = False, use_bias: bool = True,
               param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
    self.gated, self.dtype = gated, dtype
    n_in = 2 if gated else 1
    self.wi = nnx.Param(param_init(dense_init((-2,)), (None, "embed", "mlp") if gated else ("embed", "mlp"))(
        rngs.params(), (n_in, features, hidden) if gated else (features, hidden), param_dtype))
    self.wo = nnx.Param(param_init(dense_init((-2,)), ("mlp", "embed"))(
        rngs.params(), (hidden, features), param_dtype))
    zeros = param_init(nnx.initializers.zeros, ("mlp",))
    self.bi = nnx.Param(zeros(rngs.params(), (hidden,), param_dtype)) if use_bias else None
    zeros = param_init(nnx.initializers.zeros, ("embed",))
    self.bo = nnx.Param(zeros(rngs.params(), (features,), param_dtype)) if use_bias else None

  def __call__(self, x: Array) -> Array:
    """(..., features) -> (..., features)."""
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    if self.gated:
      gate_up = jnp.einsum("...d,gdh->g...h", x, self.wi[...].astype(dtype))
      h = jax.nn.gelu(gate_up[0], approximate=True) * gate_up[1]
    else:
      h = x @ self.wi[...].astype(dtype)
      if self.bi is not None:
        h = h + self.bi[...].astype(dtype)
      h = jax.nn.gelu(h, approximate=True)
    if h.ndim == 3:
      h = sharding.constrain(h, MLP_HIDDEN)
    y = h @ self.wo[...].astype(dtype)
    if self.bo is not None:
      y = y + self.bo[...].astype(dtype)
    return sharding.constrain(y, BTD) if y.ndim == 3 else y


def sincos_2d(grid: int, width: int, *, frame: int | None = None,
              temperature: float = 10_000.0) -> Array:
  """Fixed 2-D sin-cos position codes of a square grid, raster order: (grid**2, width).

  ``frame`` places the grid's cell centres on a finer ``frame x frame`` lattice,
  so pooled anchors share the coordinate frame of the features they summarise.
  """
  if width % 4:
    raise ValueError(f"sincos_2d needs width divisible by 4, got {width}")
  frame = frame or grid
  centres = (jnp.arange(grid) + 0.5) * (frame / grid) - 0.5
  y, x = jnp.meshgrid(centres, centres, indexing="ij")
  return jnp.concatenate([sincos_1d(x.reshape(-1), width // 2, temperature=temperature),
                          sincos_1d(y.reshape(-1), width // 2, temperature=temperature)], axis=1)


def sincos_1d(positions: Array, width: int, *, temperature: float = 10_000.0) -> Array:
  """Fixed sin-cos codes of ``positions`` (any shape; frame ranks, or grid coordinates for
  ``sincos_2d``): positions.shape + (width,), the sines then the cosines."""
  if width % 2:
    raise ValueError(f"sincos_1d needs an even width, got {width}")
  half = width // 2
  omega = 1.0 / temperature ** (jnp.arange(half) / max(half - 1, 1))
  angle = jnp.asarray(positions, jnp.float32)[..., None] * omega
  return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)


def num_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------- layer stacks
# Long towers can run as one scanned layer (compiled once) and rematerialise
# activations in the backward pass; both are config switches of the ViT and decoder.

REMAT_POLICIES = {
    "none": None,                 # keep every activation (no remat)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(name: str, field: str = "remat") -> None:
  if name not in REMAT_POLICIES:
    raise ValueError(f"{field}={name!r} is unknown; allowed: {', '.join(REMAT_POLICIES)}")


def maybe_remat(fn, name: str):
  """``nnx.remat(fn)`` under the named policy; ``fn`` itself for 'none'."""
  check_remat(name)
  if name == "none":
    return fn
  # prevent_cse=False is safe (and faster) inside scan, harmless outside.
  return nnx.remat(fn, policy=REMAT_POLICIES[name], prevent_cse=False)


def create_stack(make_layer, num: int, rngs: nnx.Rngs):
  """``num`` independently initialised layers with parameters stacked on a
  leading axis named ``layers`` (kept unsharded by the sharding rules)."""
  @nnx.split_rngs(splits=num)
  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r):
    return make_layer(r)
  return create(rngs)


def stack_trees(trees):
  """[tree, ...] -> one tree with leaves stacked on a new leading axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree, num: int):
  """Inverse of ``stack_trees``."""
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(num)]
