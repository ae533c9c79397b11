"""Mixed-budget serving (batched answers equal answers alone, the feature cache, bad requests)
and per-example scores (agreement with evaluate, the oracle, the fixed-budget curve)."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from parcel_jax import config as config_lib
from parcel_jax import evaluation, generation, runs, scores, serving, sharding
from parcel_jax import state as state_lib
from parcel_jax.data import pipeline, synthetic
from tests.conftest import REPO, run_cli, tiny_config
from tests.util import assert_rel_close

# Two buckets of the method's space at grid 16: 4x4+46q (24, 40) and 8x8+64q (66, 100).
BUDGETS = (24, 40, 100, 66)
QUESTIONS = ("where is the red square", "what pattern is in row2 col3",
             "how many blue squares", "where is the green square")


@pytest.fixture(scope="module")
def random_run():
  """A tiny PARCEL model with N(0, 0.5) parameters from a fresh seed (numpy: nothing to
  compile) and a small token embedding, so that greedy answers vary (see test_predict)."""
  config = tiny_config()
  config.eval.num_examples = 32                      # one eval batch
  model_cfg, spec = config_lib.validate_config(config)
  mesh = sharding.make_mesh((-1, 1, 1))
  graphdef, target = state_lib.abstract_params(model_cfg, mesh)
  rng = np.random.default_rng()
  normal = lambda x, std: jax.device_put(std * rng.standard_normal(x.shape, np.float32), x.sharding)
  params = jax.tree.map(lambda x: normal(x, 0.5), target)
  params["decoder"]["embedding"] = normal(target["decoder"]["embedding"], 0.05)
  return runs.Run(config, model_cfg, spec, graphdef, params, mesh)


def save_png(image: np.ndarray, path: str) -> str:
  """An image in [-1, 1] (S, S, 3) as an 8-bit PNG at ``path``."""
  Image.fromarray(np.round((image + 1) * 127.5).clip(0, 255).astype(np.uint8)).save(path)
  return path


def write_images(directory, count: int, start: int = 0) -> list[str]:
  return [save_png(synthetic.generate("eval", i).image, os.path.join(directory, f"image{i}.png"))
          for i in range(start, start + count)]


def write_clip(directory, index: int, frames: int) -> list[str]:
  """The first ``frames`` frames of the synthetic motion clip ``index``, one PNG each, in order."""
  clip = synthetic.generate("eval", index, families=("motion",)).image
  return [save_png(frame, os.path.join(directory, f"clip{index}_f{t}.png")) for t, frame in enumerate(clip[:frames])]


def alone(run, path, question: str, budget: int, max_new_tokens: int) -> dict:
  """The request decoded by itself: batch 1, its own prompt length, the compact bucket.
  ``path``: one image, or a list of frames (through the ViT together, (1, T, S, S, 3))."""
  paths = [path] if isinstance(path, str) else list(path)
  image = np.stack([generation.load_image(p, run.image_size) for p in paths])
  image = image[0] if isinstance(path, str) else image
  features = evaluation.encode_images(run.graphdef, run.params, jnp.asarray(image)[None])
  prefix = generation.prompt_tokens(question, run.tokenizer)[None]
  return generation.decode_batch(run, features, prefix, np.ones(prefix.shape, bool), np.asarray([budget]),
                                 bucket=run.method_space().compact_bucket(budget),
                                 max_new_tokens=max_new_tokens, keep_logits=True)


def test_mixed_budget_batch_equals_each_request_alone(random_run, tmp_path):
  run = random_run
  images = write_images(tmp_path, 3)
  # Image 0 is asked twice (at two budgets of two buckets): one encode, one cache hit.
  requests = [serving.Request(i + 1, f"r{i}", images[min(i, 2)] if i != 3 else images[0], q, b)
              for i, (q, b) in enumerate(zip(QUESTIONS, BUDGETS))]
  server = serving.Server(run, batch_size=4, keep_logits=True)
  records = server.serve(requests)
  stats = server.stats
  assert (stats.answered, stats.errors, stats.images_encoded, stats.cache_hits) == (4, 0, 3, 1)
  assert len(stats.programs) == 2 and stats.batches == 2           # two buckets, padded batches
  assert stats.visual_tokens == sum(BUDGETS)
  assert [r["bucket"] for r in records] == ["4x4+46q", "4x4+46q", "8x8+64q", "8x8+64q"]
  assert [r["cached"] for r in records] == [False, False, False, True]
  for request, record in zip(requests, records):
    ref = alone(run, request.image, request.question, request.budget, server.decode_len)
    n = record["logits"].shape[0]
    limit = run.config.data.max_text_len - len(generation.prompt_tokens(request.question))
    assert record["answer"] == run.tokenizer.decode(ref["tokens"][0, :limit].tolist())
    assert_rel_close(record["logits"], ref["logits"][0, :n], 1e-5)
    np.testing.assert_allclose(record["answer_prob"], np.exp(ref["logprobs"][0, :n].sum()), rtol=1e-4)
    assert 0 < record["answer_prob"] <= record["min_token_prob"] <= 1


def test_cached_features_equal_reencoding(random_run, tmp_path):
  run = random_run
  images = write_images(tmp_path, 2, start=5)
  requests = [serving.Request(1, "a", images[0], QUESTIONS[0], 24),
              serving.Request(2, "b", images[1], QUESTIONS[1], 40)]
  server = serving.Server(run, batch_size=4, keep_logits=True)
  first = server.serve(requests)
  again = server.serve(requests)                    # every image now comes from the cache
  assert (server.stats.images_encoded, server.stats.cache_hits) == (0, 2)
  assert server.cache.hits == 2 and server.cache.misses == 2 and len(server.cache) == 2
  fresh = serving.Server(run, batch_size=4, keep_logits=True).serve(requests)   # re-encoded
  for a, b, c in zip(first, again, fresh):
    assert (a["cached"], b["cached"], c["cached"]) == (False, True, False)
    assert a["answer"] == b["answer"] == c["answer"]
    assert_rel_close(b["logits"], c["logits"], 1e-5)


def test_cache_evicts_least_recently_used():
  cache = serving.FeatureCache(max_entries=2)
  for key in "abc":
    assert not cache.lookup(key)
    cache.put(key, np.zeros(1))
    if key == "b":
      assert cache.lookup("a")                     # "a" used again: "b" is now the oldest
  assert "a" in cache and "b" not in cache and "c" in cache
  assert (cache.hits, cache.misses) == (1, 3)


def test_bad_requests_are_named_and_skipped(random_run, tmp_path):
  run = random_run
  (image,) = write_images(tmp_path, 1, start=9)
  (tmp_path / "broken.png").write_bytes(b"not an image")
  long_question = " ".join(["where"] * run.config.data.max_text_len)
  lines = [
      {"id": "ok1", "image": "image9.png", "question": QUESTIONS[0], "budget": 24},
      {"id": "odd", "image": "image9.png", "question": QUESTIONS[0], "budget": 17},
      {"id": "big", "image": "image9.png", "question": QUESTIONS[0], "budget": 1000},
      {"id": "word", "image": "image9.png", "question": QUESTIONS[0], "budget": "large"},
      {"id": "gone", "image": "missing.png", "question": QUESTIONS[0], "budget": 24},
      {"id": "junk", "image": "broken.png", "question": QUESTIONS[0], "budget": 24},
      {"id": "mute", "image": "image9.png", "question": "  ", "budget": 24},
      {"id": "long", "image": "image9.png", "question": long_question, "budget": 24},
      {"id": "nobudget", "image": "image9.png", "question": QUESTIONS[0]},
      "{not json",
      {"id": "ok2", "image": image, "question": QUESTIONS[1], "budget": "auto"},
  ]
  path = tmp_path / "requests.jsonl"
  path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
  requests = serving.read_requests(str(path))
  server = serving.Server(run, batch_size=4, policy=lambda request, features: 40)
  records = server.serve(requests)
  assert [r["line"] for r in records] == list(range(1, 12))
  assert server.stats.answered == 2 and server.stats.errors == 9
  assert records[0]["budget"] == 24 and records[-1]["budget"] == 40 and "answer" in records[-1]
  errors = {r["id"]: r["error"] for r in records if "error" in r}
  assert set(errors) == {"odd", "big", "word", "gone", "junk", "mute", "long", "nobudget", None}
  assert "budget 17 is not valid" in errors["odd"] and "even integers 16..256" in errors["big"]
  assert "must be an integer or 'auto'" in errors["word"]
  assert "missing.png does not exist" in errors["gone"]
  assert "broken.png is not a readable image" in errors["junk"]
  assert "'question' is empty" in errors["mute"] and "at most data.max_text_len" in errors["long"]
  assert "missing field(s) ['budget']" in errors["nobudget"] and "not valid JSON" in errors[None]
  # One request alone raises, naming its line and id.
  with pytest.raises(serving.RequestError, match=r"request line 2 \(id 'odd'\): budget 17"):
    server.answer(requests[1])


def test_auto_budget_policies(random_run, tmp_path):
  (image,) = write_images(tmp_path, 1, start=11)
  seen = []
  def policy(request, features):
    seen.append(features.shape)
    return 66
  server = serving.Server(random_run, batch_size=4, policy=policy)
  assert server.answer(serving.Request(1, "x", image, QUESTIONS[2], "auto"))["budget"] == 66
  assert seen == [(16, 16, random_run.model_cfg.vision.width)]
  default = serving.Server(random_run, batch_size=4).policy(None, None)
  assert default == min(random_run.spec.budgets) == 16
  bad = serving.Server(random_run, batch_size=4, policy=lambda r, f: 17)
  with pytest.raises(serving.RequestError, match="budget 17 is not valid"):
    bad.answer(serving.Request(1, "x", image, QUESTIONS[2], "auto"))
  # From per-example scores: the smallest budget within 2 points of the best (0.9 at 64).
  table = hand_made_scores()
  assert serving.policy_from_scores(table, tolerance=0.02)(None, None) == 64
  assert serving.policy_from_scores(table, tolerance=0.25)(None, None) == 16


# ------------------------------------------------------------------ frames (video, several images)

@pytest.fixture(scope="module")
def frames_run(random_run):
  """``random_run``'s model under data.max_frames = 3: requests of up to three frames."""
  config = random_run.config.copy_and_resolve_references()
  config.data.max_frames = 3
  return dataclasses.replace(random_run, config=config)


