"""big_vision PaliGemma ``.npz`` checkpoints <-> our params (import and export).

An npz holds '/'-joined parameter names (an optional leading ``params/`` is accepted).
Layers are stacked on a leading ``depth`` axis (big_vision's scanned layout, as PaliGemma
releases are saved); the per-layer layout (``encoderblock_{i}``, ``llm/layers/{i}/...``)
is read too. L = depth, D = ViT width, H heads, hd head dim, M ViT MLP, N patches,
E = LLM width, K kv heads, F LLM MLP, V vocabulary::

  img/embedding/kernel                                           (p, p, 3, D)   vision/patch_kernel
  img/embedding/bias                                             (D,)           vision/patch_bias
  img/pos_embedding                                              (1, N, D)      vision/posemb
  img/Transformer/encoderblock/LayerNorm_{0,1}/{scale,bias}      (L, D)         vision/blocks/i/norm{1,2}
  img/Transformer/encoderblock/MultiHeadDotProductAttention_0/
      {query,key,value}/kernel                                   (L, D, H, hd)  .../attn/{q,k,v}_kernel
      {query,key,value}/bias                                     (L, H, hd)     .../attn/{q,k,v}_bias
      out/kernel, out/bias                                       (L, H, hd, D), (L, D)   .../attn/o_*
  img/Transformer/encoderblock/MlpBlock_0/Dense_{0,1}/{kernel,bias}  (L, D, M) ...  .../mlp/{wi,bi}, {wo,bo}
  img/Transformer/encoder_norm/{scale,bias}                      (D,)           vision/norm
  img/head/{kernel,bias}                                         (D, E), (E,)   projection (PaliGemma's)
  llm/embedder/input_embedding                                   (V, E)         decoder/embedding
  llm/layers/pre_attention_norm/scale                            (L, E)         decoder/layers/i/pre_attn_norm
  llm/layers/attn/q_einsum/w                                     (L, H, E, hd)  .../attn/q_kernel  (K < H)
  llm/layers/attn/kv_einsum/w                                    (L, 2, K, E, hd)  .../attn/{k,v}_kernel
  llm/layers/attn/qkv_einsum/w                                   (L, 3, H, E, hd)  q, k, v when K == H
  llm/layers/attn/attn_vec_einsum/w                              (L, H, hd, E)  .../attn/o_kernel
  llm/layers/pre_ffw_norm/scale                                  (L, E)         .../pre_mlp_norm
  llm/layers/mlp/gating_einsum                                   (L, 2, E, F)   .../mlp/wi (gate, up)
  llm/layers/mlp/linear                                          (L, F, E)      .../mlp/wo
  llm/layers/post_attention_norm/scale, post_ffw_norm/scale      (L, E)         Gemma-2 post-norms
  llm/final_norm/scale                                           (E,)           decoder/final_norm

Norm scales are stored as in our modules (RMSNorm: the ``w`` of ``1 + w``). The
connector has no big_vision counterpart: ``export_npz`` writes it under ``connector/...``
(our own names) so that a round trip is exact, and ``load_npz`` reads it when present
and otherwise keeps its initialisation. Neither has Gemma the decoder's prompt token shift
(``prefix_token_shift`` > 0, ours): it travels as ``decoder/token_shift``, and a checkpoint
without it does not load into a model that has one (the error names it).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from parcel_jax.weights import common
from parcel_jax.weights.common import Source, WeightsError

_VIT = "img/Transformer/"
_ATT = "MultiHeadDotProductAttention_0/"


class NpzStore(common.TensorStore):
  """An npz file with lazy member reads (one cached member: layers read it in a row)."""

  def __init__(self, path: str):
    self.description = path
    try:
      self._npz = np.load(path, allow_pickle=False)
      files = list(self._npz.files)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise WeightsError(f"{path}: not a readable npz file ({e})") from e
    self._prefix = "params/" if files and all(f.startswith("params/") for f in files) else ""
    self._keys = [f[len(self._prefix):] for f in files]
    self._cache: tuple[str, np.ndarray] | None = None

  def keys(self):
    return self._keys

  def __contains__(self, name):
    return name in set(self._keys)

  def __getitem__(self, name):
    if self._cache is None or self._cache[0] != name:
      self._cache = (name, self._npz[self._prefix + name])
    return self._cache[1]


def _names(store_keys, model_cfg) -> tuple[bool, bool]:
  """(vision scanned?, llm scanned?) in the npz."""
  keys = set(store_keys)
  return (_VIT + "encoderblock/LayerNorm_0/scale" in keys,
          "llm/layers/pre_attention_norm/scale" in keys)


def _take(i: int | None, fn=lambda x: x):
  """Layer ``i`` of a stacked tensor (None: a per-layer tensor), then ``fn``."""
  return (lambda x: fn(np.asarray(x))) if i is None else (lambda x: fn(np.asarray(x[i])))


def param_mapping(model_cfg, vit_scanned: bool = True, llm_scanned: bool = True) -> dict[str, Source]:
  """Our per-layer parameter paths -> npz names and conversions."""
  v, d = model_cfg.vision, model_cfg.decoder
  m: dict[str, Source] = {
      "vision/patch_kernel": Source(("img/embedding/kernel",)),
      "vision/patch_bias": Source(("img/embedding/bias",)),
      "vision/norm/scale": Source((_VIT + "encoder_norm/scale",)),
      "vision/norm/bias": Source((_VIT + "encoder_norm/bias",)),
      "projection/kernel": Source(("img/head/kernel",)),
      "projection/bias": Source(("img/head/bias",)),
      "decoder/embedding": Source(("llm/embedder/input_embedding",)),
      "decoder/final_norm/scale": Source(("llm/final_norm/scale",)),
  }
  if d.prefix_token_shift:
    m["decoder/token_shift"] = Source(("decoder/token_shift",))
  if v.posemb == "learn":
    m["vision/posemb"] = Source(("img/pos_embedding",), lambda x: np.asarray(x)[0])
  for i in range(v.depth):
    src, j = (_VIT + "encoderblock/", i) if vit_scanned else (_VIT + f"encoderblock_{i}/", None)
    dst = f"vision/blocks/{i}/"
    for n, ln in (("1", "LayerNorm_0"), ("2", "LayerNorm_1")):
      for leaf in ("scale", "bias"):
        m[dst + f"norm{n}/{leaf}"] = Source((src + f"{ln}/{leaf}",), _take(j))
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
      for leaf in ("kernel", "bias"):
        m[dst + f"attn/{ours}_{leaf}"] = Source((src + _ATT + f"{theirs}/{leaf}",), _take(j))
    for ours, theirs in (("wi", "Dense_0/kernel"), ("bi", "Dense_0/bias"),
                         ("wo", "Dense_1/kernel"), ("bo", "Dense_1/bias")):
      m[dst + f"mlp/{ours}"] = Source((src + "MlpBlock_0/" + theirs,), _take(j))
  mha = d.num_kv_heads == d.num_heads
  heads_first = lambda x: x.transpose(1, 0, 2)  # (H, E, hd) -> (E, H, hd)
  for i in range(d.depth):
    src, j = ("llm/layers/", i) if llm_scanned else (f"llm/layers/{i}/", None)
    dst = f"decoder/layers/{i}/"
    if mha:
      qkv = src + "attn/qkv_einsum/w"
      for n, ours in enumerate("qkv"):
        m[dst + f"attn/{ours}_kernel"] = Source((qkv,), _take(j, lambda x, n=n: heads_first(x[n])))
    else:
      m[dst + "attn/q_kernel"] = Source((src + "attn/q_einsum/w",), _take(j, heads_first))
      kv = src + "attn/kv_einsum/w"
      m[dst + "attn/k_kernel"] = Source((kv,), _take(j, lambda x: heads_first(x[0])))
      m[dst + "attn/v_kernel"] = Source((kv,), _take(j, lambda x: heads_first(x[1])))
    m[dst + "attn/o_kernel"] = Source((src + "attn/attn_vec_einsum/w",), _take(j))
    m[dst + "mlp/wi"] = Source((src + "mlp/gating_einsum",), _take(j))
    m[dst + "mlp/wo"] = Source((src + "mlp/linear",), _take(j))
    m[dst + "pre_attn_norm/scale"] = Source((src + "pre_attention_norm/scale",), _take(j))
    m[dst + "pre_mlp_norm/scale"] = Source((src + "pre_ffw_norm/scale",), _take(j))
    if d.post_norms:
      m[dst + "post_attn_norm/scale"] = Source((src + "post_attention_norm/scale",), _take(j))
      m[dst + "post_mlp_norm/scale"] = Source((src + "post_ffw_norm/scale",), _take(j))
  return m


def _connector_mapping(store_keys) -> dict[str, Source]:
  """Our own connector names, when the npz carries them (``export_npz``)."""
  return {k: Source((k,)) for k in store_keys if k.startswith("connector/")}


def load_npz(path: str, params, model_cfg, *, shardings=None, donate: bool = False,
             allow_missing=common.DEFAULT_ALLOW_MISSING):
  """Loads a big_vision-layout npz into ``params`` on their shardings (see ``hf.load_hf_checkpoint``)."""
  if not os.path.exists(path):
    raise WeightsError(f"{path}: no such npz file")
  store = NpzStore(path)
  vit_scanned, llm_scanned = _names(store.keys(), model_cfg)
  mapping = param_mapping(model_cfg, vit_scanned, llm_scanned)
  mapping.update(_connector_mapping(store.keys()))
  return common.assemble(params, mapping, store, model_cfg, shardings=shardings,
                         allow_missing=allow_missing, source_desc=path, donate=donate)


def export_npz(params, model_cfg, path: str, *, include_connector: bool = True) -> dict[str, tuple]:
  """Writes ``params`` (any layout, sharded or not) as a big_vision-layout npz (scanned layers).

  Returns {npz name: shape}. The inverse of ``load_npz`` (see the module docstring).
  """
  flat = common.unscan(common.host_params(params), model_cfg)
  v, d = model_cfg.vision, model_cfg.decoder
  out: dict[str, np.ndarray] = {
      "img/embedding/kernel": flat["vision/patch_kernel"],
      "img/embedding/bias": flat["vision/patch_bias"],
      _VIT + "encoder_norm/scale": flat["vision/norm/scale"],
      _VIT + "encoder_norm/bias": flat["vision/norm/bias"],
      "img/head/kernel": flat["projection/kernel"],
      "img/head/bias": flat["projection/bias"],
      "llm/embedder/input_embedding": flat["decoder/embedding"],
      "llm/final_norm/scale": flat["decoder/final_norm/scale"],
  }
  if v.posemb == "learn":
    out["img/pos_embedding"] = flat["vision/posemb"][None]
  stack = lambda fmt, fn=lambda x: x, n=None: np.stack(
      [fn(flat[fmt.format(i=i)]) for i in range(n)])
  blk = _VIT + "encoderblock/"
  for n, ln in (("1", "LayerNorm_0"), ("2", "LayerNorm_1")):
    for leaf in ("scale", "bias"):
      out[blk + f"{ln}/{leaf}"] = stack("vision/blocks/{i}/norm" + n + "/" + leaf, n=v.depth)
  for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
    for leaf in ("kernel", "bias"):
      out[blk + _ATT + f"{theirs}/{leaf}"] = stack(f"vision/blocks/{{i}}/attn/{ours}_{leaf}", n=v.depth)
  for ours, theirs in (("wi", "Dense_0/kernel"), ("bi", "Dense_0/bias"),
                       ("wo", "Dense_1/kernel"), ("bo", "Dense_1/bias")):
    out[blk + "MlpBlock_0/" + theirs] = stack(f"vision/blocks/{{i}}/mlp/{ours}", n=v.depth)
  lay = "decoder/layers/{i}/"
  to_heads = lambda x: x.transpose(1, 0, 2)  # (E, H, hd) -> (H, E, hd)
  q = stack(lay + "attn/q_kernel", to_heads, d.depth)
  k = stack(lay + "attn/k_kernel", to_heads, d.depth)
  vv = stack(lay + "attn/v_kernel", to_heads, d.depth)
  if d.num_kv_heads == d.num_heads:
    out["llm/layers/attn/qkv_einsum/w"] = np.stack([q, k, vv], axis=1)
  else:
    out["llm/layers/attn/q_einsum/w"] = q
    out["llm/layers/attn/kv_einsum/w"] = np.stack([k, vv], axis=1)
  out["llm/layers/attn/attn_vec_einsum/w"] = stack(lay + "attn/o_kernel", n=d.depth)
  out["llm/layers/mlp/gating_einsum"] = stack(lay + "mlp/wi", n=d.depth)
  out["llm/layers/mlp/linear"] = stack(lay + "mlp/wo", n=d.depth)
  out["llm/layers/pre_attention_norm/scale"] = stack(lay + "pre_attn_norm/scale", n=d.depth)
  out["llm/layers/pre_ffw_norm/scale"] = stack(lay + "pre_mlp_norm/scale", n=d.depth)
  if d.post_norms:
    out["llm/layers/post_attention_norm/scale"] = stack(lay + "post_attn_norm/scale", n=d.depth)
    out["llm/layers/post_ffw_norm/scale"] = stack(lay + "post_mlp_norm/scale", n=d.depth)
  if d.prefix_token_shift:
    out["decoder/token_shift"] = flat["decoder/token_shift"]
  if include_connector:
    out.update({p: x for p, x in flat.items() if p.startswith("connector/")})
  np.savez(path, **out)
  return {k: tuple(x.shape) for k, x in out.items()}
