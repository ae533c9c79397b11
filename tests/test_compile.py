"""Compile-only checks for TPU slices (``parcel_jax.compile``), on this CPU machine.

libtpu compiles for a named topology without TPU hardware. The tiny config's train step is
compiled for 1, 2 and 4 v4 chips under FSDP: memory analysis is present, per-device
argument bytes (parameters + Adam state + the batch) shrink about as 1 / devices, and XLA's
FLOPs agree with the Appendix-C cost model. With T frames per example (``data.max_frames`` or
``--frames``) the programs take (b, T, S, S, 3) frames and their FLOPs grow as the cost model's.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from parcel_jax import topologies

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason="libtpu is not installed (pip install 'jax[tpu]==0.10.2'); compile-only "
    "TPU checks skipped")


def test_named_topologies():
  t = topologies.parse("v4-512")
  assert (t.num_chips, t.libtpu_name, t.chip.hbm_bytes) == (256, "v4:4x8x8", 32 << 30)
  assert topologies.parse("v5e-256").num_chips == 256
  assert topologies.parse("v4-8").num_chips == 4
  assert topologies.parse("v4:8x8x4").num_chips == 256
  with pytest.raises(ValueError, match="v4-512"):
    topologies.parse("v4-3")
  with pytest.raises(ValueError, match="unknown"):
    topologies.parse("v5e:2x2x2")  # v5e slices are 2-D


def _tiny(fsdp: int):
  from tests.conftest import tiny_config
  c = tiny_config()
  c.model.decoder.vocab_size = 128
  c.model.connector.budgets = (64,)   # one bucket (8x8 anchors): one compile per mesh
  c.eval.budgets = (64,)
  c.train.batch_size = 8
  c.mesh.shape = (1, fsdp, 1)
  return c


@pytest.fixture(scope="module")
def reports():
  from parcel_jax import compile as compile_lib
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  out = {}
  for chips, name in ((1, "v5e-1"), (4, "v4-8")):
    config = _tiny(chips)
    out[chips] = compile_lib.compile_train(config, topologies.parse(name))[0]
  return out


@needs_libtpu
def test_memory_analysis_is_present_and_fits(reports):
  for chips, r in reports.items():
    # A tiny step may keep every temporary in on-chip memory (0 HBM temporaries on one chip).
    assert r.argument_bytes > 0 and r.temp_bytes >= 0 and r.code_bytes > 0, (chips, r)
    assert r.fits and r.peak_bytes < r.hbm_bytes


@needs_libtpu
def test_fsdp_shrinks_the_arguments(reports):
  """Each chip holds its shard of every parameter, Adam moment and batch row: 4-way FSDP cuts
  the arguments toward 1/4 (measured 0.39x: at this model's widths of 32 the norms, biases
  and TPU layout padding of small arrays are a large share, and they stay whole)."""
  one, four = reports[1].argument_bytes, reports[4].argument_bytes
  print(f"argument bytes per chip: 1 chip {one}, 4 chips {four} ({four / one:.3f}x)")
  assert four <= 0.45 * one


@needs_libtpu
def test_xla_flops_agree_with_the_cost_model(reports):
  for chips, r in reports.items():
    ratio = r.xla_flops * chips / r.model_flops_total
    print(f"{chips} chips: XLA {r.xla_flops * chips / 1e9:.3f} GFLOPs, model {r.model_flops_total / 1e9:.3f}, "
          f"ratio {ratio:.3f}")
    assert 0.95 < ratio < 1.5


def test_an_out_of_hbm_refusal_is_reported_with_its_temporaries():
  from parcel_jax import compile as compile_lib
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (1.97T) exceeds available HBM (30.75G).")
  r = compile_lib._refused("train", "8x8+192q", 8192, message, topologies.parse("v4-512"), 1.0, {})
  assert not r.fits and r.temp_bytes == int(1.97 * (1 << 40))
  table = compile_lib.format_reports([r], topologies.parse("v4-512"))
  assert "refused by XLA" in table and "does not fit" in table


# ------------------------------------------------------------------ frames

FRAMES = 4


@pytest.fixture(scope="module")
def frame_reports(reports):
  """The tiny config's train step on one v5e chip at 1 frame (``reports``: one image per
  example) and at FRAMES frames per example (through ``data.max_frames``), and its prefill +
  decode at B=64 with FRAMES frames."""
  from parcel_jax import compile as compile_lib
  topology = topologies.parse("v5e-1")
  config = _tiny(1)
  config.data.max_frames = FRAMES
  return {1: reports[1], FRAMES: compile_lib.compile_train(config, topology)[0], "config": config,
          "serving": compile_lib.compile_serving(config, topology, budgets=[64], batch=8)}


def _forward_cost(config, bucket, frames: int) -> int:
  """flops.cost's per-frame terms (ViT, connector, projection) at the bucket for ``frames``
  frames, and the decoder over T x slots visual tokens + the step's text (head over the text)."""
  from parcel_jax import flops
  c = flops.cost(config, bucket.num_slots, frames)
  length, dec = config.data.max_text_len, config.model.decoder
  return (c["vit"] + c["connector"] + c["projection"]
          + flops.llm_prefill_flops(frames * bucket.num_slots + length, dec)
          + 2 * length * dec.width * dec.vocab_size)