def assert_same_answer(run, record: dict, request: serving.Request, max_new_tokens: int) -> None:
  """The record's greedy tokens equal the request decoded alone, exactly; logits to 1e-5."""
  ref = alone(run, request.image, request.question, request.budget, max_new_tokens)
  n = record["logits"].shape[0]
  np.testing.assert_array_equal(record["logits"].argmax(-1), ref["tokens"][0, :n])
  limit = run.config.data.max_text_len - len(generation.prompt_tokens(request.question))
  assert n == limit or ref["tokens"][0, n - 1] == run.tokenizer.eos_id
  assert record["answer"] == run.tokenizer.decode(ref["tokens"][0, :limit].tolist())
  assert_rel_close(record["logits"], ref["logits"][0, :n], 1e-5)


def test_frames_request_equals_generate(frames_run, tmp_path):
  """A three-frame request ("images" in the file) answers what generation.generate answers on
  the (T, S, S, 3) clip at its budget, token for token; what the server holds for it is every
  frame's features, in the request's order."""
  run = frames_run
  frames = write_clip(tmp_path, int(np.random.default_rng().integers(10**6)), 3)
  line = {"id": "clip", "images": [os.path.basename(p) for p in frames], "question": QUESTIONS[0], "budget": 40}
  (tmp_path / "requests.jsonl").write_text(json.dumps(line) + "\n")
  (request,) = serving.read_requests(str(tmp_path / "requests.jsonl"))
  assert request.frames == tuple(frames)
  server = serving.Server(run, batch_size=4, keep_logits=True)
  record = server.answer(request)
  assert record["frames"] == 3 and record["bucket"] == "4x4+46q"
  assert (server.stats.images_encoded, server.stats.visual_tokens, len(server.stats.programs)) == (3, 3 * 40, 1)
  clip = np.stack([generation.load_image(p, run.image_size) for p in frames])
  assert record["answer"] == generation.generate(run, clip, QUESTIONS[0], [40])[40]
  assert_same_answer(run, record, request, server.decode_len)
  # The order: a random decoder's RMS-normed, near-uniform attention barely tells a clip from
  # its reverse, so the answer's logits cannot show it. The features the server decodes
  # from can: an "auto" request hands them to the policy, (T, g, g, Dv) in the given order.
  seen = []
  policy = lambda request, features: seen.append(np.asarray(features)) or 40
  auto = dataclasses.replace(request, budget=serving.AUTO)
  auto_record = serving.Server(run, batch_size=4, keep_logits=True, policy=policy).answer(auto)
  expected = np.asarray(evaluation.encode_images(run.graphdef, run.params, jnp.asarray(clip)[None]))[0]
  (features,) = seen
  assert features.shape == expected.shape and features.shape[0] == 3
  assert_rel_close(features, expected, 1e-5)
  reversed_gap = np.linalg.norm(features - features[::-1]) / np.linalg.norm(features)
  assert reversed_gap > 1e-2, reversed_gap           # the frames differ: the order is visible
  np.testing.assert_array_equal(auto_record["logits"].argmax(-1), record["logits"].argmax(-1))
  assert_rel_close(auto_record["logits"], record["logits"], 1e-5)


