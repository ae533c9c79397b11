"""Export: our params -> a Hugging Face PaliGemma directory that transformers loads and that
gives our logits (float32, rel. error <= 1e-4); -> HF + connector file -> our params bit for
bit; big_vision npz through the command line; refusals that name the config field."""

import json
import os

import jax
import numpy as np
import pytest
from absl import flags
from safetensors import safe_open

from tests import paligemma_fixtures as fx  # sets HF_HUB_OFFLINE before transformers loads
from tests.test_evaluate import write_checkpoint
from tests.test_weights import PARITY_TOL, _abstract, _hf_outputs, _inputs, _ours
from tests.util import assert_rel_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs import base  # noqa: E402
from parcel_jax import config as config_lib  # noqa: E402
from parcel_jax import export  # noqa: E402
from parcel_jax import weights  # noqa: E402
from parcel_jax.weights import big_vision, common, connector, hf  # noqa: E402


def _config(text="gemma2", method="none", *, scan=False, posemb="learn", image_size=28):
  """A tiny PaliGemma-shaped model (28 px / patch 7: a 4 x 4 grid) that HF can express."""
  c = base.get_config(method)
  c.model.vision.update(dict(image_size=image_size, patch_size=7, width=32, depth=2, mlp_dim=64,
                             num_heads=4, posemb=posemb, center_input=False, scan=scan))
  c.model.decoder.update(dict(vocab_size=300, width=48, depth=2, mlp_dim=96, num_heads=4,
                              head_dim=16, prefix_token_shift=0, scan=scan))
  if text == "gemma2":  # the window (5) binds: image + prompt are longer
    c.model.decoder.update(dict(num_kv_heads=2, post_norms=True, attn_softcap=5.0, final_softcap=3.0,
                                sliding_window=5, local_global=True, query_scale=24 ** -0.5,
                                window_prefix="full"))
  else:  # Gemma-1 as in PaliGemma-1: multi-query attention, no soft-caps, post-norms or window
    c.model.decoder.update(dict(num_kv_heads=1, post_norms=False, attn_softcap=0.0, final_softcap=0.0,
                                sliding_window=0, local_global=False, query_scale=0.0))
  c.model.connector.num_heads = 4
  c.model.connector.mlp_dim = 64
  c.model.connector.budgets = ()  # the method's whole space at this grid
  c.eval.budgets = (16,)
  return c


def _std(path: str, shape) -> float:
  """Scales that keep every layer's output O(1) (matrices N(0, 1/fan_in), norms and biases
  N(0, 0.2^2)), so the logits depend on every parameter."""
  name = path.rsplit("/", 1)[-1]
  if len(shape) <= 1 or name.endswith("_bias") or name == "posemb":
    return 0.2 if name != "posemb" else 0.5
  if name == "o_kernel":
    return (shape[0] * shape[1]) ** -0.5
  if name == "patch_kernel":
    return float(np.prod(shape[:3])) ** -0.5
  if name == "wi" and len(shape) == 3:
    return shape[1] ** -0.5
  if name == "embedding":
    return shape[1] ** -0.5
  return shape[0] ** -0.5


def _params(model_cfg, seed=0, scaled=True):
  """Random params on their shardings (no compile); ``scaled``: per-layer ``_std``."""
  graphdef, template = _abstract(model_cfg)
  rng = np.random.RandomState(seed)
  flat = {p: jax.device_put((rng.normal(size=x.shape) * (_std(p, x.shape) if scaled else 1.0))
                            .astype(x.dtype), x.sharding)
          for p, x in common.flatten(template).items()}
  return graphdef, common.unflatten_like(template, flat)


def _checkpointed_run(c, tmp_path, seed, scaled=True):
  """``c``'s model with ``_params(seed, scaled)`` written as a trained run in ``tmp_path/run``:
  (model_cfg, spec, graphdef, params, workdir)."""
  model_cfg, spec = config_lib.validate_config(c)
  graphdef, params = _params(model_cfg, seed=seed, scaled=scaled)
  workdir = str(tmp_path / "run")
  write_checkpoint(c, params, workdir)
  return model_cfg, spec, graphdef, params, workdir


def _err(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _from_pretrained(path):
  model, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
      path, attn_implementation="eager", output_loading_info=True)
  assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return model.eval()


