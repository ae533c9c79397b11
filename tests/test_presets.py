"""Model size presets: ``model.vision.variant`` / ``model.decoder.variant`` fill the size fields a
config leaves at 0, explicit fields override them, and every config builds the model it built when
it spelled the sizes out."""

import dataclasses

import numpy as np
import pytest

from configs import base
from configs.paligemma2 import m3_224, mqt_224, none_224, parcel_224, parcel_448
from parcel_jax import config as config_lib
from parcel_jax.models import gemma, vit, vlm

# The sizes each config spelled out before it named a preset.
BASE_VISION = dict(image_size=64, patch_size=4, width=64, depth=1, mlp_dim=256, num_heads=2)
BASE_DECODER = dict(width=64, depth=2, mlp_dim=256, num_heads=2, num_kv_heads=1, head_dim=32)
SO400M = dict(patch_size=14, width=1152, depth=27, mlp_dim=4304, num_heads=16)
GEMMA2_2B = dict(vocab_size=257_152, width=2304, depth=26, mlp_dim=9216, num_heads=8, num_kv_heads=4,
                 head_dim=256)


def _sizes(cfg, fields):
  return {f: getattr(cfg, f) for f in fields}


@pytest.mark.parametrize("method", ["parcel", "m3", "mqt", "none"])
def test_embedded_default_builds_the_model_it_spelled_out(method):
  c = base.get_config(method)
  model_cfg, _ = config_lib.validate_config(c)
  assert _sizes(model_cfg.vision, BASE_VISION) == BASE_VISION
  assert _sizes(model_cfg.decoder, BASE_DECODER) == BASE_DECODER
  # The tokenizer still sets the vocabulary (the tiny preset has none), and the config now holds
  # the resolved sizes, the data's image size following the vision's by reference.
  assert model_cfg.decoder.vocab_size == c.model.decoder.vocab_size > 0
  assert c.model.vision.width == 64 and c.data.image_size == 64
  # The switches base.py sets, unchanged by the presets.
  d, v = model_cfg.decoder, model_cfg.vision
  assert (d.post_norms, d.attn_softcap, d.final_softcap, d.sliding_window, d.local_global,
          d.prefix_token_shift) == (True, 50.0, 30.0, None, False, 3)
  assert (v.posemb, v.center_input) == ("sincos2d", True)


@pytest.mark.parametrize("module, image_size", [(parcel_224, 224), (m3_224, 224), (mqt_224, 224),
                                                (none_224, 224), (parcel_448, 448)])
def test_recipes_build_the_model_they_spelled_out(module, image_size):
  c = module.get_config()
  c.data.name, c.data.max_text_len = "synthetic", 16  # no tokenizer file needed
  assert (c.model.vision.variant, c.model.decoder.variant) == ("so400m_14", "gemma2_2b")
  model_cfg, spec = config_lib.validate_config(c)
  v, d = model_cfg.vision, model_cfg.decoder
  assert _sizes(v, SO400M) == SO400M and v.image_size == image_size == c.data.image_size
  assert _sizes(d, GEMMA2_2B) == GEMMA2_2B
  assert spec.grid_size == image_size // 14
  assert (d.post_norms, d.attn_softcap, d.final_softcap, d.sliding_window, d.local_global,
          d.query_scale, d.prefix_token_shift) == (True, 50.0, 30.0, 4096, True, 256 ** -0.5, 0)
  assert (v.posemb, v.center_input, v.scan, d.scan) == ("learn", False, True, True)


def test_explicit_fields_override_the_preset():
  """Fresh random sizes on a random subset of fields: those are built, the rest is the preset's."""
  rng = np.random.default_rng()
  # A width of 16k splits into any of these head counts, the preset's 16 included.
  chosen = {"width": 16 * int(rng.integers(1, 5)), "depth": int(rng.integers(1, 4)),
            "mlp_dim": int(rng.integers(8, 300)), "num_heads": int(rng.choice([1, 2, 4, 8, 16]))}
  keep = [k for k in chosen if rng.random() < 0.5] or ["depth"]
  print("overrides", {k: chosen[k] for k in keep})
  c = base.get_config()
  c.model.vision.variant = "so400m_14"   # as --config.model.vision.variant=so400m_14 would
  c.model.decoder.vocab_size = 64         # model_config alone does not read the tokenizer
  for k in keep:
    c.model.vision[k] = chosen[k]
  want = {**vit.PRESETS["so400m_14"], **{k: chosen[k] for k in keep}}
  # model_config on a copy of the config resolves the same sizes as validate_config in place.
  copied = vlm.model_config(config_lib.model_fields(c.model)).vision
  assert c.model.vision.image_size == 0   # the copy left the config as it was
  validated = config_lib.validate_config(c)[0].vision
  assert _sizes(copied, want) == _sizes(validated, want) == want
  assert copied == validated


