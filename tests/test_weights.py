"""Real weights: HF PaliGemma parity (float32, rel. error <= 1e-4), big_vision npz round trip,
sharded loading, and the errors a mismatched checkpoint gives."""

import dataclasses
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import paligemma_fixtures as fx  # sets HF_HUB_OFFLINE before transformers loads
from tests.util import assert_rel_close

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from configs import base  # noqa: E402
from parcel_jax import config as config_lib  # noqa
from parcel_jax import sharding  # noqa: E402
from parcel_jax.models import vlm  # noqa: E402
from parcel_jax.weights import big_vision, common, hf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_TOL = 1e-4


def _config(ckpt_dir, method="none", *, scan=False):
  c = base.get_config(method)
  hf.apply_overrides(c.model, hf.config_from_hf(ckpt_dir))
  c.model.vision.scan = c.model.decoder.scan = scan
  c.model.connector.num_heads = 4
  c.model.connector.mlp_dim = 64
  grid = c.model.vision.image_size // c.model.vision.patch_size
  c.eval.budgets = (grid * grid,) if method == "none" else (16,)
  return c


def _mesh():
  return sharding.make_mesh((-1, 1, 1))


def _abstract(model_cfg):
  """graphdef and a template of ShapeDtypeStructs carrying the mesh shardings (no compile):
  enough for a checkpoint that holds every parameter."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: vlm.VLM(model_cfg, rngs=nnx.Rngs(0))))
  shardings = sharding.param_shardings(abstract, _mesh())
  template = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(abstract), shardings)
  return graphdef, template


def _random(model_cfg, seed=0):
  """graphdef and random params placed on their shardings (values need not be an init's;
  no compile)."""
  graphdef, template = _abstract(model_cfg)
  rng = np.random.RandomState(seed)
  return graphdef, jax.tree.map(
      lambda x: jax.device_put(rng.normal(size=x.shape).astype(x.dtype), x.sharding), template)


def _load(ckpt_dir, **kw):
  c = _config(ckpt_dir, **kw)
  model_cfg, spec = config_lib.validate_config(c)
  graphdef, template = _abstract(model_cfg)
  return model_cfg, spec, graphdef, hf.load_hf_checkpoint(ckpt_dir, template, model_cfg)


def _inputs(b, image_size, length, prefix, vocab, seed):
  rng = np.random.RandomState(seed)
  images = rng.uniform(-1, 1, (b, image_size, image_size, 3)).astype(np.float32)
  text = rng.randint(0, vocab - 1, (b, length))
  ar = np.arange(length)[None].repeat(b, 0) >= prefix
  return images, text, ar


def _hf_outputs(model, images, text, prefix, num_image_tokens, image_token):
  """HF vision features (b, N, D) and logits at the text positions (b, L, V), prefix-LM masking."""
  b, length = text.shape
  ids = np.concatenate([np.full((b, num_image_tokens), image_token), text], 1)
  token_type = np.concatenate([np.zeros((b, num_image_tokens + prefix), int),
                               np.ones((b, length - prefix), int)], 1)
  pixels = torch.tensor(images).permute(0, 3, 1, 2)
  with torch.no_grad():
    feats = model.model.vision_tower(pixels).last_hidden_state.numpy()
    out = model(input_ids=torch.tensor(ids), pixel_values=pixels,
                token_type_ids=torch.tensor(token_type), attention_mask=torch.ones(ids.shape, dtype=torch.long))
  return feats, out.logits.numpy()[:, num_image_tokens:]


@functools.partial(jax.jit, static_argnames=("graphdef", "bucket"))
def _forward(graphdef, params, images, text, ar, bucket):
  model = nnx.merge(graphdef, params)
  feats = model.encode_images(images)
  budgets = jnp.full((images.shape[0],), bucket.num_slots)
  logits = model.text_logits(feats, text, jnp.ones(text.shape, bool), ar, bucket=bucket, budgets=budgets)
  return feats.reshape(images.shape[0], -1, feats.shape[-1]), logits


def _ours(model_cfg, graphdef, params, spec, images, text, ar):
  n = model_cfg.vision.grid_size ** 2
  feats, logits = _forward(graphdef, params, jnp.asarray(images), jnp.asarray(text), jnp.asarray(ar),
                           spec.compact_bucket(n))
  return np.asarray(feats), np.asarray(logits)


@pytest.fixture(scope="module")
def gemma2_ckpt(tmp_path_factory):
  """PaliGemma-2 style: 28 px / patch 7 (4 x 4 grid), sliding window 5 (binds), sharded files."""
  model = fx.hf_paligemma("gemma2", image_size=28, patch_size=7)
  path = fx.save_hf(model, str(tmp_path_factory.mktemp("pg2")), max_shard_size="60KB")
  return model, path


@pytest.fixture(scope="module")
def gemma1_ckpt(tmp_path_factory):
  """PaliGemma-1 style: 42 px / patch 7 (6 x 6 grid), Gemma-1 with multi-query attention."""
  model = fx.hf_paligemma("gemma", image_size=42, patch_size=7, seed=1)
  return model, fx.save_hf(model, str(tmp_path_factory.mktemp("pg1")))


def test_config_from_hf_gemma2(gemma2_ckpt):
  _, path = gemma2_ckpt
  assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))  # sharded
  o = hf.config_from_hf(path)
  assert o["vision"] == dict(image_size=28, patch_size=7, width=32, depth=2, mlp_dim=64,
                             num_heads=4, posemb="learn", center_input=False)
  d = o["decoder"]
  assert (d["vocab_size"], d["width"], d["depth"], d["num_heads"], d["num_kv_heads"], d["head_dim"]) == \
      (300, 48, 2, 4, 2, 16)
  assert d["post_norms"] and d["local_global"] and d["sliding_window"] == 5
  assert (d["attn_softcap"], d["final_softcap"]) == (5.0, 3.0)
  assert d["query_scale"] == pytest.approx(24 ** -0.5)
  assert d["window_prefix"] == "full"


def test_config_from_hf_rejects_unsupported(gemma2_ckpt):
  cfg = hf.read_config(gemma2_ckpt[1])
  bad = {**cfg, "text_config": {**cfg["text_config"], "hidden_activation": "relu"}}
  with pytest.raises(common.WeightsError, match="activation 'relu'"):
    hf.config_from_hf(bad)
  bad = {**cfg, "vision_config": {**cfg["vision_config"], "layer_norm_eps": 1e-5}}
  with pytest.raises(common.WeightsError, match="layer_norm_eps"):
    hf.config_from_hf(bad)


@pytest.mark.parametrize("scan", [False, True])
def test_parity_gemma2(gemma2_ckpt, scan):
  """Vision features and prefix-LM logits equal HF's; scanned (local, global) pairs too."""
  model, path = gemma2_ckpt
  model_cfg, spec, graphdef, params = _load(path, scan=scan)
  images, text, ar = _inputs(2, 28, length=12, prefix=5, vocab=300, seed=0)
  hf_feats, hf_logits = _hf_outputs(model, images, text, 5, 16, 299)
  feats, logits = _ours(model_cfg, graphdef, params, spec, images, text, ar)
  assert_rel_close(feats, hf_feats, PARITY_TOL)
  assert_rel_close(logits, hf_logits, PARITY_TOL)
  assert np.abs(hf_logits).max() > 1.0  # the soft-cap (3.0) is exercised, not a near-zero output
  err = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  print(f"gemma2 scan={scan}: vision rel err {err(feats, hf_feats):.2e}, logits {err(logits, hf_logits):.2e}")
  if not scan:
    # The window binds (prefix of 21 tokens > window 5): big_vision's windowed prefix differs.
    windowed = dataclasses.replace(model_cfg, decoder=dataclasses.replace(model_cfg.decoder,
                                                                          window_prefix="window"))
    _, logits_w = _ours(windowed, _abstract(windowed)[0], params, spec, images, text, ar)
    assert err(logits_w, hf_logits) > 1e-3


