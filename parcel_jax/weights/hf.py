"""Hugging Face PaliGemma / PaliGemma-2 checkpoints (``config.json`` + safetensors) <-> our params.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` or
``model.safetensors.index.json`` with its shards (as ``save_pretrained`` writes). Tensor
names are normalised to one canonical form, whichever transformers version saved them::

  model.vision_tower.X | vision_tower.vision_model.X | vision_model.X   -> vision_tower.X
  model.multi_modal_projector.X | multi_modal_projector.X                -> multi_modal_projector.X
  model.language_model.X | language_model.model.X | model.X (Gemma LM)   -> language_model.X
  language_model.lm_head.weight                                          -> lm_head.weight

and mapped (per layer i; torch Linear weights are (out, in), ours (in, out)):

  vision_tower.embeddings.patch_embedding.{weight (D,3,p,p) -> (p,p,3,D), bias}  vision/patch_{kernel,bias}
  vision_tower.embeddings.position_embedding.weight (N, D)                       vision/posemb
  vision_tower.encoder.layers.i.layer_norm{1,2}.{weight,bias}                    vision/blocks/i/norm{1,2}/{scale,bias}
  vision_tower.encoder.layers.i.self_attn.{q,k,v}_proj.{weight,bias}             .../attn/{q,k,v}_{kernel (D,H,hd), bias (H,hd)}
  vision_tower.encoder.layers.i.self_attn.out_proj.{weight,bias}                 .../attn/o_{kernel (H,hd,D), bias}
  vision_tower.encoder.layers.i.mlp.fc{1,2}.{weight,bias}                        .../mlp/{wi,bi}, {wo,bo}
  vision_tower.post_layernorm.{weight,bias}                                      vision/norm/{scale,bias}
  multi_modal_projector.linear.{weight,bias}                                     projection/{kernel,bias}
  language_model.embed_tokens.weight (V, D)                                      decoder/embedding
  language_model.layers.i.self_attn.{q,k,v,o}_proj.weight                        decoder/layers/i/attn/{q,k,v,o}_kernel
  language_model.layers.i.mlp.{gate,up}_proj.weight -> stacked (2, D, F)         decoder/layers/i/mlp/wi
  language_model.layers.i.mlp.down_proj.weight                                   decoder/layers/i/mlp/wo
  language_model.layers.i.input_layernorm.weight                                 decoder/layers/i/pre_attn_norm/scale
  Gemma-1: language_model.layers.i.post_attention_layernorm.weight               decoder/layers/i/pre_mlp_norm/scale
  Gemma-2: ...post_attention_layernorm / pre_feedforward_layernorm /
           post_feedforward_layernorm                                            .../post_attn_norm, pre_mlp_norm, post_mlp_norm
  language_model.norm.weight                                                     decoder/final_norm/scale

``lm_head.weight`` is the tied embedding (ignored); a SigLIP MAP head (``vision_tower.head.*``)
is ignored (PaliGemma uses the features after the final norm). The connector is absent from
every such checkpoint and keeps its initialisation.

Numerics that our modules match by construction: RMSNorm ``x * rsqrt(mean(x^2) + eps) *
(1 + w)``; GELU-tanh; text embeddings scaled by sqrt(width), image features not; Gemma-2
post-norms, attention / final soft-caps, ``query_pre_attn_scalar ** -0.5``, alternating
sliding-window (local first) / global layers; the vision LayerNorm eps 1e-6; RoPE half-split.
HF numbers positions from 1, we from 0: RoPE is relative, so logits agree to rounding.
HF exempts the bidirectional prefix from the local layers' window; ``config_from_hf``
selects that (``window_prefix='full'``; identical to big_vision while the prefix is shorter
than the window).

Export (``export_hf``) walks the same table backwards (each conversion carries its
inverse) and writes the names ``save_pretrained`` writes (``vision_tower.X``,
``multi_modal_projector.X``, ``language_model.model.X``), with a ``config.json``
(``hf_config``) that ``config_from_hf`` reads back to the same dimensions. Gemma-2 is
chosen by ``decoder.post_norms``. What HF cannot express is refused with the config
field named, or converted where that is exact (``unrepresentable``, next to ALLOWABLE).
The image token defaults to an id outside the vocabulary (``default_image_token``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from parcel_jax.models import layers
from parcel_jax.weights import common
from parcel_jax.weights.common import Source, WeightsError

# Defaults of the transformers config classes, for fields a config.json may leave out.
_SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, image_size=224, patch_size=16,
                        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3)
# PaliGemmaConfig's own defaults for its vision tower.
_PALIGEMMA_VISION_DEFAULTS = dict(_SIGLIP_DEFAULTS, intermediate_size=4096, hidden_size=1152,
                                  patch_size=14, image_size=224, num_hidden_layers=27,
                                  num_attention_heads=16)
_GEMMA_DEFAULTS = dict(vocab_size=256_000, hidden_size=3072, intermediate_size=24_576,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                       head_dim=256, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                       rope_theta=10_000.0, tie_word_embeddings=True)
_PALIGEMMA_TEXT_DEFAULTS = dict(_GEMMA_DEFAULTS, hidden_size=2048, num_hidden_layers=18,
                                intermediate_size=16_384, num_attention_heads=8,
                                num_key_value_heads=1, vocab_size=257_152)
_GEMMA2_DEFAULTS = dict(vocab_size=256_000, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
                        rope_theta=10_000.0, query_pre_attn_scalar=256, sliding_window=4096,
                        final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                        tie_word_embeddings=True)
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new", "gelu_fast")
_EPS = 1e-6  # the eps our LayerNorm / RMSNorm use


def read_config(path: str) -> dict:
  """``config.json`` of a checkpoint directory (or the file itself) as a dict."""
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  try:
    with open(file) as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise WeightsError(f"{file}: no such file (a Hugging Face checkpoint directory has config.json)") from e
  except json.JSONDecodeError as e:
    raise WeightsError(f"{file}: not valid JSON ({e})") from e


def _sub(cfg: dict, key: str, defaults: dict) -> dict:
  return {**defaults, **{k: v for k, v in (cfg.get(key) or {}).items() if v is not None}}


def _check(cond: bool, file: str, msg: str) -> None:
  if not cond:
    raise WeightsError(f"{file}: {msg}")


def config_from_hf(config: str | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """Model dimensions from a PaliGemma ``config.json`` (path, directory or dict).

  Returns ``{"vision": {...}, "decoder": {...}}`` overrides for ``config.model.vision`` /
  ``config.model.decoder`` in this project's convention (0 = off). Raises WeightsError
  for settings our modules do not implement (activation, norm eps, untied output layer,
  a projection width other than the LM width, non-alternating Gemma-2 layer types).
  """
  where = config if isinstance(config, str) else "config.json"
  cfg = read_config(config) if isinstance(config, str) else dict(config)
  model_type = cfg.get("model_type", "paligemma")
  _check(model_type == "paligemma", where, f"model_type={model_type!r}; expected 'paligemma'")
  vision = _sub(cfg, "vision_config", _PALIGEMMA_VISION_DEFAULTS)
  text_type = (cfg.get("text_config") or {}).get("model_type", "gemma")
  _check(text_type in ("gemma", "gemma2"), where,
         f"text_config.model_type={text_type!r}; supported: gemma, gemma2")
  text = _sub(cfg, "text_config", _PALIGEMMA_TEXT_DEFAULTS if text_type == "gemma" else _GEMMA2_DEFAULTS)

  act = vision.get("hidden_act")
  _check(act in _TANH_GELUS, where, f"vision_config.hidden_act={act!r}; our ViT uses GELU-tanh")
  _check(abs(vision["layer_norm_eps"] - _EPS) < 1e-12, where,
         f"vision_config.layer_norm_eps={vision['layer_norm_eps']}; our LayerNorm uses {_EPS}")
  _check(vision.get("num_channels", 3) == 3, where, "vision_config.num_channels must be 3")
  _check(vision["image_size"] % vision["patch_size"] == 0, where,
         f"vision_config.image_size={vision['image_size']} is not a multiple of patch_size={vision['patch_size']}")
  act = text.get("hidden_activation") or text.get("hidden_act")
  ok = act in _TANH_GELUS or (text_type == "gemma" and act == "gelu")  # HF Gemma maps gelu -> tanh
  _check(ok, where, f"text_config hidden activation {act!r}; our decoder uses GELU-tanh")
  _check(abs(text["rms_norm_eps"] - _EPS) < 1e-12, where,
         f"text_config.rms_norm_eps={text['rms_norm_eps']}; our RMSNorm uses {_EPS}")
  tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
  _check(tied is not False, where, "tie_word_embeddings=false; our decoder ties the output layer")
  projection = cfg.get("projection_dim", vision.get("projection_dim", text["hidden_size"]))
  _check(projection == text["hidden_size"], where,
         f"projection_dim={projection} differs from text_config.hidden_size={text['hidden_size']}")
  rope = (text.get("rope_parameters") or {}).get("rope_theta", text.get("rope_theta", 10_000.0))
  rope_type = (text.get("rope_parameters") or {}).get("rope_type", "default")
  _check(rope_type == "default", where, f"rope_type={rope_type!r}; only default RoPE is supported")

  heads = text["num_attention_heads"]
  decoder = dict(
      vocab_size=int(text["vocab_size"]), width=int(text["hidden_size"]),
      depth=int(text["num_hidden_layers"]), mlp_dim=int(text["intermediate_size"]),
      num_heads=int(heads), num_kv_heads=int(text.get("num_key_value_heads") or heads),
      head_dim=int(text.get("head_dim") or text["hidden_size"] // heads), rope_base=float(rope),
      post_norms=False, attn_softcap=0.0, final_softcap=0.0, sliding_window=0,
      local_global=False, query_scale=0.0, window_prefix="window",
      prefix_token_shift=0)  # Gemma embeds each token alone
  if text_type == "gemma2":
    depth = decoder["depth"]
    types = text.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                        for i in range(depth)]
    expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(depth)]
    window = text.get("sliding_window")
    if all(t == "full_attention" for t in types):
      window = None  # every layer global (an export of a model without local layers)
    _check(list(types) == expected or not window, where,
           f"text_config.layer_types={types} must alternate sliding/full starting with sliding")
    decoder.update(
        post_norms=True,
        attn_softcap=float(text.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(text.get("final_logit_softcapping") or 0.0),
        sliding_window=int(window or 0), local_global=bool(window),
        query_scale=float(text["query_pre_attn_scalar"]) ** -0.5, window_prefix="full")
  vision_out = dict(
      image_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]),
      width=int(vision["hidden_size"]), depth=int(vision["num_hidden_layers"]),
      mlp_dim=int(vision["intermediate_size"]), num_heads=int(vision["num_attention_heads"]),
      posemb="learn", center_input=False)  # SigLIP sees raw [-1, 1] pixels
  return {"vision": vision_out, "decoder": decoder}


def apply_overrides(model_cfg, overrides: Mapping[str, Mapping[str, Any]]) -> None:
  """Writes ``config_from_hf`` output into ``config.model`` (a ConfigDict), in place."""
  with model_cfg.unlocked():
    for section, values in overrides.items():
      for key, value in values.items():
        model_cfg[section][key] = value


# -------------------------------------------------------------------- tensor names

def canonical_name(name: str) -> str:
  """Any transformers-version spelling of a PaliGemma tensor name -> the canonical one."""
  for old, new in (("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                   ("model.language_model.", "language_model."), ("language_model.model.", "language_model."),
                   ("language_model.lm_head.", "lm_head.")):
    if name.startswith(old):
      name = new + name[len(old):]
  if name.startswith("vision_tower.vision_model."):
    name = "vision_tower." + name[len("vision_tower.vision_model."):]
  elif name.startswith("vision_model."):   # a SiglipVisionModel checkpoint
    name = "vision_tower." + name[len("vision_model."):]
  elif name.startswith("model."):          # a Gemma(2)ForCausalLM checkpoint
    name = "language_model." + name[len("model."):]
  return name


class _Renamed(common.TensorStore):
  def __init__(self, store: common.TensorStore):
    self._store = store
    self._names: dict[str, str] = {}
    for n in store.keys():
      c = canonical_name(n)
      if c in self._names:
        raise WeightsError(f"{store.description}: tensors {self._names[c]} and {n} are the same parameter")
      self._names[c] = n
    self.description = store.description

  def keys(self):
    return self._names.keys()

  def __contains__(self, name):
    return name in self._names

  def shape(self, name):
    return self._store.shape(self._names[name])

  def __getitem__(self, name):
    return self._store[self._names[name]]


# Conversions as (fn, inverse) pairs: checkpoint -> ours, and ours -> checkpoint (export).

def _linear(heads: int | None = None, head_dim: int | None = None):
  """torch (out, in) -> ours (in, out), optionally splitting out into (heads, head_dim)."""
  def fn(w):
    w = np.asarray(w).T
    return w.reshape(w.shape[0], heads, head_dim) if heads else w
  return fn, lambda x: x.reshape(x.shape[0], -1).T


def _out_linear(heads: int, head_dim: int):
  """torch (out, heads * head_dim) -> ours (heads, head_dim, out)."""
  return (lambda w: np.asarray(w).T.reshape(heads, head_dim, -1),
          lambda x: x.reshape(heads * head_dim, -1).T)


def _bias(heads: int | None = None, head_dim: int | None = None):
  if not heads:
    return ()  # the identity
  return lambda b: np.asarray(b).reshape(heads, head_dim), lambda x: x.reshape(-1)


def _conv_kernel():
  """torch conv (D, 3, p, p) -> ours (p, p, 3, D)."""
  return lambda w: np.asarray(w).transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)


def _gated_mlp():
  """torch gate (F, D), up (F, D) -> ours (2, D, F)."""
  return lambda g, u: np.stack([np.asarray(g).T, np.asarray(u).T]), lambda x: (x[0].T, x[1].T)


def param_mapping(model_cfg) -> dict[str, Source]:
  """Our per-layer parameter paths -> canonical HF tensor names and conversions."""
  v, d = model_cfg.vision, model_cfg.decoder
  m: dict[str, Source] = {}
  e = "vision_tower.embeddings."
  m["vision/patch_kernel"] = Source((e + "patch_embedding.weight",), *_conv_kernel())
  m["vision/patch_bias"] = Source((e + "patch_embedding.bias",))
  if v.posemb == "learn":
    m["vision/posemb"] = Source((e + "position_embedding.weight",))
  vh, vd = v.num_heads, v.head_dim
  for i in range(v.depth):
    src, dst = f"vision_tower.encoder.layers.{i}.", f"vision/blocks/{i}/"
    for n in ("1", "2"):
      m[dst + f"norm{n}/scale"] = Source((src + f"layer_norm{n}.weight",))
      m[dst + f"norm{n}/bias"] = Source((src + f"layer_norm{n}.bias",))
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
      m[dst + f"attn/{ours}_kernel"] = Source((src + f"self_attn.{theirs}.weight",), *_linear(vh, vd))
      m[dst + f"attn/{ours}_bias"] = Source((src + f"self_attn.{theirs}.bias",), *_bias(vh, vd))
    m[dst + "attn/o_kernel"] = Source((src + "self_attn.out_proj.weight",), *_out_linear(vh, vd))
    m[dst + "attn/o_bias"] = Source((src + "self_attn.out_proj.bias",))
    m[dst + "mlp/wi"] = Source((src + "mlp.fc1.weight",), *_linear())
    m[dst + "mlp/bi"] = Source((src + "mlp.fc1.bias",))
    m[dst + "mlp/wo"] = Source((src + "mlp.fc2.weight",), *_linear())
    m[dst + "mlp/bo"] = Source((src + "mlp.fc2.bias",))
  m["vision/norm/scale"] = Source(("vision_tower.post_layernorm.weight",))
  m["vision/norm/bias"] = Source(("vision_tower.post_layernorm.bias",))
  m["projection/kernel"] = Source(("multi_modal_projector.linear.weight",), *_linear())
  m["projection/bias"] = Source(("multi_modal_projector.linear.bias",))
  m["decoder/embedding"] = Source(("language_model.embed_tokens.weight",))
  m["decoder/final_norm/scale"] = Source(("language_model.norm.weight",))
  for i in range(d.depth):
    src, dst = f"language_model.layers.{i}.", f"decoder/layers/{i}/"
    m[dst + "attn/q_kernel"] = Source((src + "self_attn.q_proj.weight",), *_linear(d.num_heads, d.head_dim))
    m[dst + "attn/k_kernel"] = Source((src + "self_attn.k_proj.weight",), *_linear(d.num_kv_heads, d.head_dim))
    m[dst + "attn/v_kernel"] = Source((src + "self_attn.v_proj.weight",), *_linear(d.num_kv_heads, d.head_dim))
    m[dst + "attn/o_kernel"] = Source((src + "self_attn.o_proj.weight",), *_out_linear(d.num_heads, d.head_dim))
    m[dst + "mlp/wi"] = Source((src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"), *_gated_mlp())
    m[dst + "mlp/wo"] = Source((src + "mlp.down_proj.weight",), *_linear())
    m[dst + "pre_attn_norm/scale"] = Source((src + "input_layernorm.weight",))
    if d.post_norms:  # Gemma-2
      m[dst + "post_attn_norm/scale"] = Source((src + "post_attention_layernorm.weight",))
      m[dst + "pre_mlp_norm/scale"] = Source((src + "pre_feedforward_layernorm.weight",))
      m[dst + "post_mlp_norm/scale"] = Source((src + "post_feedforward_layernorm.weight",))
    else:  # Gemma-1 calls its pre-MLP norm "post_attention_layernorm"
      m[dst + "pre_mlp_norm/scale"] = Source((src + "post_attention_layernorm.weight",))
  return m


# Tensors a PaliGemma checkpoint may hold that our model has no place for.
IGNORED = (r"^lm_head\.weight$",                 # tied to the embedding
           r"^vision_tower\.head\.",              # SigLIP MAP head (PaliGemma uses pre-head features)
           r"\.position_ids$", r"\.inv_freq$")    # buffers saved by old transformers versions


def open_checkpoint(path: str) -> common.TensorStore:
  """The tensors of an HF checkpoint directory (sharded or not), canonically named."""
  if not os.path.isdir(path):
    raise WeightsError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
  files = common.checkpoint_files(path, "model.safetensors.index.json", "model.safetensors")
  return _Renamed(common.SafetensorsStore(files))


def load_hf_checkpoint(path: str, params, model_cfg, *, shardings=None, donate: bool = False,
                       allow_missing=common.DEFAULT_ALLOW_MISSING):
  """Loads a PaliGemma / PaliGemma-2 HF checkpoint directory into ``params``.

  Args:
    path: directory with config.json and model.safetensors (or an index + shards).
    params: the model's pure-dict params (``train.init_state``: jax arrays on the mesh);
      parameters matching ``allow_missing`` (default: the connector) that the checkpoint
      lacks keep these values. A SigLIP-only or Gemma-only checkpoint loads with e.g.
      ``allow_missing=(r"^connector/", r"^projection/", r"^decoder/")``.
    model_cfg: ``vlm.ModelConfig`` of the model (dimensions, e.g. from ``config_from_hf``).
    shardings: optional ``sharding.param_shardings`` tree; default: the leaves' shardings.
    donate: delete the replaced arrays of ``params`` as it goes (``params`` is then unusable).
  Returns:
    params with the checkpoint's values, each placed on its sharding shard by shard.
  """
  store = open_checkpoint(path)
  return common.assemble(params, param_mapping(model_cfg), store, model_cfg, shardings=shardings,
                         allow_missing=allow_missing, ignore_unused=IGNORED, source_desc=path,
                         donate=donate)


# ----------------------------------------------------------------------------- export

# What our model can hold that HF PaliGemma cannot (each check names the config field):
#   refused   vision.center_input, vision.attn_window (windowed ViT attention), frame_posemb,
#             visual_positions other than 'packed',
#             decoder.prefix_token_shift > 0; with a Gemma-1 decoder (post_norms off) also
#             decoder.attn_softcap, final_softcap, local_global and a query_scale other
#             than head_dim ** -0.5; decoder.window_prefix='window' with local layers (HF
#             exempts the prefix from the window), unless named in ``allow``: the logits
#             then agree only while every prefix is shorter than sliding_window.
#   converted vision.posemb='sincos2d' -> the fixed table written as the learned
#             position_embedding (exact: HF adds the same float32 table);
#             decoder.query_scale -> query_pre_attn_scalar = query_scale ** -2;
#             decoder.sliding_window without local_global (unused) -> every layer global.
ALLOWABLE = ("decoder.window_prefix",)


def unrepresentable(model_cfg, allow=()) -> list[str]:
  """The fields of ``model_cfg`` HF PaliGemma cannot express, each with why ([] = exportable)."""
  bad = [a for a in allow if a not in ALLOWABLE]
  if bad:
    raise ValueError(f"allow={bad[0]!r} is unknown; allowed: {', '.join(ALLOWABLE)}")
  v, d = model_cfg.vision, model_cfg.decoder
  out = []
  if model_cfg.frame_posemb != "none":
    out.append(f"frame_posemb={model_cfg.frame_posemb!r}: HF PaliGemma adds no code to a frame's tokens")
  if model_cfg.visual_positions != "packed":
    out.append(f"visual_positions={model_cfg.visual_positions!r}: HF PaliGemma numbers the image "
               "and text tokens in sequence order")
  if v.center_input:
    out.append("vision.center_input=True: HF SigLIP does not subtract each image's mean colour")
  if v.attn_window and v.global_blocks < v.depth:
    out.append(f"vision.attn_window={v.attn_window}: HF SigLIP blocks attend globally")
  if d.prefix_token_shift:
    out.append(f"decoder.prefix_token_shift={d.prefix_token_shift}: Gemma embeds each token alone")
  if not d.post_norms:  # Gemma-1
    for name in ("attn_softcap", "final_softcap"):
      if getattr(d, name):
        out.append(f"decoder.{name}={getattr(d, name)}: HF Gemma (post_norms=False) has no soft-cap")
    if d.local_global:
      out.append("decoder.local_global=True: HF Gemma (post_norms=False) has no local layers")
    if d.query_scale and abs(d.query_scale - d.head_dim ** -0.5) > 1e-12:
      out.append(f"decoder.query_scale={d.query_scale}: HF Gemma (post_norms=False) scales queries "
                 f"by head_dim ** -0.5 = {d.head_dim ** -0.5}")
  elif d.local_global and d.window_prefix == "window" and "decoder.window_prefix" not in allow:
    out.append("decoder.window_prefix='window': HF's local layers exempt the prefix from the "
               f"window (window_prefix='full'); equal only while every prefix is shorter than "
               f"sliding_window={d.sliding_window} (allow 'decoder.window_prefix' to export anyway)")
  return out


def default_image_token(vocab_size: int) -> int:
  """PaliGemma's ``<image>`` id (257152) when the vocabulary holds it, else ``vocab_size``: an
  id no text token has, which HF's PaliGemma maps to padding before the embedding lookup."""
  return 257_152 if vocab_size > 257_152 else vocab_size