def test_frames_and_single_images_at_mixed_budgets(frames_run, tmp_path):
  """One- and three-frame requests at budgets of two buckets in one call: each answers as it
  does alone; a frame shared by requests is encoded once; one program per (bucket, frames)."""
  run = frames_run
  rng = np.random.default_rng()
  clip_a, clip_b = (write_clip(tmp_path, int(i), 3) for i in rng.choice(10**6, 2, replace=False))
  (single,) = write_images(tmp_path, 1, start=int(rng.integers(10**6)))
  requests = [serving.Request(1, "a0", clip_a[0], QUESTIONS[0], 24),          # clip a's first frame
              serving.Request(2, "a", tuple(clip_a), QUESTIONS[1], 40),
              serving.Request(3, "b", tuple(clip_b), QUESTIONS[2], 100),
              serving.Request(4, "s", single, QUESTIONS[3], 66),
              serving.Request(5, "b24", tuple(clip_b), QUESTIONS[0], 24)]     # clip b again, another budget
  server = serving.Server(run, batch_size=4, keep_logits=True)
  records = server.serve(requests)
  stats = server.stats
  assert (stats.answered, stats.errors, stats.images_encoded, stats.cache_hits) == (5, 0, 7, 4)
  assert [r.get("frames", 1) for r in records] == [1, 3, 3, 1, 3]
  assert [r["cached"] for r in records] == [False, False, False, False, True]
  assert [r["bucket"] for r in records] == ["4x4+46q", "4x4+46q", "8x8+64q", "8x8+64q", "4x4+46q"]
  assert len(stats.programs) == stats.batches == 4          # (bucket, frames): a and b24 share a batch
  assert stats.visual_tokens == 24 + 3 * 40 + 3 * 100 + 66 + 3 * 24
  for request, record in zip(requests, records):
    assert_same_answer(run, record, request, server.decode_len)