def test_parity_gemma1_scanned(gemma1_ckpt):
  """Gemma-1 (MQA, no soft-caps), a 6 x 6 grid, both towers scanned."""
  model, path = gemma1_ckpt
  model_cfg, spec, graphdef, params = _load(path, scan=True)
  assert model_cfg.decoder.num_kv_heads == 1 and not model_cfg.decoder.post_norms
  images, text, ar = _inputs(3, 42, length=10, prefix=4, vocab=300, seed=1)
  hf_feats, hf_logits = _hf_outputs(model, images, text, 4, 36, 299)
  feats, logits = _ours(model_cfg, graphdef, params, spec, images, text, ar)
  assert_rel_close(feats, hf_feats, PARITY_TOL)
  assert_rel_close(logits, hf_logits, PARITY_TOL)
  err = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  print(f"gemma1: vision rel err {err(feats, hf_feats):.2e}, logits {err(logits, hf_logits):.2e}")


def test_connector_keeps_initialisation(gemma2_ckpt):
  model, path = gemma2_ckpt
  c = _config(path, "mqt")
  model_cfg, _ = config_lib.validate_config(c)
  _, init = _random(model_cfg, seed=3)
  loaded = hf.load_hf_checkpoint(path, init, model_cfg)
  flat_init, flat = common.flatten(init), common.flatten(loaded)
  connector = [p for p in flat if p.startswith("connector/")]
  assert connector
  for p in connector:
    np.testing.assert_array_equal(np.asarray(flat[p]), np.asarray(flat_init[p]), err_msg=p)
  torch_emb = model.state_dict()["model.language_model.embed_tokens.weight"].numpy()
  np.testing.assert_array_equal(np.asarray(flat["decoder/embedding"]), torch_emb)
  # Vision-only loading (e.g. a SigLIP checkpoint) needs the rest allowed to stay initialised.
  assert flat["vision/patch_kernel"].sharding == flat_init["vision/patch_kernel"].sharding