@pytest.mark.parametrize("text,scan,posemb", [("gemma2", False, "sincos2d"), ("gemma", True, "learn")])
def test_hf_export_parity(tmp_path, text, scan, posemb):
  """transformers loads the export (nothing missing or unexpected) and gives our vision
  features and prefix-LM logits; config_from_hf(export) gives back our dimensions. Gemma-2:
  a fixed sincos table written as HF's learned one; Gemma-1 from a scanned model."""
  model_cfg, spec = config_lib.validate_config(_config(text, scan=scan, posemb=posemb))
  graphdef, params = _params(model_cfg, seed=1)
  written = weights.export(params, model_cfg, "hf", str(tmp_path))
  assert [os.path.basename(w.path) for w in written] == ["config.json", "model.safetensors"]
  assert written[1].tensors == (63 if text == "gemma2" else 59)  # as save_pretrained writes them
  model = _from_pretrained(str(tmp_path))
  assert model.config.text_config.model_type == text

  images, text_ids, ar = _inputs(2, 28, length=12, prefix=5, vocab=300, seed=2)
  assert model.config.image_token_id == 300  # no text token's id (HF maps it to padding)
  hf_feats, hf_logits = _hf_outputs(model, images, text_ids, 5, 16, 300)
  feats, logits = _ours(model_cfg, graphdef, params, spec, images, text_ids, ar)
  assert_rel_close(feats, hf_feats, PARITY_TOL)
  assert_rel_close(logits, hf_logits, PARITY_TOL)
  assert np.abs(hf_logits).max() > 1.0 and np.std(hf_logits) > 0.1  # not a near-constant output
  print(f"export {text} scan={scan} posemb={posemb}: vision rel err {_err(feats, hf_feats):.2e}, "
        f"logits {_err(logits, hf_logits):.2e}")

  back = hf.config_from_hf(str(tmp_path))
  for section, values in back.items():
    ours = getattr(model_cfg, section)
    for k, v in values.items():
      want = getattr(ours, k)
      if k == "posemb":
        want = "learn"  # converted
      elif k == "window_prefix" and not ours.local_global:
        continue  # no local layers: the mode means nothing
      elif isinstance(v, float) or k in ("attn_softcap", "final_softcap", "sliding_window", "query_scale"):
        v, want = v or None, want or None  # 0 = off, as our configs write it
      assert v == (pytest.approx(want) if isinstance(want, float) else want), (section, k, v, want)


def test_hf_import_export_reproduces_checkpoint(tmp_path):
  """An HF checkpoint -> our params -> export (sharded) holds the same tensors, same names, bit
  for bit (the tied lm_head aside), and loads back into the same params."""
  src = fx.save_hf(fx.hf_paligemma("gemma2", image_size=28, patch_size=7, seed=3), str(tmp_path / "src"))
  c = _config()
  hf.apply_overrides(c.model, hf.config_from_hf(src))
  model_cfg, _ = config_lib.validate_config(c)
  _, template = _abstract(model_cfg)
  params = hf.load_hf_checkpoint(src, template, model_cfg)
  written = hf.export_hf(params, model_cfg, str(tmp_path / "out"), max_shard_bytes=100_000)
  names = [os.path.basename(w.path) for w in written]
  shards = [w for w in written if w.path.endswith(".safetensors")]
  assert "model.safetensors.index.json" in names and len(shards) >= 4
  assert names[1] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert all(w.bytes < 100_000 + 10_000 for w in shards)  # at most the limit, plus the header
  out = common.SafetensorsStore(common.checkpoint_files(str(tmp_path / "out"), "model.safetensors.index.json",
                                                        "model.safetensors"))
  with safe_open(os.path.join(src, "model.safetensors"), framework="numpy") as f:
    orig = {k: f.get_tensor(k) for k in f.keys()}
  assert sorted(out.keys()) == sorted(orig)
  for k, x in orig.items():
    np.testing.assert_array_equal(out[k], x, err_msg=k)
    assert out[k].dtype == x.dtype
  back = hf.load_hf_checkpoint(str(tmp_path / "out"), template, model_cfg)
  for (p, a), b in zip(common.flatten(params).items(), common.flatten(back).values()):
    assert np.array_equal(np.asarray(a), np.asarray(b)), p


