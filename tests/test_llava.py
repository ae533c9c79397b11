"""LLaVA data as it is: text-only records (no visual tokens, whatever the budget), multi-turn
conversations (one example, every answer supervised, later turns causal), and bad-data counts
that are part of the checkpointed iterator state (they continue on resume)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from parcel_jax import budgets as B
from parcel_jax import checkpoint as ckpt_lib
from parcel_jax import losses
from parcel_jax.data import gemma_tokenizer, images, pipeline
from parcel_jax.models import gemma, vlm
from tests import paligemma_fixtures as fx
from tests.test_vlm import GRID, random_inputs, tiny_model_config
from tests.test_real_data import tok, tok_dir  # noqa: F401 (fixtures: one tokenizer per module)
from tests.util import assert_rel_close

S = 16
MAX_LEN = 40


def _words(rng, lo=1, hi=5):
  return " ".join(rng.choice(fx.WORDS, size=int(rng.integers(lo, hi + 1))))


def _conv(*exchanges, image=True):
  turns = []
  for k, (q, a) in enumerate(exchanges):
    turns += [{"from": "human", "value": f"<image>\n{q}" if image and k == 0 else q},
              {"from": "gpt", "value": a}]
  return turns


def _cfg(path, tok_dir, **kw):
  return ml_collections.ConfigDict({**dict(
      name="llava", image_size=S, max_text_len=MAX_LEN, train_path=path, eval_path=path,
      tokenizer=tok_dir, on_error="skip", max_skip_fraction=1.0, long_text="truncate",
      train_size=1, eval_size=1, families=()), **kw})


def write_mix(root, rng, num_image=10, num_text=4):
  """A LLaVA json shaped like llava_v1_5_mix665k: image records with one to three exchanges,
  text-only records (no "image"), a conversation too long for MAX_LEN, two broken images, a
  missing image and a malformed record. Returns (path, {record: bad kind})."""
  kinds = ["rgb", "jpeg", "gray", "rgba", "palette", "gif"]
  records = []
  for i in range(num_image):
    img = fx.write_image(str(root / "images" / f"{i}.img"), kinds[i % len(kinds)],
                         size=(20 + i, 14), seed=i)
    exchanges = [(_words(rng), _words(rng, 1, 3)) for _ in range(1 + i % 3)]
    records.append({"id": str(i), "image": os.path.relpath(img, root), "conversations": _conv(*exchanges)})
  for i in range(num_text):
    exchanges = [(_words(rng), _words(rng, 1, 3)) for _ in range(1 + i % 2)]
    records.insert(2 * i + 1, {"id": f"t{i}", "conversations": _conv(*exchanges, image=False)})
  long = [(_words(rng, 4, 5), _words(rng, 4, 5)) for _ in range(6)]   # > MAX_LEN: truncated
  records.append({"id": "long", "image": records[0]["image"], "conversations": _conv(*long)})
  bad = {}
  fx.write_image(str(root / "images" / "broken.jpg"), "truncated")
  fx.write_image(str(root / "images" / "broken.png"), "corrupt")
  for kind, rec in (("corrupt_image", {"id": "b1", "image": "images/broken.jpg"}),
                    ("missing_image", {"id": "b2", "image": "images/nowhere.png"}),
                    ("corrupt_image", {"id": "b3", "image": "images/broken.png"}),
                    ("malformed_record", {"id": "b4", "image": "images/0.img"})):
    rec["conversations"] = _conv(("what is it", "a cat"))
    if kind == "malformed_record":
      rec["conversations"] = rec["conversations"][::-1]   # gpt first
    bad[len(records)] = kind
    records.insert(len(records), rec)
  path = root / "mix.json"
  path.write_text(json.dumps(records))
  return str(path), bad


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
  return write_mix(tmp_path_factory.mktemp("mix"), np.random.default_rng(0))


# ------------------------------------------------------------------ the source

def test_multi_turn_and_text_only_records(tmp_path, tok_dir):
  records = [
      {"image": "a.png", "conversations": _conv(("what colour", "red"), ("<image> where", "left"),
                                                ("how many", "two")) + [{"from": "human", "value": "and?"}]},
      {"id": "text", "conversations": _conv(("write a poem", "roses are red"), image=False)},
      {"image": ["a.png", "b.png"], "conversations": _conv(("q", "a"))},
      {"image": "a.png", "conversations": _conv(("q", "a"), ("q2", "  "))},
  ]
  fx.write_image(str(tmp_path / "a.png"), "rgb")
  (tmp_path / "d.json").write_text(json.dumps(records))
  source = pipeline.build_source(_cfg(str(tmp_path / "d.json"), tok_dir), "train")
  assert len(source) == 4 and source.describe(1) == "example 1 (record 1)"
  ex = source[0]
  assert (ex["question"], ex["answer"]) == ("what colour", "red") and bool(ex["has_image"])
  assert ex["turns"] == (("where", "left"), ("how many", "two"))  # placeholder stripped, "and?" dropped
  ex = source[1]
  assert not ex["has_image"] and ex["turns"] == () and ex["answer"] == "roses are red"
  np.testing.assert_array_equal(ex["image"], np.zeros((S, S, 3), np.float32))
  # A list of images is an example of several frames: more than data.max_frames (1) is bad.
  for index, kind, words in ((2, "malformed_record", "2 images \\(frames\\), more than data.max_frames=1"),
                             (3, "empty_answer", "turn 3")):
    with pytest.raises(images.BadExample, match=words) as e:
      source[index]
    assert e.value.kind == kind
  single = pipeline.build_source(_cfg(str(tmp_path / "d.json"), tok_dir, conversation="single_exchange"), "train")
  assert len(single) == 1 * 3 + 1 + 1 + 2
  assert single.describe(2) == "example 2 (record 0, exchange 2)" and single[2]["answer"] == "two"
  assert single[1]["question"] == "where" and single[1]["turns"] == ()
  assert single[3]["answer"] == "roses are red" and not single[3]["has_image"]
  with pytest.raises(ValueError, match="data.conversation='dialogue' is unknown; allowed: multi_turn, single_exchange"):
    pipeline.build_source(_cfg(str(tmp_path / "d.json"), tok_dir, conversation="dialogue"), "train")


# ------------------------------------------------------------------ the layout

def test_multi_turn_layout_and_attention_mask(tok):
  rng = np.random.default_rng()
  exchanges = [(_words(rng), _words(rng, 1, 3)) for _ in range(int(rng.integers(2, 4)))]
  (prefix, suffix), *turns = exchanges
  out, truncated = gemma_tokenizer.layout_example(tok, prefix, suffix, 64, "reject", turns=turns)
  assert not truncated
  # Expected: <bos> q1 \n | a1 <eos> q2 \n a2 <eos> ..., loss on the answers and their EOS.
  ids, supervised = [tok.bos_id, *tok.encode(prefix), tok.sep_id], []
  start = len(ids)
  for k, (q, a) in enumerate(exchanges):
    if k:
      ids += tok.encode(q) + [tok.sep_id]
      supervised += [False] * (len(tok.encode(q)) + 1)
    ids += tok.encode(a) + [tok.eos_id]
    supervised += [True] * (len(tok.encode(a)) + 1)
  n = len(ids)
  np.testing.assert_array_equal(out["text"][:n], ids)
  assert (out["text"][n:] == tok.pad_id).all()
  pos = np.arange(64)
  np.testing.assert_array_equal(out["text_mask"], pos < n)
  np.testing.assert_array_equal(out["ar_mask"], (pos >= start) & (pos < n))  # later prompts causal
  target_supervised = np.zeros(65, bool)
  target_supervised[start:n] = supervised
  np.testing.assert_array_equal(out["loss_mask"], target_supervised[1:])
  np.testing.assert_array_equal(out["targets"], np.append(out["text"][1:], tok.pad_id))
  assert tok.decode(out["targets"][out["loss_mask"]]) == exchanges[0][1]  # up to the first EOS
  # One answer == the single-exchange layout.
  one, _ = gemma_tokenizer.layout_example(tok, prefix, suffix, 64, "reject")
  single, _ = gemma_tokenizer.layout_example(tok, prefix, suffix, 64, "reject", turns=())
  for k in one:
    np.testing.assert_array_equal(one[k], single[k])

  # The decoder's mask: the prefix is bidirectional (and sees nothing after it); every later
  # token, prompt or answer, sees exactly the valid tokens up to itself.
  mask = np.asarray(gemma.make_attention_mask(jnp.asarray(out["text_mask"])[None],
                                              jnp.asarray(out["ar_mask"])[None]))[0]
  expected = np.zeros((64, 64), bool)
  expected[:start, :start] = True
  for i in range(start, n):
    expected[i, :i + 1] = True
  np.testing.assert_array_equal(mask, expected)


def test_long_conversations_drop_whole_trailing_turns(tok):
  rng = np.random.default_rng()
  exchanges = [(_words(rng, 2, 4), _words(rng, 2, 4)) for _ in range(5)]
  (prefix, suffix), *turns = exchanges
  full, _ = gemma_tokenizer.layout_example(tok, prefix, suffix, 200, turns=turns)
  n = int(full["text_mask"].sum())
  lengths = [len(tok.encode(q)) + len(tok.encode(a)) + 2 for q, a in exchanges]
  lengths[0] += 1  # BOS
  ends = np.cumsum(lengths)
  for max_len in (ends[2], ends[2] + 1, ends[3] - 1):  # room for exactly 3 exchanges
    out, truncated = gemma_tokenizer.layout_example(tok, prefix, suffix, int(max_len), "truncate", turns=turns)
    assert truncated
    np.testing.assert_array_equal(out["text"][:ends[2]], full["text"][:ends[2]])
    assert out["text_mask"].sum() == ends[2] and out["text"][ends[2] - 1] == tok.eos_id
    np.testing.assert_array_equal(out["loss_mask"][:ends[2] - 1], full["loss_mask"][:ends[2] - 1])
    assert not out["loss_mask"][ends[2] - 1:].any()
  out, truncated = gemma_tokenizer.layout_example(tok, prefix, suffix, n, "truncate", turns=turns)
  assert not truncated and out["text_mask"].all()
  with pytest.raises(gemma_tokenizer.TextTooLong, match=rf"needs {n} tokens .* 4 later exchanges"):
    gemma_tokenizer.layout_example(tok, prefix, suffix, n - 1, "reject", turns=turns)
  # The first exchange alone too long: its answer is cut, as for a single exchange.
  out, truncated = gemma_tokenizer.layout_example(tok, prefix, suffix, lengths[0] - 1, "truncate", turns=turns)
  assert truncated and out["text_mask"].all() and tok.eos_id not in out["text"]


# ------------------------------------------------------------------ the model

def _text_only_reference(model, text, text_mask, ar):
  """The decoder on the text alone: no visual slots at all."""
  x = model.decoder.embed(text, shift_mask=text_mask & ~ar)
  return model.decoder.logits(model.decoder(x, input_mask=text_mask, ar_mask=ar))


@pytest.mark.parametrize("method", ["parcel", "mqt"])
def test_text_only_examples_have_no_visual_tokens(method):
  """A text-only row's logits depend neither on its (dummy) image nor on the budget, and equal
  the decoder run on its text alone; rows with images are unchanged by the flag."""
  rng = np.random.default_rng()
  model = vlm.VLM(tiny_model_config(method), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  graphdef, params = nnx.split(model)
  spec = B.BudgetSpec.from_config(ml_collections.ConfigDict(dict(
      method=method, routing="piecewise", bank_size=0, budgets=(), query_bucket=64)), GRID)
  images_a, text, text_mask = random_inputs(rng)
  images_b = jnp.asarray(rng.uniform(-1, 1, size=images_a.shape), jnp.float32)
  ar = jnp.asarray(np.arange(text.shape[1])[None] >= 4) & text_mask
  has_image = jnp.array([True, False])

  @functools.partial(jax.jit, static_argnums=3)
  def logits(images, budgets, has_image, bucket):
    m = nnx.merge(graphdef, params)
    return m(images, text, text_mask, ar, bucket=bucket, budgets=budgets, has_image=has_image)

  budgets = [int(b) for b in rng.choice(spec.budgets, size=2, replace=False)]
  runs = []
  for b in budgets:
    vec = jnp.full((2,), b, jnp.int32)
    for bucket in (spec.bucket(b), spec.compact_bucket(b)):
      runs += [np.asarray(logits(imgs, vec, has_image, bucket)) for imgs in (images_a, images_b)]
      with_image = np.asarray(logits(images_a, vec, jnp.array([True, True]), bucket))
      np.testing.assert_array_equal(runs[-2][0], with_image[0])
  valid = np.asarray(text_mask[1])
  reference = np.asarray(jax.jit(lambda p: _text_only_reference(nnx.merge(graphdef, p), text, text_mask,
                                                              ar))(params))[1]
  for r in runs:
    assert_rel_close(r[1][valid], reference[valid], 1e-5)
  # With its image the same row does depend on it (the test could fail).
  vec = jnp.full((2,), budgets[0], jnp.int32)
  both = jnp.array([True, True])
  seen = [np.asarray(logits(imgs, vec, both, spec.bucket(budgets[0])))[1] for imgs in (images_a, images_b)]
  assert np.abs(seen[0] - seen[1])[valid].max() > 1e-4


def test_text_only_loss_gives_the_vision_tower_no_gradient():
  rng = np.random.default_rng()
  model = vlm.VLM(tiny_model_config("parcel"), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  graphdef, params = nnx.split(model)
  images_, text, text_mask = random_inputs(rng)
  ar = jnp.asarray(np.arange(text.shape[1])[None] >= 4) & text_mask
  targets = jnp.roll(text, -1, axis=1)

  def loss(params, has_image):
    m = nnx.merge(graphdef, params)
    logits = m(images_, text, text_mask, ar, bucket=B.Bucket(8, 36), budgets=jnp.array([100, 80]),
               has_image=has_image)
    return losses.token_loss(logits, targets, ar)[0]

  grad = jax.jit(jax.grad(loss))
  for has_image, zero in (([False, False], True), ([True, False], False)):
    grads = grad(params, jnp.array(has_image))
    vision = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["vision"]))
    decoder = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["decoder"]))
    assert decoder > 0 and ((vision == 0.0) if zero else (vision > 0)), (has_image, vision)


# ------------------------------------------------------------------ the pipeline

def test_mixed_batches_and_counts(mix, tok_dir, tok):
  path, bad = mix
  cfg = _cfg(path, tok_dir)
  source = pipeline.build_source(cfg, "eval")
  ds = pipeline.build_eval_dataset(cfg, batch_size=len(source))
  (batch,) = list(ds)
  np.testing.assert_array_equal(batch["valid"], [i not in bad for i in range(len(source))])
  records = json.loads(open(path).read())
  expected_image = np.array(["image" in r for r in records])
  np.testing.assert_array_equal(batch["has_image"][batch["valid"]], expected_image[batch["valid"]])
  assert (batch["image"][~batch["has_image"]] == 0).all()
  # Every answer of a valid record is supervised: the targets under the loss are its answers.
  for i in np.flatnonzero(batch["valid"]):
    answers = [t["value"] for t in records[i]["conversations"][1::2]]
    supervised = list(batch["targets"][i][batch["loss_mask"][i]])
    got = []
    while supervised:
      end = supervised.index(tok.eos_id) + 1 if tok.eos_id in supervised else len(supervised)
      got.append(tok.decode(supervised[:end]))
      supervised = supervised[end:]
    if records[i]["id"] == "long":  # whole trailing exchanges dropped
      assert 1 <= len(got) < len(answers) and got == answers[:len(got)], (got, answers)
    else:
      assert got == answers, (i, got, answers)
  counts = ds.bad_data_stats.as_dict()
  assert counts["seen"] == len(source) and counts["skipped"] == len(bad) and counts["truncated"] == 1
  for kind in set(bad.values()):
    assert counts[f"skipped_{kind}"] == list(bad.values()).count(kind)
  # Train batches mix image and text-only rows (one shape, one program per bucket).
  it = iter(pipeline.build_train_dataset(cfg, seed=3, global_batch_size=8, num_threads=2))
  rows = np.concatenate([next(it)["has_image"] for _ in range(4)])
  it.close()
  assert rows.any() and not rows.all()


def _consume(cfg, steps, state=None, batch_size=4, num_threads=2):
  ds = pipeline.build_train_dataset(cfg, seed=7, global_batch_size=batch_size, num_threads=num_threads)
  it = iter(ds)
  if state is not None:
    it.set_state(state)
  fingerprints = [int(np.asarray(next(it)["text"]).sum()) for _ in range(steps)]
  return it, ds.bad_data_stats.as_dict(), fingerprints


def test_counts_are_iterator_state_and_survive_a_checkpoint(mix, tok_dir, tmp_path):
  path, bad = mix
  cfg = _cfg(path, tok_dir)
  _, straight, straight_prints = _consume(cfg, 9)
  # Counted as consumed, not as prefetched: the same with and without prefetch threads.
  assert _consume(cfg, 9, num_threads=0)[1] == straight
  assert straight["skipped"] >= 1 and straight["seen"] == 9 * 4 + straight["skipped"]

  it, first, prints = _consume(cfg, 4)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(4, {"step": 4}, it, ml_collections.ConfigDict({"seed": 7}))
  it.close()
  fresh_ds = pipeline.build_train_dataset(cfg, seed=7, global_batch_size=4, num_threads=2)
  fresh = iter(fresh_ds)
  assert int(ckpt.restore(4, {"step": 0}, fresh)["step"]) == 4
  ckpt.close()
  assert fresh_ds.bad_data_stats.as_dict() == first  # restored ...
  prints += [int(np.asarray(next(fresh)["text"]).sum()) for _ in range(5)]
  assert prints == straight_prints
  assert fresh_ds.bad_data_stats.as_dict() == straight  # ... and continued: one run's counts
  fresh.close()
  saved = json.loads(next((tmp_path / "ckpt" / "4" / "data").glob("process_0-of-1.json")).read_text())
  assert saved["bad_data"]["seen"] == first["seen"]
  # A state saved before the counts were part of it (the bare read position) still restores.
  it, _, _ = _consume(cfg, 0, state=saved["reads"])
  assert next(it)["text"].shape == (4, MAX_LEN)
  it.close()


def test_skip_limit_is_judged_over_the_whole_run(mix, tok_dir):
  """Counts restored from a checkpoint count towards data.max_skip_fraction."""
  path, _ = mix
  cfg = _cfg(path, tok_dir, max_skip_fraction=0.2)
  it, counts, _ = _consume(cfg, 2)
  state = it.get_state()
  it.close()
  assert counts["skipped"] / max(counts["seen"], len(pipeline.build_source(cfg, "train"))) <= 0.2
  state["bad_data"]["skipped"]["missing_image"] += 10   # as if an earlier run had skipped them
  with pytest.raises(pipeline.BadDataError, match=r"more than data.max_skip_fraction=0.2 allows"):
    _consume(cfg, 4, state=state)


# ------------------------------------------------------------------ training

def test_train_stop_resume_and_evaluate_on_a_llava_mix(mix, tok_dir, tok, tmp_path):
  """train.py on the mix (image / text-only rows, multi-turn, bad records): stopped at step 2
  and resumed, its logged counts are one uninterrupted stream's at every step; the final
  evaluation reports the eval stream's counts."""
  from parcel_jax import config as config_lib
  from parcel_jax import train
  from tests.util import tiny_config
  path, bad = mix
  steps, batch = 4, 8
  data = dict(name="llava", train_path=path, eval_path=path, tokenizer=tok_dir, on_error="skip",
              max_skip_fraction=0.5, long_text="truncate", conversation="multi_turn", max_text_len=MAX_LEN,
              num_threads=2)
  num_eval = len(pipeline.build_source(_cfg(path, tok_dir), "eval"))
  overrides = {"train.num_steps": steps, "train.batch_size": batch, "model.connector.budgets": (16,),
               "eval.budgets": (16,), "eval.num_examples": num_eval, "eval.batch_size": 8,
               "model.decoder.vocab_size": tok.vocab_size, **{f"data.{k}": v for k, v in data.items()}}
  workdir = str(tmp_path / "run")
  assert train.train_and_evaluate(tiny_config(**overrides, **{"train.stop_at": 2}), workdir) == {"stopped_at": 2}
  result = train.train_and_evaluate(tiny_config(**overrides), workdir)   # resumes from step 2

  # One uninterrupted pass over the same stream, step by step.
  config = tiny_config(**overrides)
  config_lib.validate_config(config)  # fills data.image_size from the model's preset
  ds = pipeline.build_train_dataset(config.data, seed=config.seed, global_batch_size=batch, num_threads=0)
  it = iter(ds)
  expected = []
  for _ in range(steps):
    next(it)
    expected.append(pipeline.data_metrics(ds))
  it.close()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert [r["step"] for r in logged] == list(range(1, steps + 1))
  assert [{k: r[k] for k in expected[0]} for r in logged] == expected
  assert expected[-1]["data/skipped"] >= 1 and expected[-1]["data/seen"] == steps * batch + expected[-1]["data/skipped"]
  assert all(np.isfinite(r["loss"]) for r in logged)

  assert result["num_examples"] == num_eval - len(bad)
  counts = result["data"]
  assert (counts["data/seen"], counts["data/skipped"], counts["data/truncated"]) == (num_eval, len(bad), 1)
  for kind in set(bad.values()):
    assert counts[f"data/skipped_{kind}"] == list(bad.values()).count(kind)
  with open(os.path.join(workdir, "eval.json")) as f:
    assert json.load(f)["data"] == counts
