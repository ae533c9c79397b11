"""PaliGemma-style assembly: image -> ViT -> connector(budget) -> projection -> prefix-LM.

The LLM input is ``[visual tokens (bucket.num_slots); text (L)]``. Visual tokens
and the text prefix attend to each other fully; the suffix is causal. Masked
visual slots (beyond an example's budget) are invalid tokens for the decoder:
they neither attend nor are attended to and do not advance positions, so a
bucketed forward pass equals the compact one on every valid position.
``has_image`` (b,) False marks a text-only example: all its visual slots are
masked so, whatever its (dummy) image and budget, it equals a text-only run.

Several frames (video, or several images) per example: images (b, T, H, W, 3) with a
``frame_mask`` (b, T). Every frame goes through the ViT and the connector on its own at the
example's budget (folded into the batch, (b*T, ...)), and the frames' tokens are concatenated
in frame order, ``[frame 0 (slots); ...; frame T-1 (slots); text]``. A missing frame's slots
are masked, so a padded example equals the same example with only its real frames.

Decoder positions (``visual_positions``): ``'packed'`` (default) numbers the valid tokens
in order, so the text starts right after the example's budget. ``'reserved'`` gives every
frame R positions, R = the largest budget of the method's space, puts slot i of frame f at
f R + i whatever the budget, and starts the text at T R: the distance from a text token to a
given slot (an anchor, a query, a patch) is then the same at every budget, as it is for a
fixed-length image prefix. With 'packed' a stochastic budget moves the text by the budget, so
the decoder's relative (RoPE) positions to every visual token change from step to step.
``'spatial'`` reserves grid*grid positions per frame and puts each slot at the raster cell
it stands for (``Connector.slot_cells``: a pooled token at its block, a query at its home
cell, a kept patch at itself): at every budget a token sits where the uncompressed model
(stage 1) had the patches it summarises, so a decoder that reads the grid by position keeps
reading it. Methods whose slots have no cell (learned queries without a home) refuse it.

``frame_posemb='sincos'`` (default 'none', as PaliGemma) adds a fixed code of each frame's
rank among the example's real frames to its visual tokens, zero for the first: a single
image is frame 0 unchanged. Without it the decoder can tell frames apart only by their
distance in the sequence, which is the per-frame budget times the frame index: with
stochastic budgets one distance means different frames at different budgets.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parcel_jax import sharding
from parcel_jax.budgets import Bucket
from parcel_jax.models import connectors, gemma, layers, vit

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
FRAME_POSEMBS = ("none", "sincos")
VISUAL_POSITIONS = ("packed", "reserved", "spatial")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vision: vit.ViTConfig
  connector: connectors.ConnectorConfig
  decoder: gemma.DecoderConfig
  frame_posemb: str = "none"  # none | sincos: a code of each frame's rank on its visual tokens
  visual_positions: str = "packed"  # packed | reserved | spatial: decoder positions (module docstring)

  def __post_init__(self):
    if self.frame_posemb not in FRAME_POSEMBS:
      raise ValueError(f"model.frame_posemb={self.frame_posemb!r} is unknown; allowed: "
                       f"{', '.join(FRAME_POSEMBS)}")
    if self.visual_positions not in VISUAL_POSITIONS:
      raise ValueError(f"model.visual_positions={self.visual_positions!r} is unknown; allowed: "
                       f"{', '.join(VISUAL_POSITIONS)}")


# Config keys of model sections that are read elsewhere, not by the module dataclasses:
# the budget space (``budgets.BudgetSpec``) and the size preset (``preset_sizes``).
NON_MODULE_KEYS = {"vision": {"variant"}, "decoder": {"variant"},
                   "connector": {"budgets", "query_bucket"}}
_PRESETS = {"vision": (vit.preset, vit.PRESETS, vit.SIZE_FIELDS),
            "decoder": (gemma.preset, gemma.PRESETS, gemma.SIZE_FIELDS)}


def preset_sizes(section: str, cfg) -> dict:
  """The size fields ``model.<section>`` (a ConfigDict) leaves at 0, from the preset that its
  ``variant`` names (``vit.PRESETS`` / ``gemma.PRESETS``).

  Precedence: a non-zero field in the config, then the preset, then (``decoder.vocab_size``
  only, in ``config.validate_config``) the data's tokenizer. ``variant=""`` names no preset;
  every size field must then be set. A size left at 0 that nothing fills is an error naming it.
  """
  if section not in _PRESETS:
    return {}
  lookup, presets, fields = _PRESETS[section]
  name = cfg.get("variant", "")
  sizes = lookup(name, f"model.{section}.variant") if name else {}
  fills = {k: v for k, v in sizes.items() if not cfg.get(k)}
  for field in fields:
    if field in cfg and not cfg[field] and field not in fills and field != "vocab_size":
      raise ValueError(f"model.{section}.{field}=0 and model.{section}.variant={name!r} has no "
                       f"size for it; set it, or name a preset ({', '.join(presets)})")
  return fills


def apply_presets(model_cfg) -> None:
  """Writes ``preset_sizes`` into ``config.model`` (a ConfigDict), in place."""
  for section in _PRESETS:
    fills = preset_sizes(section, model_cfg[section])
    with model_cfg.unlocked():
      model_cfg[section].update(fills)


def _dataclass_from(cls, cfg, section: str, **extra):
  """Builds dataclass ``cls`` from ConfigDict section ``model.<section>``; a key that is
  neither a field of ``cls`` nor read elsewhere is an error naming it (a typo in an override
  must not be dropped silently)."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(cfg.keys()) - names - NON_MODULE_KEYS.get(section, set()) - set(extra))
  if unknown:
    allowed = sorted((names | NON_MODULE_KEYS.get(section, set())) - set(extra))
    raise ValueError(f"model.{section}.{unknown[0]} is not a field of the {section} config"
                     f"{' (nor ' + ', '.join(unknown[1:]) + ')' if unknown[1:] else ''}; "
                     f"allowed: {', '.join(allowed)}")
  values = {k: v for k, v in cfg.items() if k in names}
  values.update(preset_sizes(section, cfg))
  for key in ("dtype", "param_dtype"):
    if isinstance(values.get(key), str):
      if values[key] not in DTYPES:
        raise ValueError(f"model.{section}.{key}={values[key]!r} is unknown; allowed: {', '.join(DTYPES)}")
      values[key] = DTYPES[values[key]]
  values.update(extra)
  return cls(**values)