def _rewrite(src_dir, dst_dir, edit):
  """Copies an HF checkpoint as one safetensors file after ``edit(tensors)``."""
  store = common.SafetensorsStore(common.checkpoint_files(src_dir, "model.safetensors.index.json",
                                                          "model.safetensors"))
  tensors = {k: np.array(store[k]) for k in store.keys()}
  edit(tensors)
  os.makedirs(dst_dir, exist_ok=True)
  common.write_safetensors(os.path.join(dst_dir, "model.safetensors"), tensors)
  with open(os.path.join(dst_dir, "config.json"), "w") as f:
    f.write(open(os.path.join(src_dir, "config.json")).read())
  return dst_dir


def test_errors_name_parameter_and_shapes(gemma2_ckpt, tmp_path):
  _, path = gemma2_ckpt
  c = _config(path)
  c.model.decoder.mlp_dim = 80  # the checkpoint has 96
  model_cfg, _ = config_lib.validate_config(c)
  _, params = _abstract(model_cfg)
  with pytest.raises(common.WeightsError) as e:
    hf.load_hf_checkpoint(path, params, model_cfg)
  msg = str(e.value)
  assert "decoder/layers/0/mlp/wi" in msg and "(2, 48, 96)" in msg and "(2, 48, 80)" in msg
  assert "language_model.layers.0.mlp.gate_proj.weight" in msg

  model_cfg, _ = config_lib.validate_config(_config(path))
  _, params = _abstract(model_cfg)
  drop = lambda t: t.pop(next(k for k in t if hf.canonical_name(k) == "language_model.norm.weight"))
  missing = _rewrite(path, str(tmp_path / "missing"), drop)
  with pytest.raises(common.WeightsError, match=r"missing parameter decoder/final_norm/scale "
                     r"\(checkpoint name language_model.norm.weight\)"):
    hf.load_hf_checkpoint(missing, params, model_cfg)
  extra = _rewrite(path, str(tmp_path / "extra"),
                   lambda t: t.update({"model.language_model.layers.0.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(common.WeightsError, match="no place in the model: language_model.layers.0.extra.weight"):
    hf.load_hf_checkpoint(extra, params, model_cfg)
  # bfloat16 tensors (as released checkpoints) load into float32 parameters.
  bf16 = _rewrite(path, str(tmp_path / "bf16"), lambda t: t.update(
      {k: v.astype(jnp.bfloat16) for k, v in t.items()}))
  loaded = common.flatten(hf.load_hf_checkpoint(bf16, params, model_cfg))
  assert loaded["decoder/embedding"].dtype == jnp.float32


def test_big_vision_npz_round_trip(gemma2_ckpt, tmp_path):
  """HF-loaded weights -> big_vision npz -> our params is exact and gives HF's logits; a
  per-layer multi-head model round-trips too (the scanned FSDP case: test_loads_onto_fsdp_mesh)."""
  model, path = gemma2_ckpt
  model_cfg, spec, graphdef, params = _load(path)
  shapes = big_vision.export_npz(params, model_cfg, str(tmp_path / "pg.npz"))
  assert shapes["llm/layers/attn/q_einsum/w"] == (2, 4, 48, 16)
  assert shapes["llm/layers/attn/kv_einsum/w"] == (2, 2, 2, 48, 16)
  assert shapes["llm/layers/mlp/gating_einsum"] == (2, 2, 48, 96)
  assert shapes["img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"] == (2, 32, 4, 8)
  assert shapes["img/pos_embedding"] == (1, 16, 32) and shapes["img/head/kernel"] == (32, 48)
  back = big_vision.load_npz(str(tmp_path / "pg.npz"), _abstract(model_cfg)[1], model_cfg)
  for (p, a), b in zip(common.flatten(params).items(), common.flatten(back).values()):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
  images, text, ar = _inputs(2, 28, length=8, prefix=3, vocab=300, seed=4)
  _, hf_logits = _hf_outputs(model, images, text, 3, 16, 299)
  _, logits = _ours(model_cfg, graphdef, back, spec, images, text, ar)
  assert_rel_close(logits, hf_logits, PARITY_TOL)

  # Per-layer model with multi-head attention (qkv_einsum); the connector not in the file.
  c = base.get_config("mqt")
  c.model.decoder.num_heads = c.model.decoder.num_kv_heads = 2
  c.model.vision.depth = c.model.decoder.depth = 1
  c.eval.budgets = (16,)
  mha_cfg, _ = config_lib.validate_config(c)
  _, mha = _random(mha_cfg, seed=1)
  shapes = big_vision.export_npz(mha, mha_cfg, str(tmp_path / "mha.npz"), include_connector=False)
  assert "llm/layers/attn/qkv_einsum/w" in shapes and not any(k.startswith("connector") for k in shapes)
  _, fresh = _random(mha_cfg, seed=2)
  back = common.flatten(big_vision.load_npz(str(tmp_path / "mha.npz"), fresh, mha_cfg))
  for p, a in common.flatten(mha).items():
    expected = common.flatten(fresh)[p] if p.startswith("connector/") else a
    np.testing.assert_array_equal(np.asarray(back[p]), np.asarray(expected), err_msg=p)


_SHARDED = textwrap.dedent("""
    import os, sys
    import jax, numpy as np
    from flax import nnx
    from configs import base
    from parcel_jax import config as config_lib
    from parcel_jax import sharding
    from parcel_jax.models import vlm
    from parcel_jax.weights import big_vision, common
    assert jax.device_count() == 8
    c = base.get_config("parcel"); c.model.connector.budgets = (16, 24)
    c.model.vision.scan = c.model.decoder.scan = True  # stacked layers, Gemma-2 (local, global) pairs
    c.model.decoder.depth = 2; c.model.decoder.local_global = True; c.model.decoder.sliding_window = 8
    model_cfg, _ = config_lib.validate_config(c)
    mesh = sharding.make_mesh((1, 8, 1))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: vlm.VLM(model_cfg, rngs=nnx.Rngs(0))))
    shardings = sharding.param_shardings(abstract, mesh)
    rng = np.random.RandomState(0)  # random values on the shardings (no init compile)
    init = lambda: jax.tree.map(lambda x, s: jax.device_put(rng.normal(size=x.shape).astype(x.dtype), s),
                                nnx.to_pure_dict(abstract), shardings)
    src = init()
    big_vision.export_npz(src, model_cfg, sys.argv[1])
    fresh = init()
    loaded = big_vision.load_npz(sys.argv[1], fresh, model_cfg)
    n_sharded = 0
    for (p, a), b, s in zip(common.flatten(src).items(), common.flatten(loaded).values(),
                            common.flatten(shardings).values()):
      assert b.sharding == s, (p, b.sharding, s)
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
      if s.shard_shape(b.shape) != b.shape:  # split over the 8-way fsdp axis
        n_sharded += 1
        assert all(sh.data.shape == s.shard_shape(b.shape) for sh in b.addressable_shards), p
    assert n_sharded > 10, n_sharded
    print("OK", n_sharded)
""")


def test_loads_onto_fsdp_mesh(tmp_path):
  """On 8 CPU devices with an FSDP mesh every loaded parameter has its param_shardings
  sharding and each device holds only its slice."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "m.npz")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "OK" in out.stdout


def test_safetensors_store_bf16_and_bad_files(tmp_path):
  """The safetensors package reads (memory-mapped) and writes: bfloat16 both ways, every
  dtype bit for bit, and unreadable files give errors naming the file."""
  rng = np.random.RandomState(0)
  tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32),
             "b": rng.normal(size=(4,)).astype(jnp.bfloat16),
             "c": rng.randint(-9, 9, (2, 2, 2)).astype(np.int32),
             "d": rng.normal(size=(2, 3)).astype(np.float16).T}  # not contiguous
  path = str(tmp_path / "t.safetensors")
  size = common.write_safetensors(path, tensors, metadata={"format": "pt"})
  assert size == os.path.getsize(path)
  store = common.SafetensorsStore([path])
  assert sorted(store.keys()) == ["a", "b", "c", "d"] and store.shape("d") == (3, 2)
  for k, x in tensors.items():
    assert store[k].dtype == x.dtype, k
    assert np.array_equal(store[k].view(np.uint8), np.ascontiguousarray(x).view(np.uint8)), k
  from safetensors.torch import load_file  # what transformers reads: the same bf16 values
  assert torch.equal(load_file(path)["b"], torch.tensor(tensors["b"].astype(np.float32)).bfloat16())
  with pytest.raises(common.WeightsError, match="tensor x: dtype complex128 cannot be written"):
    common.write_safetensors(str(tmp_path / "x.safetensors"), {"x": np.zeros(2, np.complex128)})
  short = tmp_path / "short.safetensors"
  short.write_bytes(b"abc")
  with pytest.raises(common.WeightsError, match=f"{short}: not a safetensors file"):
    common.SafetensorsStore([str(short)])
  garbage = tmp_path / "garbage.safetensors"
  garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json......")
  with pytest.raises(common.WeightsError, match=f"{garbage}: unreadable safetensors header"):
    common.SafetensorsStore([str(garbage)])
  with pytest.raises(common.WeightsError, match=r"tensor a appears in both .*t.safetensors and .*t2"):
    common.write_safetensors(str(tmp_path / "t2.safetensors"), {"a": tensors["a"]})
    common.SafetensorsStore([path, str(tmp_path / "t2.safetensors")])