def hf_config(model_cfg, *, image_token_index: int | None = None, dtype: str = "float32") -> dict:
  """The ``config.json`` of a ``PaliGemmaForConditionalGeneration`` equal to ``model_cfg``
  (the inverse of ``config_from_hf``; check ``unrepresentable`` first)."""
  v, d = model_cfg.vision, model_cfg.decoder
  image_token = default_image_token(d.vocab_size) if image_token_index is None else int(image_token_index)
  if image_token < 0:
    raise ValueError(f"image_token_index={image_token} must be >= 0")
  vision = dict(model_type="siglip_vision_model", hidden_size=v.width, intermediate_size=v.mlp_dim,
                num_hidden_layers=v.depth, num_attention_heads=v.num_heads, image_size=v.image_size,
                patch_size=v.patch_size, num_channels=3, hidden_act="gelu_pytorch_tanh",
                layer_norm_eps=_EPS, attention_dropout=0.0, projection_dim=d.width,
                vision_use_head=False)
  text = dict(vocab_size=d.vocab_size, hidden_size=d.width, intermediate_size=d.mlp_dim,
              num_hidden_layers=d.depth, num_attention_heads=d.num_heads,
              num_key_value_heads=d.num_kv_heads, head_dim=d.head_dim, rms_norm_eps=_EPS,
              rope_parameters={"rope_type": "default", "rope_theta": float(d.rope_base)},
              attention_bias=False, attention_dropout=0.0, max_position_embeddings=8192,
              num_image_tokens=v.grid_size ** 2, tie_word_embeddings=True,
              use_bidirectional_attention=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
  if d.post_norms:
    scalar = (d.query_scale or d.head_dim ** -0.5) ** -2
    scalar = round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar
    local = [d.is_local(i) for i in range(d.depth)]
    text.update(model_type="gemma2", hidden_activation="gelu_pytorch_tanh",
                query_pre_attn_scalar=scalar, attn_logit_softcapping=d.attn_softcap,
                final_logit_softcapping=d.final_softcap,
                sliding_window=d.sliding_window if d.local_global else None,
                layer_types=["sliding_attention" if x else "full_attention" for x in local])
  else:
    text.update(model_type="gemma", hidden_act="gelu_pytorch_tanh")
  return dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
              dtype=dtype, hidden_size=d.width, image_token_index=image_token,
              projection_dim=d.width, vocab_size=d.vocab_size, tie_word_embeddings=True,
              text_config=text, vision_config=vision)