@pytest.mark.parametrize("method,scan", [("parcel", False), ("parcel", True), ("mqt", False), ("m3", False)])
def test_round_trip_with_connector(tmp_path, method, scan):
  """export hf -> init.hf_checkpoint (dims from its config.json) + init.connector_safetensors
  -> every leaf equal to the exported params (np.array_equal), scanned layouts included."""
  c = _config(method=method, scan=scan, image_size=56)  # an 8 x 8 grid: pooled anchors and queries
  model_cfg, _ = config_lib.validate_config(c)
  _, params = _params(model_cfg, seed=4, scaled=False)
  written = weights.export(params, model_cfg, "hf", str(tmp_path),
                           run_connector_config=c.model.connector.to_dict())
  assert [os.path.basename(w.path) for w in written][-2:] == [connector.FILE, connector.CONFIG_FILE]
  flat = common.flatten(params)
  assert written[-2].tensors == sum(p.startswith("connector/") for p in flat)
  assert (written[-2].tensors > 0) == (method != "m3")  # M3 only pools
  with safe_open(os.path.join(tmp_path, connector.FILE), framework="numpy") as f:
    assert f.metadata() == {"format": "parcel_jax.connector", "method": method}
    assert set(f.keys()) == {p for p in flat if p.startswith("connector/")}  # our paths as names
  saved = json.load(open(tmp_path / connector.CONFIG_FILE))
  assert saved["connector"]["method"] == method and saved["connector"]["grid_size"] == 8
  assert tuple(saved["config"]["budgets"]) == tuple(c.model.connector.budgets)

  c2 = _config(method=method, scan=scan, image_size=56)
  c2.model.vision.posemb, c2.model.decoder.window_prefix = "sincos2d", "window"  # from the checkpoint
  with c2.unlocked():
    c2.init = dict(hf_checkpoint=str(tmp_path), connector_safetensors=str(tmp_path / connector.FILE))
  model_cfg2, _ = config_lib.validate_config(c2)
  assert model_cfg2 == model_cfg
  _, fresh = _params(model_cfg2, seed=5, scaled=False)
  back = common.flatten(weights.load_init_params(c2, fresh, model_cfg2))
  assert list(back) == list(flat)
  for p, a in flat.items():
    assert np.array_equal(np.asarray(back[p]), np.asarray(a)), p
    assert back[p].dtype == a.dtype and back[p].sharding == a.sharding, p


def test_connector_file_checks_config(tmp_path):
  c = _config(method="parcel")
  model_cfg, _ = config_lib.validate_config(c)
  _, params = _params(model_cfg, seed=6, scaled=False)
  connector.export_connector(params, model_cfg, str(tmp_path))
  other = _config(method="parcel")
  other.model.connector.query_init_std = 0.5  # same shapes, another connector
  other_cfg, _ = config_lib.validate_config(other)
  with pytest.raises(common.WeightsError, match=r"model.connector.query_init_std=0.02; this model has 0.5"):
    connector.load_connector(str(tmp_path / connector.FILE), params, other_cfg)
  os.remove(tmp_path / connector.CONFIG_FILE)  # without the JSON the shapes are still checked
  mqt = _config(method="mqt")
  mqt_cfg, _ = config_lib.validate_config(mqt)
  _, mqt_params = _params(mqt_cfg, seed=7, scaled=False)
  with pytest.raises(common.WeightsError, match=r"connector/"):
    connector.load_connector(str(tmp_path / connector.FILE), mqt_params, mqt_cfg)
  with pytest.raises(common.WeightsError, match="no such connector file"):
    connector.load_connector(str(tmp_path / "nope.safetensors"), params, model_cfg)