def test_a_copy_resolved_before_the_presets_builds_the_same():
  """copy_and_resolve_references() (as tools copying a config do) breaks data.image_size's
  reference to the vision's while both are still 0."""
  copy = base.get_config().copy_and_resolve_references()
  assert copy.data.image_size == 0
  model_cfg, _ = config_lib.validate_config(copy)
  assert copy.data.image_size == model_cfg.vision.image_size == 64


def test_variant_switches_every_size():
  c = base.get_config()
  c.model.vision.variant, c.model.decoder.variant = "so400m_14", "gemma2_2b"
  model_cfg, spec = config_lib.validate_config(c, check_data=False)
  assert _sizes(model_cfg.vision, vit.PRESETS["so400m_14"]) == vit.PRESETS["so400m_14"]
  assert _sizes(model_cfg.decoder, GEMMA2_2B) == GEMMA2_2B
  assert spec.grid_size == 16 and c.data.image_size == 224


@pytest.mark.parametrize("section, name", [("vision", "so400m"), ("decoder", "gemma_7b")])
def test_unknown_preset_names_the_field_and_the_presets(section, name):
  c = base.get_config()
  c.model[section].variant = name
  presets = {"vision": vit.PRESETS, "decoder": gemma.PRESETS}[section]
  with pytest.raises(ValueError, match=rf"model\.{section}\.variant='{name}' is not a .*presets: "
                     + ", ".join(presets)):
    config_lib.validate_config(c)


@pytest.mark.parametrize("section, field", [("vision", "mlp_dim"), ("decoder", "head_dim")])
def test_no_preset_needs_every_size(section, field):
  c = base.get_config()
  c.model[section].variant = ""
  sizes = {"vision": BASE_VISION, "decoder": BASE_DECODER}[section]
  for k, value in sizes.items():
    if k != field:
      c.model[section][k] = value
  with pytest.raises(ValueError, match=rf"model\.{section}\.{field}=0 and model\.{section}\.variant=''"):
    config_lib.validate_config(c)
  c.model[section][field] = sizes[field]   # spelled out: no preset needed
  model_cfg, _ = config_lib.validate_config(c)
  assert _sizes(getattr(model_cfg, section), sizes) == sizes


def test_saved_configs_label_still_resolves():
  """Configs saved before the presets carry the label 'So400m/14' next to explicit sizes."""
  assert vit.vit_config("So400m/14") == vit.vit_config("so400m_14")
  c = base.get_config()
  c.model.vision.variant = "So400m/14"
  for k, value in BASE_VISION.items():
    c.model.vision[k] = value
  model_cfg, _ = config_lib.validate_config(c)
  assert _sizes(model_cfg.vision, BASE_VISION) == BASE_VISION


def test_dataclass_defaults_are_siglip_and_gemma2():
  """The schema's switches default to the paper's models; the CPU-task aids default off."""
  v = vit.ViTConfig(**vit.PRESETS["so400m_14"])
  assert (v.posemb, v.center_input, v.attn_window) == ("learn", False, 0)
  d = gemma.DecoderConfig(**gemma.PRESETS["gemma2_2b"])
  assert d == gemma.decoder_config("gemma2_2b")
  assert (d.post_norms, d.attn_softcap, d.final_softcap, d.sliding_window, d.local_global,
          d.prefix_token_shift, d.window_prefix) == (True, 50.0, 30.0, 4096, True, 0, "window")
  assert [d.is_local(i) for i in range(4)] == [True, False, True, False]
  assert dataclasses.replace(d, query_scale=256 ** -0.5).query_scale == d.head_dim ** -0.5
  for presets, fields in ((vit.PRESETS, vit.SIZE_FIELDS), (gemma.PRESETS, gemma.SIZE_FIELDS)):
    for sizes in presets.values():
      assert set(sizes) <= set(fields)   # presets hold sizes only