def saved_name(canonical: str) -> str:
  """Canonical tensor name -> the name transformers' ``save_pretrained`` writes."""
  if canonical.startswith("language_model."):
    return "language_model.model." + canonical[len("language_model."):]
  return canonical


def export_hf(params, model_cfg, out_dir: str, *, image_token_index: int | None = None,
              allow=(), max_shard_bytes: int = 0) -> list[common.Written]:
  """Writes the backbone of ``params`` (any layout, sharded or not) as a PaliGemma directory
  that ``PaliGemmaForConditionalGeneration.from_pretrained`` and ``load_hf_checkpoint`` read.

  Writes ``config.json`` (``hf_config``) and ``model.safetensors`` (or, with
  ``max_shard_bytes`` > 0, ``model-0000i-of-0000n.safetensors`` and
  ``model.safetensors.index.json``) with the tensors of ``param_mapping``, in their dtype;
  the tied ``lm_head`` is not written (as ``save_pretrained``). Connector parameters are
  not part of it (``connector.export_connector`` writes them). Fields HF cannot express
  raise ValueError naming them (see ``unrepresentable``); ``allow`` accepts the named
  inexact ones. Returns what was written.
  """
  problems = unrepresentable(model_cfg, allow)
  if problems:
    raise ValueError("the model cannot be written as a Hugging Face PaliGemma: " + "; ".join(problems))
  flat = common.unscan(common.host_params(params), model_cfg)
  flat = {p: x for p, x in flat.items() if not p.startswith("connector/")}
  v = model_cfg.vision
  if v.posemb != "learn":  # the fixed table our ViT adds, as HF's learned one
    dtype = flat["vision/patch_kernel"].dtype
    flat["vision/posemb"] = np.asarray(layers.sincos_2d(v.grid_size, v.width)).astype(dtype)
    model_cfg = dataclasses.replace(model_cfg, vision=dataclasses.replace(v, posemb="learn"))
  dtype = str(flat["decoder/embedding"].dtype)
  os.makedirs(out_dir, exist_ok=True)
  written = [common.write_json(os.path.join(out_dir, "config.json"),
                               hf_config(model_cfg, image_token_index=image_token_index, dtype=dtype))]
  tensors = ((saved_name(n), x) for n, x in common.export_tensors(flat, param_mapping(model_cfg)))
  written += common.write_safetensors_shards(out_dir, "model", tensors, max_shard_bytes,
                                             metadata={"format": "pt"})
  return written
