"""Compile-only checks for TPU slices (``parcel_jax.compile``), on this CPU machine.

libtpu compiles for a named topology without TPU hardware. The tiny config's train step is
compiled for 1, 2 and 4 v4 chips under FSDP: memory analysis is present, per-device
argument bytes (parameters + Adam state + the batch) shrink about as 1 / devices, and XLA's
FLOPs agree with the Appendix-C cost model.
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