def model_config(model_cfg) -> ModelConfig:
  """ModelConfig from ``config.model`` (a ConfigDict); ``dtype`` there is the compute dtype."""
  dtype = model_cfg.get("dtype", "float32")
  common = dict(dtype=None if dtype == "float32" else DTYPES[dtype])
  allowed = ("dtype", "vision", "connector", "decoder", "frame_posemb", "visual_positions")
  unknown = sorted(set(model_cfg.keys()) - set(allowed))
  if unknown:
    raise ValueError(f"model.{unknown[0]} is unknown; allowed: {', '.join(allowed)}")
  vision = _dataclass_from(vit.ViTConfig, model_cfg.vision, "vision", **common)
  grid = vision.image_size // vision.patch_size
  connector = _dataclass_from(connectors.ConnectorConfig, model_cfg.connector, "connector",
                              width=vision.width, grid_size=grid, **common)
  decoder = _dataclass_from(gemma.DecoderConfig, model_cfg.decoder, "decoder", **common)
  return ModelConfig(vision, connector, decoder, model_cfg.get("frame_posemb", "none"),
                     model_cfg.get("visual_positions", "packed"))


class VLM(nnx.Module):
  """Vision-language model with an elastic connector."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.vision = vit.ViT(cfg.vision, rngs=rngs)
    self.connector = connectors.make_connector(cfg.connector, rngs=rngs)
    # PaliGemma's single linear map from vision width to LLM width.
    self.projection = nnx.Linear(
        cfg.vision.width, cfg.decoder.width, use_bias=True, dtype=cfg.decoder.dtype,
        kernel_init=layers.param_init(nnx.initializers.lecun_normal(), ("embed", "llm_embed")),
        bias_init=layers.param_init(nnx.initializers.zeros, ("llm_embed",)), rngs=rngs)
    self.decoder = gemma.Decoder(cfg.decoder, rngs=rngs)

  def encode_images(self, images: Array, bucket: Bucket | None = None) -> Array:
    """(b, H, W, 3) in [-1, 1] -> features (b, grid, grid, vision width); frames
    (b, T, H, W, 3) -> (b, T, grid, grid, vision width), each frame encoded on its own.

    ``bucket``: the layout the features are for. Read only by a method whose ViT input
    depends on it (``Connector.encodes_per_budget``: the features are then (b, g, g, width)
    at the method's ``vision_grid``); every other method's features serve every bucket."""
    if images.ndim == 5:
      b, t = images.shape[:2]
      features = self.encode_images(images.reshape(b * t, *images.shape[2:]), bucket)
      return features.reshape(b, t, *features.shape[1:])
    connector = self.connector
    if not connector.encodes_per_budget:
      return self.vision(images)
    if bucket is None:
      raise ValueError(f"method {connector.name!r} encodes the image for each budget: "
                       "encode_images needs the bucket the features are for")
    return self.vision(connector.vision_input(images, bucket),
                       grid=connector.vision_grid(connector.cfg, bucket))

  def visual_tokens(self, features: Array, bucket: Bucket, budgets: Array,
                    frame_mask: Array | None = None) -> tuple[Array, Array]:
    """features (b, g, g, Dv), budgets (b,) -> tokens (b, slots, Dl), mask (b, slots).

    Frames: features (b, T, g, g, Dv), ``frame_mask`` (b, T) (None = every frame is real) ->
    tokens (b, T*slots, Dl) in frame order, mask (b, T*slots): every frame at its example's
    budget, a missing frame's slots masked."""
    if features.ndim == 5:
      b, t = features.shape[:2]
      tokens, mask = self.visual_tokens(features.reshape(b * t, *features.shape[2:]), bucket,
                                        jnp.repeat(budgets, t))
      mask = mask.reshape(b, t, bucket.num_slots)
      if frame_mask is not None:
        mask = mask & frame_mask.astype(bool)[:, :, None]
      tokens = tokens.reshape(b, t, bucket.num_slots, -1)
      if self.cfg.frame_posemb == "sincos":
        tokens = tokens + self.frame_codes(frame_mask, b, t, tokens.shape[-1]).astype(tokens.dtype)
      tokens = sharding.constrain(tokens.reshape(b, t * bucket.num_slots, -1), layers.BTD)
      return tokens, mask.reshape(b, t * bucket.num_slots)
    if frame_mask is not None:
      raise ValueError(f"frame_mask is for frames (b, T, g, g, Dv); features are {features.shape}")
    tokens, mask = self.connector(features, bucket, budgets)
    chex.assert_shape(tokens, (features.shape[0], bucket.num_slots, self.cfg.vision.width))
    tokens = sharding.constrain(tokens, layers.BTD)
    return sharding.constrain(self.projection(tokens), layers.BTD), mask

  @staticmethod
  def frame_codes(frame_mask: Array | None, b: int, t: int, width: int) -> Array:
    """(b, T, 1, width): the sin-cos code of each frame's rank among its example's real frames
    (``frame_mask`` (b, T), None = all real) minus the code of rank 0, so the first frame's is 0
    and a padded example's real frames get the codes they have alone."""
    rank = (jnp.broadcast_to(jnp.arange(t), (b, t)) if frame_mask is None
            else jnp.cumsum(frame_mask.astype(jnp.int32), axis=1) - 1)
    codes = layers.sincos_1d(rank, width) - layers.sincos_1d(jnp.zeros((), jnp.int32), width)
    return codes[:, :, None, :]

  def decoder_inputs(self, features: Array, text: Array, text_mask: Array, *, bucket: Bucket,
                     budgets: Array, ar_mask: Array | None = None,
                     has_image: Array | None = None,
                     frame_mask: Array | None = None) -> tuple[Array, Array]:
    """The decoder's input sequence ``[visual tokens (bucket.num_slots); embedded text (L)]``
    (b, slots + L, Dl) and its validity mask (b, slots + L). ``ar_mask`` (b, L) marks the
    causal suffix; None = the text is all prompt (prefill). ``has_image`` (b,) False masks
    every visual slot of that example (text-only); None = every example has its image.
    Frames (features (b, T, ...), ``frame_mask`` (b, T)): T*slots visual tokens."""
    visual, visual_mask = self.visual_tokens(features, bucket, budgets, frame_mask)
    if has_image is not None:
      visual_mask = visual_mask & has_image.astype(bool)[:, None]
    prompt = text_mask.astype(bool)
    if ar_mask is not None:
      prompt = prompt & ~ar_mask.astype(bool)
    embedded = self.decoder.embed(text, shift_mask=prompt)
    x = sharding.constrain(jnp.concatenate([visual.astype(embedded.dtype), embedded], axis=1), layers.BTD)
    return x, jnp.concatenate([visual_mask, text_mask.astype(bool)], axis=1)

  def decoder_positions(self, features: Array, input_mask: Array, bucket: Bucket) -> Array | None:
    """Positions (b, S) of ``decoder_inputs``' sequence ``[visual (T * bucket.num_slots); text]``
    for its ``input_mask`` (b, S), T = the frames of ``features`` (1 for (b, g, g, Dv)); None =
    the decoder's default (``'packed'``: valid tokens in order)."""
    mode, connector = self.cfg.visual_positions, self.connector
    if mode == "packed":
      return None
    num_frames = features.shape[1] if features.ndim == 5 else 1
    num_visual = num_frames * bucket.num_slots
    if mode == "reserved":
      return reserved_positions(input_mask, num_visual, num_frames,
                                max(type(connector).budget_space(connector.cfg)))
    cells = connector.slot_cells(bucket)
    if cells is None:
      raise ValueError(f"model.visual_positions='spatial' needs slots with a place on the grid; "
                       f"method {connector.name!r} has none here (a query has a home cell only "
                       "with model.connector.query_prior='local')")
    return reserved_positions(input_mask, num_visual, num_frames, connector.cfg.grid_size ** 2,
                              slot_positions=cells)

  def text_hidden(self, features: Array, text: Array, text_mask: Array, ar_mask: Array, *,
                  bucket: Bucket, budgets: Array, has_image: Array | None = None,
                  frame_mask: Array | None = None) -> Array:
    """The decoder's final hidden states (after the final norm) at the text positions,
    (b, L, Dl), given precomputed vision features; ``text_logits`` applies the head."""
    b, length = text.shape
    x, input_mask = self.decoder_inputs(features, text, text_mask, bucket=bucket, budgets=budgets,
                                        ar_mask=ar_mask, has_image=has_image, frame_mask=frame_mask)
    num_visual = x.shape[1] - length   # slots, or T*slots for frames
    ar = jnp.concatenate([jnp.zeros((b, num_visual), bool), ar_mask.astype(bool)], axis=1)
    hidden = self.decoder(x, input_mask=input_mask, ar_mask=ar,
                          positions=self.decoder_positions(features, input_mask, bucket))
    return hidden[:, num_visual:]

  def text_logits(self, features: Array, text: Array, text_mask: Array, ar_mask: Array, *,
                  bucket: Bucket, budgets: Array, has_image: Array | None = None,
                  frame_mask: Array | None = None) -> Array:
    """Logits over the text positions given precomputed vision features.

    Args:
      features: (b, g, g, Dv) from ``encode_images`` (evaluation reuses them for every budget
        unless the method encodes per budget).
      text, text_mask, ar_mask: (b, L); ``ar_mask`` True marks causal (suffix) tokens.
      bucket: static visual layout; budgets: (b,) int32 visual tokens per example.
      has_image: (b,) bool, False for a text-only example (no visual tokens); None = all True.
      frame_mask: (b, T) bool for frames (features (b, T, g, g, Dv)): False for a missing
        frame; None = every frame is real.
    Returns: (b, L, vocab).
    """
    b, length = text.shape
    logits = self.decoder.logits(self.text_hidden(features, text, text_mask, ar_mask,
                                                  bucket=bucket, budgets=budgets, has_image=has_image,
                                                  frame_mask=frame_mask))
    chex.assert_shape(logits, (b, length, self.cfg.decoder.vocab_size))
    return logits

  def __call__(self, images: Array, text: Array, text_mask: Array, ar_mask: Array, *,
               bucket: Bucket, budgets: Array, has_image: Array | None = None,
               frame_mask: Array | None = None) -> Array:
    """images (b, H, W, 3) or frames (b, T, H, W, 3) with ``frame_mask`` (b, T), text/masks
    (b, L), budgets (b,) -> logits (b, L, vocab)."""
    return self.text_logits(self.encode_images(images, bucket), text, text_mask, ar_mask,
                            bucket=bucket, budgets=budgets, has_image=has_image,
                            frame_mask=frame_mask)


def reserved_positions(input_mask: Array, num_visual: int, num_frames: int, reserved: int,
                       slot_positions=None) -> Array:
  """``visual_positions='reserved'`` / ``'spatial'``: slot i of frame f at f * reserved + p_i
  (p_i = i, or ``slot_positions[i]`` in [0, reserved)), the text (the tokens after
  ``num_visual``) at num_frames * reserved on, its valid tokens in order.
  input_mask (b, S) -> (b, S) int32."""
  slots = num_visual // num_frames
  if slot_positions is None:
    if slots > reserved:
      raise ValueError(f"{slots} visual slots per frame exceed the {reserved} positions reserved "
                       "for a frame (the largest budget of the method's space)")
    slot_positions = np.arange(slots)
  slot_positions = np.asarray(slot_positions, np.int32)
  if slot_positions.shape != (slots,):
    raise ValueError(f"{slot_positions.shape[0]} slot positions for {slots} visual slots per frame")
  b = input_mask.shape[0]
  frame, slot = np.divmod(np.arange(num_visual), slots)
  visual = jnp.broadcast_to(frame * reserved + slot_positions[slot], (b, num_visual))
  text = num_frames * reserved + gemma.default_positions(input_mask[:, num_visual:])
  return jnp.concatenate([visual, text], axis=1).astype(jnp.int32)


def parameter_counts(model: VLM) -> dict[str, int]:
  """Parameters per top-level module and in total."""
  counts = {name: layers.num_params(nnx.state(getattr(model, name), nnx.Param))
            for name in ("vision", "connector", "projection", "decoder")}
  counts["total"] = sum(counts.values())
  return counts
