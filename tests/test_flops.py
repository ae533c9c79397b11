"""Tests for the Appendix C cost model: hand-computed numbers, variants, monotonicity, CLI."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from parcel_jax import flops

REPO = pathlib.Path(__file__).resolve().parents[1]

# PaliGemma-2 3B at 224 px: SigLIP So400m/14 + Gemma-2 2B (paper, "Backbone").
PALIGEMMA = {
    "vision": dict(image_size=224, patch_size=14, width=1152, depth=27, mlp_dim=4304, num_heads=16),
    "decoder": dict(vocab_size=257152, width=2304, depth=26, mlp_dim=9216, num_heads=8,
                    num_kv_heads=4, head_dim=256),
    "connector": dict(method="parcel", routing="piecewise", conditioning="self_attn",
                      extra_self_attn=False, mlp_dim=4304),
}
# A tiny model with the same 16x16 feature grid, so the paper's routing applies.
TINY = {
    "vision": dict(image_size=32, patch_size=2, width=16, depth=2, mlp_dim=32, num_heads=2),
    "decoder": dict(vocab_size=100, width=24, depth=3, mlp_dim=40, num_heads=4, num_kv_heads=2,
                    head_dim=8),
    "connector": dict(method="parcel", routing="piecewise", conditioning="self_attn",
                      extra_self_attn=False, mlp_dim=20),
}


def make_config(spec, **connector):
  """ConfigDict ``model.{vision,decoder,connector}`` from ``spec``, connector fields overridden."""
  model = {k: dict(v) for k, v in spec.items()}
  model["connector"].update(connector)
  return ml_collections.ConfigDict({"model": model})


def total(d):
  return d["vit"] + d["connector"] + d["projection"] + d["llm"] + d["head"]


# ------------------------------------------------ hand computations (literal numbers)

PG_VIT = 27 * (8 * 256 * 1152**2 + 4 * 256**2 * 1152 + 4 * 256 * 1152 * 4304)


def pg_expected(budget, n_tot, connector, frames=1, n_t=129):
  return {
      "vit": frames * PG_VIT,
      "connector": connector,
      "projection": 2 * frames * budget * 1152 * 2304,
      "llm": 26 * (4 * n_tot * 2304 * 256 * (8 + 4) + 4 * n_tot**2 * 8 * 256
                   + 6 * n_tot * 2304 * 9216),
      "head": 2 * n_t * 2304 * 257152,
      "kv_cache_bytes": 2 * 2 * 26 * 4 * 256 * n_tot,
  }


PG_CASES = {
    # budget: (N_tot, connector FLOPs); B=16 and B=64 are pure pooling in PARCEL.
    16: (16 + 129, 0),
    64: (64 + 129, 0),
    # B=40: 16 anchors + 24 queries.
    40: (40 + 129, 8 * 40 * 1152**2 + 4 * 40**2 * 1152 + 4 * (24 + 256) * 1152**2
         + 4 * 24 * 256 * 1152 + 4 * 24 * 1152 * 4304),
    # B=256: 64 anchors + 192 queries.
    256: (256 + 129, 8 * 256 * 1152**2 + 4 * 256**2 * 1152 + 4 * (192 + 256) * 1152**2
          + 4 * 192 * 256 * 1152 + 4 * 192 * 1152 * 4304),
}


@pytest.mark.parametrize("budget", sorted(PG_CASES))
def test_paligemma_matches_hand_computation(budget):
  n_tot, conn = PG_CASES[budget]
  got = flops.cost(make_config(PALIGEMMA), budget)
  want = pg_expected(budget, n_tot, conn)
  for k, v in want.items():
    assert got[k] == v, k
  assert got["total"] == total(want)


def test_paligemma_video_uses_short_prefix():
  # 16 frames at B=64 (pure pooling): N_t = 65, N_tot = 16 * 64 + 65.
  got = flops.cost(make_config(PALIGEMMA), 64, frames=16)
  want = pg_expected(64, 16 * 64 + 65, 0, frames=16, n_t=65)
  for k, v in want.items():
    assert got[k] == v, k
  # With queries the connector cost scales with T too (B=256: 64 anchors + 192 queries).
  got = flops.cost(make_config(PALIGEMMA), 256, frames=16)
  assert got["connector"] == 16 * PG_CASES[256][1]
  assert got["kv_cache_bytes"] == 2 * 2 * 26 * 4 * 256 * (16 * 256 + 65)


TINY_VIT = 2 * (8 * 256 * 16**2 + 4 * 256**2 * 16 + 4 * 256 * 16 * 32)


@pytest.mark.parametrize("budget, n_q, conn", [
    (16, 0, 0),
    (64, 0, 0),
    (40, 24, 8 * 40 * 16**2 + 4 * 40**2 * 16 + 4 * (24 + 256) * 16**2 + 4 * 24 * 256 * 16
     + 4 * 24 * 16 * 20),
    (100, 36, 8 * 100 * 16**2 + 4 * 100**2 * 16 + 4 * (36 + 256) * 16**2 + 4 * 36 * 256 * 16
     + 4 * 36 * 16 * 20),
])
def test_tiny_matches_hand_computation(budget, n_q, conn):
  n_tot = budget + 129
  want = {
      "vit": TINY_VIT,
      "connector": conn,
      "projection": 2 * budget * 16 * 24,
      "llm": 3 * (4 * n_tot * 24 * 8 * (4 + 2) + 4 * n_tot**2 * 4 * 8 + 6 * n_tot * 24 * 40),
      "head": 2 * 129 * 24 * 100,
      "kv_cache_bytes": 2 * 2 * 3 * 2 * 8 * n_tot,
  }
  got = flops.cost(make_config(TINY), budget)
  for k, v in want.items():
    assert got[k] == v, k
  assert got["total"] == total(want)


# --------------------------------------------------------- variants (our choices)

@pytest.mark.parametrize("overrides, budget, want", [
    # MQT: B queries, cross-attention + MLP only.
    (dict(method="mqt"), 64, 4 * (64 + 256) * 16**2 + 4 * 64 * 256 * 16 + 4 * 64 * 16 * 20),
    # MQT + self-attention over its B queries.
    (dict(method="mqt", extra_self_attn=True), 64,
     8 * 64 * 16**2 + 4 * 64**2 * 16 + 4 * (64 + 256) * 16**2 + 4 * 64 * 256 * 16
     + 4 * 64 * 16 * 20),
    # M3 is parameter-free; with the added block it costs one self-attention over B.
    (dict(method="m3"), 64, 0),
    (dict(method="m3", extra_self_attn=True), 64, 8 * 64 * 16**2 + 4 * 64**2 * 16),
    (dict(method="none"), 256, 0),
    # ViT-only cross-attention: no conditioning term. B=40 -> 16 anchors + 24 queries.
    (dict(conditioning="none"), 40,
     4 * (24 + 256) * 16**2 + 4 * 24 * 256 * 16 + 4 * 24 * 16 * 20),
    # Dual cross-attention: queries -> anchors replaces the self-attention.
    (dict(conditioning="dual_cross"), 40,
     4 * (24 + 16) * 16**2 + 4 * 24 * 16 * 16
     + 4 * (24 + 256) * 16**2 + 4 * 24 * 256 * 16 + 4 * 24 * 16 * 20),
    # Fixed 4x4 routing keeps queries on at B=64 (16 anchors + 48 queries).
    (dict(routing="fixed4x4"), 64,
     8 * 64 * 16**2 + 4 * 64**2 * 16 + 4 * (48 + 256) * 16**2 + 4 * 48 * 256 * 16
     + 4 * 48 * 16 * 20),
    # Fixed 2x2 routing: 64 anchors always, so B=64 is pure pooling.
    (dict(routing="fixed2x2"), 64, 0),
])
def test_connector_variants(overrides, budget, want):
  got = flops.cost(make_config(TINY, **overrides), budget)
  assert got["connector"] == want
  assert got["total"] == total(got)


def test_invalid_inputs_raise():
  with pytest.raises(ValueError, match="budget"):
    flops.cost(make_config(TINY), 17)  # odd
  with pytest.raises(ValueError, match="budget"):
    flops.cost(make_config(TINY, method="m3"), 32)  # not a square
  with pytest.raises(ValueError, match="conditioning"):
    flops.cost(make_config(TINY, conditioning="bogus"), 40)
  with pytest.raises(ValueError, match="frames"):
    flops.cost(make_config(TINY), 64, frames=0)


@pytest.mark.parametrize("method", ["parcel", "mqt", "m3"])
def test_monotone_in_budget(method):
  config = make_config(PALIGEMMA, method=method)
  space = {"parcel": range(16, 257, 2), "mqt": range(2, 257, 2), "m3": [4, 16, 64, 256]}[method]
  costs = [flops.cost(config, b) for b in space]
  # For PARCEL this includes B=62 -> 64, where the query path switches off: two more LLM
  # tokens cost more than the connector saves.
  for key in ("total", "llm", "projection", "kv_cache_bytes"):
    values = [c[key] for c in costs]
    assert all(a < b for a, b in zip(values, values[1:])), key
  assert all(c["vit"] == costs[0]["vit"] for c in costs)


# ------------------------------------------------------------------- XLA cross-check

def test_xla_flops_matmul():
  m, k, n = 32, 48, 24
  got = flops.xla_flops(jnp.matmul, jnp.ones((m, k)), jnp.ones((k, n)))
  assert got == 2 * m * n * k


def test_xla_flops_agrees_with_attention_accounting():
  # One attention block written plainly: XLA's count should match 8 n d^2 + 4 n^2 d up to
  # the softmax, which the paper (and the cost model) omit.
  n, d = 64, 32

  def attention(x, wq, wk, wv, wo):
    q, k, v = x @ wq, x @ wk, x @ wv
    return (jax.nn.softmax(q @ k.T) @ v) @ wo

  args = [jnp.ones((n, d))] + [jnp.ones((d, d))] * 4
  got = flops.xla_flops(attention, *args)
  want = flops.self_attention_flops(n, d)
  assert want <= got <= 1.05 * want


# ---------------------------------------------------------------------------- CLI

def _write_config(tmp_path):
  path = tmp_path / "pg_config.py"
  path.write_text("import ml_collections\n\n"
                  "def get_config():\n"
                  f"  return ml_collections.ConfigDict({{'model': {PALIGEMMA!r}}})\n")
  return path


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "parcel_jax.flops", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=60, check=True).stdout


def test_cli_json_and_override(tmp_path):
  path = _write_config(tmp_path)
  out = json.loads(_cli(f"--config={path}", "--budgets=16,64,256", "--json",
                        "--config.model.connector.method=mqt"))
  config = make_config(PALIGEMMA, method="mqt")
  assert out == {str(b): flops.cost(config, b) for b in (16, 64, 256)}


def test_cli_table(tmp_path):
  path = _write_config(tmp_path)
  out = _cli(f"--config={path}", "--budgets=16,256", "--frames=16")
  lines = out.strip().splitlines()
  assert "frames=16" in lines[0] and "N_t=65" in lines[0]
  assert lines[1].split()[0] == "B" and len(lines) == 4
  row = lines[3].split()
  assert row[:3] == ["256", "64", "192"] and row[-1] == "1.000"


def test_cli_fills_the_size_presets_of_the_embedded_default():
  from configs import base
  from parcel_jax.models import vlm
  out = json.loads(_cli("--config=configs/base.py", "--budgets=16,256", "--json"))
  config = base.get_config()
  vlm.apply_presets(config.model)
  assert out == {str(b): flops.cost(config, b) for b in (16, 256)}
  assert out["256"]["total"] > out["16"]["total"] > 0


def test_cli_rejects_invalid_budget(tmp_path):
  path = _write_config(tmp_path)
  proc = subprocess.run([sys.executable, "-m", "parcel_jax.flops", f"--config={path}", "--budgets=15"],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode != 0 and "allowed budgets" in proc.stderr


def test_xla_forward_flops_ratio_for_the_tiny_default():
  """XLA's count of the compiled forward vs the Appendix C model, for the embedded default.

  XLA also counts norms, softmax, biases, pooling and the decoder's soft-caps (which the
  paper omits), so the ratio sits a little above 1; a gross mismatch means a wrong formula."""
  from configs import base
  config = base.get_config()
  for budget in (16, 100, 256):
    xla = flops.xla_forward_flops(config, budget)   # fills vocab_size from the tokenizer
    model = flops.cost(config, budget)
    ratio = xla / model["total"]
    print(f"\nB={budget}: XLA {xla / 1e9:.4f} GFLOPs, model {model['total'] / 1e9:.4f} GFLOPs, ratio {ratio:.3f}")
    assert 0.95 < ratio < 1.5


def test_cli_names_a_field_of_another_method(tmp_path):
  """PARCEL's routing off its default with method=mqt is refused, naming both (the config's
  routing='piecewise' and conditioning='self_attn' are defaults, so mqt alone runs: above)."""
  path = _write_config(tmp_path)
  bad = subprocess.run([sys.executable, "-m", "parcel_jax.flops", f"--config={path}", "--budgets=64",
                        "--config.model.connector.method=mqt",
                        "--config.model.connector.routing=fixed4x4"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
  assert bad.returncode != 0 and ("model.connector.routing='fixed4x4' is a field of method 'parcel', "
                                  "not of method 'mqt'") in bad.stderr


def test_xla_forward_flops_ratio_for_16_frames():
  """16 frames (each through the ViT and connector at B; T*B + 65 tokens prefilled): XLA's
  count of the compiled forward vs ``cost(frames=16)``, within the single-image tolerance."""
  from configs import base
  config = base.get_config()
  for budget in (16, 100):
    xla = flops.xla_forward_flops(config, budget, frames=16)
    model = flops.cost(config, budget, frames=16)
    ratio = xla / model["total"]
    print(f"\n16 frames, B={budget}: XLA {xla / 1e9:.4f} GFLOPs, model {model['total'] / 1e9:.4f} "
          f"GFLOPs, ratio {ratio:.3f}")
    assert 0.95 < ratio < 1.5
    assert model["llm"] == flops.llm_prefill_flops(16 * budget + 65, config.model.decoder)