def test_too_many_frames_is_named_and_the_others_answered(frames_run, random_run, tmp_path):
  """More frames than data.max_frames, both "image" and "images", an empty list or a missing
  frame: an error naming the request; the other requests answer as they do without them."""
  rng = np.random.default_rng()
  frames = write_clip(tmp_path, int(rng.integers(10**6)), 3)
  (extra,) = write_images(tmp_path, 1, start=int(rng.integers(10**6)))
  names = [os.path.basename(p) for p in frames]
  q = QUESTIONS[1]
  lines = [{"id": "ok", "images": names, "question": q, "budget": 24},
           {"id": "four", "images": names + [os.path.basename(extra)], "question": q, "budget": 24},
           {"id": "listed", "image": names[::-1], "question": q, "budget": 40},    # a list under "image"
           {"id": "one", "images": [names[1]], "question": q, "budget": 66},      # one frame: one image
           {"id": "both", "image": names[0], "images": names, "question": q, "budget": 24},
           {"id": "empty", "images": [], "question": q, "budget": 24},
           {"id": "gone", "images": [names[0], "missing.png"], "question": q, "budget": 24}]
  path = tmp_path / "requests.jsonl"
  path.write_text("".join(json.dumps(l) + "\n" for l in lines))
  requests = serving.read_requests(str(path))
  assert requests[3].image == frames[1] and requests[2].frames == tuple(frames[::-1])
  server = serving.Server(frames_run, batch_size=4, keep_logits=True)
  records = server.serve(requests)
  assert [r["line"] for r in records] == list(range(1, 8))
  errors = {r["id"]: r["error"] for r in records if "error" in r}
  assert set(errors) == {"four", "both", "empty", "gone"} and server.stats.answered == 3
  assert "4 images (frames), more than data.max_frames=3" in errors["four"]
  assert "both 'image' and 'images'" in errors["both"] and "one or more paths" in errors["empty"]
  assert "missing.png does not exist" in errors["gone"]
  with pytest.raises(serving.RequestError, match=r"request line 2 \(id 'four'\): 4 images \(frames\), "
                                                 r"more than data.max_frames=3"):
    server.answer(requests[1])
  good = [requests[i] for i in (0, 2, 3)]
  without = serving.Server(frames_run, batch_size=4, keep_logits=True).serve(good)
  for request, record, ref in zip(good, [records[i] for i in (0, 2, 3)], without):
    assert record["answer"] == ref["answer"] and record.get("frames", 1) == len(request.frames)
    np.testing.assert_array_equal(record["logits"], ref["logits"])
    assert_same_answer(frames_run, record, request, server.decode_len)
  # A single-image run refuses two frames, naming its limit.
  with pytest.raises(serving.RequestError, match=r"request line 1 \(id 'pair'\): 2 images \(frames\), "
                                                 r"more than data.max_frames=1"):
    serving.Server(random_run, batch_size=4).answer(serving.Request(1, "pair", tuple(frames[:2]), q, 24))


