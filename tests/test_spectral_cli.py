"""The spectral CLI end to end, and the query cross-attention weights it analyses."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from parcel_jax import runs, spectral
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def tiny_run(tiny_workdir):
  return runs.load_run(tiny_workdir)


def test_cross_attention_weights_reproduce_the_block(tiny_run):
  """Per-head weights x values through the output projection == the block's attention."""
  rng = np.random.default_rng()
  width = tiny_run.model_cfg.vision.width
  x, context, key_pos = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
                         ((2, 3, width), (2, 256, width), (256, width)))
  mask = jnp.asarray([[True, True, False], [True, False, False]])[:, :, None] & jnp.ones((1, 1, 256), bool)

  @jax.jit
  def run(params, x, context, mask, key_pos):
    block = nnx.merge(tiny_run.graphdef, params).connector.resampler.cross
    probs = block.attention_weights(x, context, mask, key_pos=key_pos)       # (b, heads, t, s)
    _, v = block.attn.project_kv(block.norm_kv(context))
    rebuilt = x + block.attn.project_out(jnp.einsum("bhts,bshd->bthd", probs, v))
    return probs, rebuilt, block(x, context, mask, key_pos=key_pos)

  probs, rebuilt, out = run(tiny_run.params, x, context, mask, key_pos)
  assert probs.shape == (2, tiny_run.config.model.connector.num_heads, 3, 256)
  np.testing.assert_allclose(np.asarray(probs.sum(-1))[:, 0], np.asarray(mask[:, :, 0], float), atol=1e-6)
  np.testing.assert_allclose(out, rebuilt, atol=1e-5)


def test_query_attention_rows(tiny_run):
  """Parcel.query_attention: one row per query slot; active rows sum to 1, inactive are zero."""
  bucket = tiny_run.spec.bucket(100)                                          # 8x8 anchors, 36 slots
  features = jnp.asarray(np.random.default_rng().standard_normal((2, 16, 16, 32)), jnp.float32)
  attend = jax.jit(lambda p, f, b: nnx.merge(tiny_run.graphdef, p).connector.query_attention(f, bucket, b))
  attn = np.asarray(attend(tiny_run.params, features, jnp.asarray([70, 100])))
  assert attn.shape == (2, bucket.query_slots, 256)
  slots = np.arange(bucket.query_slots)
  np.testing.assert_allclose(attn.sum(-1), np.stack([slots < 6, slots < 36]).astype(float), atol=1e-5)


def test_cli(tiny_workdir, tmp_path):
  proc = run_cli("parcel_jax.spectral", f"--workdir={tiny_workdir}", "--budget=24", f"--out={tmp_path}",
                 "--num_images=6", "--batch_size=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "spectral_24.json") as f:
    report = json.load(f)
  curves = report["curves"]
  assert report["budget"] == 24 and report["num_images"] == 6
  # ViT 16x16 (r_max 8), the 4x4 anchors (r_max 2), M3 grids 2, 4, 8, the 8 queries (over 16x16).
  r_max = {label: len(c["curve"]) for label, c in curves.items()}
  assert r_max == {"ViT grid 16x16": 8, "parcel anchors 4x4 (B=24)": 2, "M3 pooled 2x2": 1,
                   "M3 pooled 4x4": 2, "M3 pooled 8x8": 4, "parcel queries x8 (B=24)": 8}
  for c in curves.values():
    assert np.all(np.diff(c["curve"]) >= -1e-12) and np.isclose(c["curve"][-1], 1.0)
  # The anchors are the 4x4 pooled grid: the same spectrum as M3's 4x4.
  np.testing.assert_allclose(curves["parcel anchors 4x4 (B=24)"]["mean_profile"],
                             curves["M3 pooled 4x4"]["mean_profile"])
  for name in ("concentration_24.png", "profiles_24.png"):
    with Image.open(tmp_path / name) as im:
      assert im.format == "PNG"
      im.verify()
  assert "ViT grid 16x16" in proc.stdout
  focus = curves["parcel queries x8 (B=24)"]["focus"]
  assert 1 / 256 < focus["peak"] <= 1 and 1 <= focus["sources"] <= 256 and 1 <= focus["distinct"] <= 8
  assert "query focus: peak weight" in proc.stdout


def test_rejects_a_budget_outside_the_method(tiny_run):
  with pytest.raises(ValueError, match="allowed: even integers 16..256"):
    spectral.analyse_run(tiny_run, 17)