def test_refuses_what_hf_cannot_express(tmp_path):
  """The default CPU model (mean-centred images, prompt token shift, windowed prefix) is
  refused with every field named; allow= accepts the inexact window only."""
  c = base.get_config("none")
  c.model.decoder.sliding_window, c.model.decoder.local_global = 64, True
  model_cfg, _ = config_lib.validate_config(c)
  problems = hf.unrepresentable(model_cfg)
  assert [p.split("=")[0] for p in problems] == ["vision.center_input", "decoder.prefix_token_shift",
                                                 "decoder.window_prefix"]
  _, params = _params(model_cfg, scaled=False)
  with pytest.raises(ValueError, match=r"vision.center_input=True.*decoder.prefix_token_shift=3"):
    hf.export_hf(params, model_cfg, str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing written
  assert len(hf.unrepresentable(model_cfg, allow=("decoder.window_prefix",))) == 2
  with pytest.raises(ValueError, match="allow='vision.center_input' is unknown"):
    hf.unrepresentable(model_cfg, allow=("vision.center_input",))
  g1 = _config("gemma")
  g1.model.decoder.attn_softcap = 50.0
  g1.model.vision.attn_window = 2
  g1_cfg, _ = config_lib.validate_config(g1)
  assert [p.split("=")[0] for p in hf.unrepresentable(g1_cfg)] == ["vision.attn_window", "decoder.attn_softcap"]
  g1.model.frame_posemb = "sincos"
  g1_cfg, _ = config_lib.validate_config(g1)
  assert [p.split("=")[0] for p in hf.unrepresentable(g1_cfg)] == [
      "frame_posemb", "vision.attn_window", "decoder.attn_softcap"]
  g1.model.visual_positions = "spatial"
  g1_cfg, _ = config_lib.validate_config(g1)
  assert [p.split("=")[0] for p in hf.unrepresentable(g1_cfg)][:2] == ["frame_posemb", "visual_positions"]
  with pytest.raises(ValueError, match="image_token_index=-1 must be >= 0"):
    hf.hf_config(_cfg(_config()), image_token_index=-1)


def _cfg(c):
  return config_lib.validate_config(c)[0]


def _main(*args):
  fv = flags.FlagValues()
  export.define_flags(fv)
  fv(["export", *args])
  export.main([], fv)


def test_cli(tmp_path, capsys):
  """A trained-run checkpoint -> big_vision npz via the command line -> load_npz, bit for bit;
  hf of the same (default CPU) model is refused naming the fields; bad flags name themselves."""
  c = _config(method="parcel")
  c.model.vision.image_size, c.model.vision.patch_size = 64, 8  # 16k px (synthetic data), grid 8
  c.model.vision.center_input, c.model.decoder.prefix_token_shift = True, 2  # big_vision holds both
  model_cfg, _, _, params, workdir = _checkpointed_run(c, tmp_path, seed=8, scaled=False)

  _main(f"--workdir={workdir}", "--format=big_vision", f"--out={tmp_path / 'bv'}")
  out = capsys.readouterr().out
  npz = tmp_path / "bv" / weights.NPZ_FILE
  n = len(np.load(npz).files)
  assert f"{npz}  {n} tensors, {os.path.getsize(npz):,} bytes" in out
  assert f"1 files, {n} tensors" in out and "step 0" in out
  _, fresh = _params(model_cfg, seed=9, scaled=False)
  back = common.flatten(big_vision.load_npz(str(npz), fresh, model_cfg))
  for p, a in common.flatten(params).items():
    assert np.array_equal(np.asarray(back[p]), np.asarray(a)), p

  with pytest.raises(SystemExit, match=r"vision.center_input=True.*decoder.prefix_token_shift=2"):
    _main(f"--workdir={workdir}", "--format=hf", f"--out={tmp_path / 'hf'}")
  with pytest.raises(SystemExit, match=r"--format='onnx' is unknown; allowed: hf, big_vision"):
    _main(f"--workdir={workdir}", "--format=onnx", f"--out={tmp_path / 'x'}")
  with pytest.raises(SystemExit, match=r"workdir .*missing does not exist"):
    _main(f"--workdir={tmp_path / 'missing'}", "--format=hf", f"--out={tmp_path / 'x'}")
  with pytest.raises(SystemExit, match="no checkpoint at step 7"):
    _main(f"--workdir={workdir}", "--format=hf", "--step=7", f"--out={tmp_path / 'x'}")


# ------------------------------------------------------------------ tokenizer and processor

SENTENCES = ("what colour is the cat", "how many red squares are there\n<loc0012><loc1023> two",
             "describe the picture", " two  three", "where is the big blue circle?")


@pytest.fixture(scope="module")
def gemma_tok_dir(tmp_path_factory):
  """A Gemma-style sentencepiece tokenizer with PaliGemma's <image>, alone in a directory."""
  d = tmp_path_factory.mktemp("gemma_tok")
  fx.train_sentencepiece(str(d / "tokenizer.model"), image_token=True)
  return str(d)


def _jsonl_run(tmp_path, tokenizer: str):
  """A tiny exportable run on a jsonl file of PNGs whose data.tokenizer is ``tokenizer`` (the
  decoder's vocabulary follows it): (config, model_cfg, spec, graphdef, params, workdir)."""
  data = tmp_path / "data"
  rows = []
  for i in range(4):
    image = fx.write_image(str(data / f"{i}.png"), "rgb", size=(40 + i, 30), seed=i)
    rows.append({"image": os.path.basename(image), "prefix": "what colour is the cat", "suffix": "red"})
  (data / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = _config()
  c.model.decoder.vocab_size = 0  # the tokenizer's
  with c.unlocked():
    c.data.update(dict(name="jsonl", train_path=str(data / "d.jsonl"), eval_path=str(data / "d.jsonl"),
                       tokenizer=tokenizer, max_text_len=16))
  return (c, *_checkpointed_run(c, tmp_path, seed=10))


def test_hf_export_carries_the_tokenizer(tmp_path, capsys, gemma_tok_dir):
  """A run on real data exports its Gemma tokenizer and a preprocessor_config.json:
  AutoTokenizer encodes as our GemmaTokenizer; AutoProcessor lays an image and a prompt out
  as our pipeline does (pixels, [<image>] x 16 + BOS + prompt + "\\n"), and the exported
  PaliGemma given the processor's inputs gives our logits."""
  from PIL import Image

  from parcel_jax.data import gemma_tokenizer, images
  from parcel_jax.data import tokenizer as tokenizer_lib
  c, model_cfg, spec, graphdef, params, workdir = _jsonl_run(tmp_path, gemma_tok_dir)
  out = tmp_path / "hf"
  _main(f"--workdir={workdir}", "--format=hf", f"--out={out}")
  printed = capsys.readouterr().out
  for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
               "preprocessor_config.json"):
    assert f"{out / name}  " in printed, name
  assert "5 files" in printed and "no tokenizer written" not in printed
  assert sorted(os.listdir(out)) == sorted(["config.json", "model.safetensors", "tokenizer.model",
                                            "tokenizer_config.json", "preprocessor_config.json"])

  ours = gemma_tokenizer.GemmaTokenizer(gemma_tok_dir)
  image_id = ours.piece_id("<image>")
  assert image_id is not None and json.load(open(out / "config.json"))["image_token_index"] == image_id
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
  rng = np.random.default_rng()
  words = list(rng.choice(fx.WORDS, size=int(rng.integers(3, 12))))
  for text in (*SENTENCES, " ".join(words)):
    assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text), text
    assert hf_tok.encode(text + "\n") == tokenizer_lib.prompt_ids(ours, text), text  # BOS, no EOS

  processor = transformers.AutoProcessor.from_pretrained(str(out))
  assert type(processor).__name__ == "PaliGemmaProcessor" and processor.image_seq_length == 16
  assert processor.image_token_id == image_id
  png = fx.write_image(str(tmp_path / "q.png"), "rgb", size=tuple(int(x) for x in rng.integers(20, 60, 2)),
                       seed=int(rng.integers(1 << 20)))
  prefix = " ".join(words)
  inputs = processor(images=Image.open(png), text="<image>" + prefix, return_tensors="pt")
  prompt = tokenizer_lib.prompt_ids(ours, prefix)
  assert inputs["input_ids"][0].tolist() == [image_id] * 16 + prompt
  with open(png, "rb") as f:
    pixels = images.decode_image(f.read(), model_cfg.vision.image_size)
  np.testing.assert_allclose(inputs["pixel_values"][0].permute(1, 2, 0).numpy(), pixels, atol=1e-6)

  model = _from_pretrained(str(out))
  with torch.no_grad():
    hf_logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.numpy()[:, 16:]
  text = np.asarray([prompt])
  _, logits = _ours(model_cfg, graphdef, params, spec, pixels[None], text, np.zeros(text.shape, bool))
  assert_rel_close(logits, hf_logits, PARITY_TOL)
  print(f"processor -> exported PaliGemma vs ours: logits rel err {_err(logits, hf_logits):.2e}")