# ------------------------------------------------------------------ per-example scores

def hand_made_scores():
  """10 examples x budgets (16, 64, 256); families: 6 grounding (0), 4 counting (3).

  Fixed budgets: 16 -> 7/10 correct, 64 -> 9/10, 256 -> 7/10. The oracle sends the 7 correct
  at 16 to 16, two more to 64, and example 9 (wrong everywhere) to 16: accuracy 0.9, mean
  tokens (8 x 16 + 2 x 64) / 10 = 25.6."""
  correct = np.array([[1, 1, 1]] * 5 + [[0, 1, 1], [1, 1, 0], [1, 1, 1], [0, 1, 0], [0, 0, 0]], bool)
  family = np.array([0] * 6 + [3] * 4)
  return {"budgets": np.array([16, 64, 256]), "flops": np.array([1e9, 2e9, 5e9]),
          "index": np.arange(10), "family": family, "correct": correct,
          "answer_prob": np.full((10, 3), 0.5), "min_token_prob": np.full((10, 3), 0.7)}


def test_oracle_and_fixed_budget_curve_on_hand_made_scores(tmp_path):
  table = hand_made_scores()
  np.testing.assert_array_equal(scores.oracle(table["correct"]), [0] * 5 + [1, 0, 0, 1, 0])
  best = scores.oracle_summary(table)
  assert best["overall"]["accuracy"] == pytest.approx(0.9)
  assert best["overall"]["mean_tokens"] == pytest.approx(25.6)
  assert best["overall"]["mean_flops"] == pytest.approx(1.2e9)
  assert best["overall"]["budget_counts"] == {"16": 8, "64": 2, "256": 0}
  # grounding: rows 0-5, row 5 needs 64 -> (5 x 16 + 64) / 6 = 24; counting: rows 6-9.
  assert best["grounding"]["accuracy"] == 1.0 and best["grounding"]["mean_tokens"] == pytest.approx(24.0)
  assert best["counting"]["accuracy"] == pytest.approx(0.75)
  assert best["counting"]["mean_tokens"] == pytest.approx((16 + 16 + 64 + 16) / 4)
  curve = scores.fixed_budget_curve(table)
  assert [r["budget"] for r in curve] == [16, 64, 256] and [r["flops"] for r in curve] == [1e9, 2e9, 5e9]
  assert [r["accuracy"]["overall"] for r in curve] == pytest.approx([0.7, 0.9, 0.7])
  assert [r["accuracy"]["counting"] for r in curve] == pytest.approx([0.5, 0.75, 0.25])
  path = str(tmp_path / "s.npz")
  scores.save(path, table, method="parcel", label="x")
  loaded = scores.load(path)
  assert loaded["method"] == "parcel" and scores.oracle_summary(loaded) == best
  assert "oracle" in scores.format_summary(loaded)
  with pytest.raises(ValueError, match="correct has shape"):
    scores.check({**table, "correct": table["correct"][:, :2]})
  with pytest.raises(ValueError, match="strictly ascending"):
    scores.check({**table, "budgets": np.array([64, 16, 256])})


