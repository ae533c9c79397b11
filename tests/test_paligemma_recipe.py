"""The paper's PaliGemma-2 recipes (configs/paligemma2/*.py): paper settings, and an end-to-end
CPU run of parcel_224.py from a tiny saved HF checkpoint on a LLaVA folder of real image files
(train, checkpoint, evaluate exact match per budget)."""

import json
import os

import numpy as np
import pytest

from tests import paligemma_fixtures as fx
from tests.conftest import run_cli
from configs.paligemma2 import m3_224, mqt_224, none_224, parcel_224, parcel_448
from parcel_jax import config as config_lib

RECIPES = {"parcel_224": parcel_224, "m3_224": m3_224, "mqt_224": mqt_224, "none_224": none_224,
           "parcel_448": parcel_448}


def _validated(module):
  c = module.get_config()
  with c.unlocked():
    c.data.name = "synthetic"  # no tokenizer file needed to check the rest
    c.data.max_text_len = 16
  return c, config_lib.validate_config(c)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_is_the_papers(name):
  c, (model_cfg, spec) = _validated(RECIPES[name])
  v, d, con = model_cfg.vision, model_cfg.decoder, model_cfg.connector
  assert (v.patch_size, v.width, v.depth, v.mlp_dim, v.num_heads) == (14, 1152, 27, 4304, 16)
  assert (d.vocab_size, d.width, d.depth, d.mlp_dim, d.num_heads, d.num_kv_heads, d.head_dim) == \
      (257_152, 2304, 26, 9216, 8, 4, 256)
  assert d.post_norms and d.local_global and d.sliding_window == 4096 and d.final_softcap == 30.0
  assert (con.num_heads, con.mlp_dim) == (12, 4304)
  o = c.optim
  assert o.lr == pytest.approx(1e-5) and o.weight_decay == 0 and (o.b1, o.b2) == (0.9, 0.999)
  assert o.freeze == "" and tuple(o.lr_multipliers) == (("^(connector|projection)/", 1.0),)
  assert tuple(c.mesh.shape) == (1, -1, 1)
  assert (c.init.hf_checkpoint, c.init.big_vision_npz) == ("", "")
  assert c.data.tokenizer == c.init.hf_checkpoint  # follows the checkpoint by default
  if name == "parcel_448":
    assert v.image_size == 448 and spec.grid_size == 32
    assert spec.budgets[0] == 16 and spec.budgets[-1] == 1024 and spec.max_queries == 768
    assert config_lib.eval_budgets(c, spec) == (64, 256, 1024)
  else:
    assert v.image_size == 224 and spec.grid_size == 16
    expected = {"parcel_224": tuple(range(16, 257, 2)), "m3_224": (4, 16, 64, 256),
                "mqt_224": tuple(range(2, 257, 2)), "none_224": (256,)}[name]
    assert spec.budgets == expected
  # The connector follows the projection's schedule: the same group, the same multiplier.
  from parcel_jax import optim
  labels = optim._labels({"connector": {"q": 0}, "projection": {"kernel": 0}, "decoder": {"e": 0}},
                         tuple(o.lr_multipliers), o.freeze)
  assert labels["connector"]["q"] == labels["projection"]["kernel"] != labels["decoder"]["e"]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
  """A tiny PaliGemma-2 HF checkpoint (with its tokenizer) and a LLaVA folder of real images."""
  root = tmp_path_factory.mktemp("world")
  tok_path = fx.train_sentencepiece(str(root / "tok" / "tokenizer.model"))
  import sentencepiece as spm
  vocab = spm.SentencePieceProcessor(model_file=tok_path).vocab_size()
  model = fx.hf_paligemma("gemma2", image_size=64, patch_size=4, vocab_size=vocab, vision_width=32,
                          text_width=32, depth=2, sliding_window=64, std_scale=0.5)
  ckpt = fx.save_hf(model, str(root / "ckpt"), tokenizer=tok_path)
  answers = ["red", "blue", "two", "three", "yes", "no"]
  kinds = ["rgb", "jpeg", "gray", "rgba", "palette", "gif"]
  records = []
  for i in range(12):
    img = fx.write_image(str(root / "data" / "images" / f"{i}.img"), kinds[i % len(kinds)],
                         size=(40 + i, 30), seed=i)
    records.append({"id": str(i), "image": os.path.relpath(img, root / "data"), "conversations": [
        {"from": "human", "value": "<image>\nwhat is the answer"},
        {"from": "gpt", "value": answers[i % len(answers)]}]})
  # Two bad examples: skipped and counted under the recipe's data.on_error=skip.
  records.append({"id": "m", "image": "images/missing.png", "conversations": records[0]["conversations"]})
  fx.write_image(str(root / "data" / "images" / "broken.jpg"), "truncated")
  records.append({"id": "t", "image": "images/broken.jpg", "conversations": records[0]["conversations"]})
  data = root / "data" / "llava.json"
  data.write_text(json.dumps(records))
  return model, ckpt, str(data)