def test_tokenizer_file_and_directory_sources(tmp_path, gemma_tok_dir):
  """A lone tokenizer.json file is copied under that name with a tokenizer_config.json
  written for it; a directory's own tokenizer_config.json is copied as it is and its
  preprocessor_config.json keeps its other keys, with the exported model's size and visual
  tokens; a tokenizer larger than the model's vocabulary is refused, nothing written."""
  from parcel_jax.data import gemma_tokenizer
  from parcel_jax.weights import hf_processor
  ours = gemma_tokenizer.GemmaTokenizer(gemma_tok_dir)
  saved = tmp_path / "saved"
  transformers.GemmaTokenizer.from_pretrained(gemma_tok_dir).save_pretrained(str(saved))
  json_file = tmp_path / "gemma.json"
  os.rename(saved / "tokenizer.json", json_file)
  c = _config()
  c.model.decoder.vocab_size = gemma_tokenizer.GemmaTokenizer(str(json_file)).vocab_size  # + <mask>
  model_cfg, _ = config_lib.validate_config(c)
  _, params = _params(model_cfg, seed=11, scaled=False)

  out = tmp_path / "from_file"
  written = weights.export(params, model_cfg, "hf", str(out), tokenizer=str(json_file))
  assert [os.path.basename(w.path) for w in written] == [
      "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
      "preprocessor_config.json"]
  assert all(w.bytes == os.path.getsize(w.path) for w in written)
  assert json.load(open(out / "tokenizer_config.json"))["bos_token"] == "<bos>"
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  for text in SENTENCES:
    assert hf_tok.encode(text, add_special_tokens=False) == ours.encode(text), text
  pre = json.load(open(out / "preprocessor_config.json"))
  assert pre["size"] == {"height": 28, "width": 28} and pre["image_seq_length"] == 16
  assert pre["image_mean"] == pre["image_std"] == [0.5] * 3

  source = tmp_path / "ckpt_dir"
  source.mkdir()
  for name in ("tokenizer.model", "tokenizer_config.json"):
    src = os.path.join(gemma_tok_dir, name) if name == "tokenizer.model" else saved / name
    (source / name).write_bytes(open(src, "rb").read())
  (source / "preprocessor_config.json").write_text(json.dumps(
      {"size": {"height": 224, "width": 224}, "image_seq_length": 256, "resample": 3, "note": "kept"}))
  out2 = tmp_path / "from_dir"
  written = hf_processor.export_processor(str(source), str(out2), image_size=28, image_seq_length=16)
  assert [os.path.basename(w.path) for w in written] == ["tokenizer.model", "tokenizer_config.json",
                                                         "preprocessor_config.json"]
  assert (out2 / "tokenizer_config.json").read_bytes() == (source / "tokenizer_config.json").read_bytes()
  pre = json.load(open(out2 / "preprocessor_config.json"))
  assert pre["note"] == "kept" and pre["size"] == {"height": 28, "width": 28}
  assert pre["image_seq_length"] == 16 and pre["resample"] == hf_processor.PIL_BILINEAR

  small = _config()  # vocab 300 < the tokenizer's
  small_cfg, _ = config_lib.validate_config(small)
  _, small_params = _params(small_cfg, seed=12, scaled=False)
  with pytest.raises(ValueError, match=rf"data.tokenizer=.*has {ours.vocab_size} tokens, more than "
                                       r"the model's decoder.vocab_size=300"):
    weights.export(small_params, small_cfg, "hf", str(tmp_path / "refused"), tokenizer=gemma_tok_dir)
  assert not os.path.exists(tmp_path / "refused")


def test_synthetic_run_exports_no_tokenizer(tmp_path, capsys):
  """The synthetic word list is no Gemma vocabulary: the hf export writes the weights only,
  and says why."""
  c = _config()
  c.model.vision.image_size, c.model.vision.patch_size = 32, 8  # synthetic images: multiples of 16
  _, _, _, _, workdir = _checkpointed_run(c, tmp_path, seed=13, scaled=False)
  _main(f"--workdir={workdir}", "--format=hf", f"--out={tmp_path / 'hf'}")
  printed = capsys.readouterr().out
  assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
  assert "no tokenizer written: data.name='synthetic'" in printed and "2 files" in printed