def test_oracle_on_random_scores_is_a_lower_bound():
  """On fresh random tables: the oracle is at least as accurate as every fixed budget, its
  accuracy is the fraction of examples correct somewhere, and each example's budget is the
  smallest correct one (the smallest budget when none is)."""
  rng = np.random.default_rng()
  n, budgets = 200, np.array([16, 32, 64, 128, 256])
  correct = rng.random((n, budgets.size)) < rng.uniform(0.2, 0.8, budgets.size)
  table = {"budgets": budgets, "flops": budgets * 1e7 + 1e9, "index": np.arange(n),
           "family": rng.integers(0, 5, n), "correct": correct,
           "answer_prob": rng.random((n, budgets.size)), "min_token_prob": rng.random((n, budgets.size))}
  best = scores.oracle_summary(table)["overall"]
  curve = scores.fixed_budget_curve(table)
  assert best["accuracy"] == pytest.approx(correct.any(1).mean())
  assert all(best["accuracy"] >= r["accuracy"]["overall"] for r in curve)
  chosen = budgets[scores.oracle(correct)]
  for i in range(n):
    ok = [b for b, c in zip(budgets, correct[i]) if c]
    assert chosen[i] == (min(ok) if ok else budgets[0])
  assert best["mean_tokens"] == pytest.approx(chosen.mean())