def test_softcap_switch_survives_checkpoint_dims(tiny_world):
  _, ckpt, data = tiny_world
  c = parcel_224.get_config()
  c.init.hf_checkpoint = ckpt
  c.model.decoder.final_softcap = 0.0  # transfer: soft-capping off
  c.model.connector.num_heads = 4
  c.eval.budgets = (16,)
  model_cfg, _ = config_lib.validate_config(c)
  assert model_cfg.decoder.final_softcap is None  # kept off (init.keep)
  assert (model_cfg.vision.image_size, model_cfg.vision.width, model_cfg.decoder.width) == (64, 32, 32)
  assert model_cfg.decoder.attn_softcap == 5.0  # the rest comes from the checkpoint
  assert c.data.tokenizer == ckpt and c.data.image_size == 64


def test_parcel_224_end_to_end_from_hf_checkpoint(tiny_world, tmp_path):
  """`python -m parcel_jax.train --config=configs/paligemma2/parcel_224.py` with tiny-size
  overrides: initialises from the HF checkpoint, trains on real files, checkpoints, evaluates."""
  model, ckpt, data = tiny_world
  workdir = str(tmp_path / "run")
  overrides = {
      "init.hf_checkpoint": ckpt, "data.train_path": data, "data.eval_path": data,
      "model.dtype": "float32", "model.vision.remat": "none", "model.decoder.remat": "none",
      "model.connector.num_heads": 4, "model.connector.mlp_dim": 64,
      "model.connector.budgets": "(24,32)", "eval.budgets": "(24,32)",
      "train.num_steps": 3, "train.batch_size": 4, "train.checkpoint_every": 2, "train.log_every": 1,
      "optim.warmup_steps": 1, "eval.num_examples": 12, "eval.batch_size": 6,
      "data.num_threads": 0, "data.max_text_len": 16, "data.max_skip_fraction": 0.25}
  args = ["--config=configs/paligemma2/parcel_224.py", f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  out = run_cli("parcel_jax.train", *args, timeout=400)
  assert out.returncode == 0, out.stderr[-4000:]

  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  assert set(result["budgets"]) == {"24", "32"} and result["num_examples"] == 12
  for row in result["budgets"].values():
    assert set(row) == {"overall"} and 0.0 <= row["overall"] <= 1.0  # family 'all' only
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps == [2, 3]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert logged[-1]["step"] == 3 and np.isfinite(logged[-1]["loss"])
  assert logged[-1]["data/skipped_missing_image"] >= 1 and logged[-1]["data/skipped_corrupt_image"] >= 1

  # Trained from the checkpoint: 3 Adam steps at LR <= 1e-5 move no weight by more than 3e-5.
  from parcel_jax import runs
  from parcel_jax.weights import common
  run = runs.load_run(workdir)
  flat = common.flatten(run.params)
  emb = model.state_dict()["model.language_model.embed_tokens.weight"].numpy()
  np.testing.assert_allclose(np.asarray(flat["decoder/embedding"]), emb, atol=3.5e-5)
  assert np.abs(np.asarray(flat["decoder/embedding"]) - emb).max() > 0  # and it did train
  assert any(p.startswith("connector/") for p in flat)
  assert run.tokenizer.vocab_size == emb.shape[0]