@needs_libtpu
def test_train_step_takes_frames_and_its_flops_grow_as_the_cost_model(frame_reports):
  from parcel_jax import budgets
  one, many = frame_reports[1], frame_reports[FRAMES]
  config = frame_reports["config"]
  b, size = config.train.batch_size, config.model.vision.image_size
  assert one.input_shapes["image"] == [b, size, size, 3] and "frame_mask" not in one.input_shapes
  assert many.input_shapes["image"] == [b, FRAMES, size, size, 3]
  assert many.input_shapes["frame_mask"] == [b, FRAMES]
  assert (one.settings["frames"], many.settings["frames"]) == (1, FRAMES)
  # The T-frame batch's extra image bytes are arguments of the step (per chip: one chip).
  assert many.argument_bytes - one.argument_bytes >= (FRAMES - 1) * b * size * size * 3 * 4
  bucket = budgets.Bucket(8, 0)   # the single budget 64: 8x8 anchors
  assert one.bucket == many.bucket == str(bucket)
  model_growth = _forward_cost(config, bucket, FRAMES) / _forward_cost(config, bucket, 1)
  xla_growth = many.xla_flops / one.xla_flops
  print(f"{FRAMES} frames / 1: XLA {xla_growth:.3f}x, cost model {model_growth:.3f}x; XLA/model "
        f"{one.xla_flops / one.model_flops_total:.3f} (1 frame), "
        f"{many.xla_flops / many.model_flops_total:.3f} ({FRAMES} frames)")
  assert model_growth > 2.0
  assert 0.95 < xla_growth / model_growth < 1.5        # tests/test_flops.py's tolerance
  for r in (one, many):
    assert 0.95 < r.xla_flops / r.model_flops_total < 1.5
  assert many.model_flops_total == pytest.approx(3 * b * _forward_cost(config, bucket, FRAMES))
  assert many.fits


@needs_libtpu
def test_serving_programs_take_frames(frame_reports):
  from parcel_jax import compile as compile_lib
  from parcel_jax import flops
  prefill, decode = frame_reports["serving"]
  config = frame_reports["config"]
  size, n_t = config.model.vision.image_size, flops.text_tokens(FRAMES)
  assert (prefill.program, decode.program) == ("prefill", "decode")
  assert prefill.input_shapes["image"] == [8, FRAMES, size, size, 3]
  assert prefill.input_shapes["text"] == [8, n_t] and n_t == flops.VIDEO_TEXT_TOKENS
  cache = FRAMES * 64 + n_t + 32     # T x B visual tokens, the video prefix, the answer
  assert decode.input_shapes["cache_size"] == [cache] and decode.bucket == f"B=64 cache={cache}"
  assert prefill.model_flops_total == 8 * flops.cost(config, 64, FRAMES)["total"]
  ratio = prefill.xla_flops / prefill.model_flops_total
  print(f"prefill of {FRAMES} frames at B=64: XLA/model {ratio:.3f}")
  assert 0.95 < ratio < 1.5
  table = compile_lib.format_reports([frame_reports[FRAMES], prefill, decode],
                                     topologies.parse("v5e-1"))
  assert f"frames per example: {FRAMES}" in table


def test_frames_come_from_the_flag_or_the_config():
  from parcel_jax import compile as compile_lib
  config = _tiny(1)
  assert compile_lib.frames_of(config) == 1
  config.data.max_frames = 3
  assert compile_lib.frames_of(config) == 3
  assert compile_lib.frames_of(config, 16) == 16          # --frames overrides the config
  with pytest.raises(ValueError, match="--frames"):
    compile_lib.frames_of(config, -2)
  config.data.max_frames = 0
  with pytest.raises(ValueError, match="data.max_frames"):
    compile_lib.frames_of(config)