def test_per_example_scores_agree_with_evaluate(random_run):
  """At every budget the per-example correctness averages to evaluate's exact match (overall
  and per family), the answer probabilities give its loss, and on one batch both equal an
  independent teacher-forced forward pass."""
  run = random_run
  budgets = (16, 24)
  result = evaluation.evaluate(run.graphdef, run.params, run.config, run.spec, budgets, run.mesh,
                               progress=False, per_example=True)
  per = result["per_example"]
  assert per["correct"].shape == per["answer_prob"].shape == (32, 2)
  np.testing.assert_array_equal(per["index"], np.arange(32))
  batch = next(iter(pipeline.build_eval_dataset(run.config.data, batch_size=32, num_examples=32)))
  np.testing.assert_array_equal(per["family"], batch["family"])
  for j, b in enumerate(budgets):
    row = result["budgets"][str(b)]
    assert per["correct"][:, j].mean() == pytest.approx(row["overall"])
    for f, name in enumerate(synthetic.FAMILIES):
      if name in row:
        assert per["correct"][per["family"] == f, j].mean() == pytest.approx(row[name])
    tokens = batch["loss_mask"].sum()
    assert -np.log(per["answer_prob"][:, j]).sum() / tokens == pytest.approx(
        result["token_metrics"][str(b)]["loss"], rel=1e-5)
    # Independently: log-softmax of the forward pass at the answer positions.
    bucket = run.spec.compact_bucket(b)
    features = evaluation.encode_images(run.graphdef, run.params, jnp.asarray(batch["image"]))
    logits = np.asarray(run.model.text_logits(features, jnp.asarray(batch["text"]), jnp.asarray(batch["text_mask"]),
                                              jnp.asarray(batch["ar_mask"]), bucket=bucket,
                                              budgets=jnp.full((32,), b, jnp.int32)), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    target = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"].astype(bool)
    np.testing.assert_allclose(per["answer_prob"][:, j], np.exp(np.where(mask, target, 0).sum(1)), rtol=1e-4)
    np.testing.assert_allclose(per["min_token_prob"][:, j], np.exp(np.where(mask, target, 0).min(1)), rtol=1e-4)
    hit = np.all((logits.argmax(-1) == batch["targets"]) | ~mask, axis=1)
    np.testing.assert_array_equal(per["correct"][:, j], hit)


def test_evaluate_cli_writes_per_example_scores(tiny_workdir, tmp_path):
  out = tmp_path / "eval"
  proc = run_cli("parcel_jax.evaluate", f"--workdir={tiny_workdir}", "--budgets=16,24", "--num_examples=32",
                 f"--out={out}", "--per_example")
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "budgets.json") as f:
    (run,) = json.load(f)["runs"]
  assert run["per_example_file"] == "per_example_0.npz" and "per_example" not in run
  table = scores.load(str(out / run["per_example_file"]))
  assert table["budgets"].tolist() == [16, 24] and table["correct"].shape == (32, 2)
  assert table["method"] == "parcel" and table["step"] == "3"
  for j, b in enumerate(("16", "24")):
    assert table["correct"][:, j].mean() == pytest.approx(run["budgets"][b]["score"]["overall"])
    assert table["flops"][j] == run["budgets"][b]["flops"]["total"]
  assert np.all((0 < table["answer_prob"]) & (table["answer_prob"] <= table["min_token_prob"] + 1e-12))
  assert "oracle" in proc.stdout and "per_example_0.npz" in proc.stdout


def test_mixed_budget_benchmark_runs():
  """benchmarks/mixed_budget.py end to end at tiny sizes: both modes answer alike."""
  tiny = ["--config.model.vision.width=32", "--config.model.vision.depth=1",
          "--config.model.decoder.width=32", "--config.model.decoder.depth=1"]
  proc = subprocess.run([sys.executable, "-m", "benchmarks.mixed_budget", "--requests=6", "--images=3",
                         "--budgets=24,40", "--batch_size=4", "--repeats=1", *tiny], cwd=REPO,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "answers equal in both modes: 6/6" in proc.stdout, proc.stdout
  assert re.search(r"ratio \(per-budget / mixed time\): warm [0-9.]+x, cold [0-9.]+x", proc.stdout)
  # 24 and 40 share the bucket 4x4+46q: one program mixed, two one budget at a time.
  assert re.search(r"mixed .* 1 decode programs", proc.stdout) and re.search(r"per-budget .* 2 decode programs",
                                                                                proc.stdout)
