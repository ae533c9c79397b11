"""Input-adaptive budget policies: the simulated cascade and router on score tables, the online
cascade in serving (its answers are direct runs at the budget it stopped at, on cached
features), the greedy score pass, the router (trained on the training split only), and the
comparison command."""

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest

from parcel_jax import compare_policies, evaluation, flops, policies, policy_scores, predict
from parcel_jax import router as router_lib
from parcel_jax import runs, scores, serving
from parcel_jax.data import pipeline, synthetic
from parcel_jax.data import tokenizer as tokenizer_lib
from tests.conftest import run_cli
from tests.test_serving import QUESTIONS, alone, random_run, write_images  # noqa: F401 (fixture)
from tests.util import assert_rel_close


def random_table(n=300, budgets=(16, 32, 64, 128, 256), rng=None):
  rng = rng or np.random.default_rng()
  budgets = np.asarray(budgets)
  k = budgets.size
  flops_ = np.sort(rng.uniform(1e9, 5e9, k))
  return {"budgets": budgets, "flops": flops_, "vit_flops": np.float64(rng.uniform(0.1, 0.9) * flops_[0]),
          "index": np.arange(n), "family": rng.integers(0, 5, n),
          "correct": rng.random((n, k)) < rng.uniform(0.2, 0.9, k), "answer_prob": rng.random((n, k)),
          "min_token_prob": rng.random((n, k)), "answers": policies.GREEDY}


# ------------------------------------------------------------------ simulation

def test_cascade_on_hand_made_scores():
  """4 examples x (16, 64, 256), FLOPs 1, 2, 5 G of which the ViT is 0.5 G. At threshold 0.6
  they stop at steps 0, 1, 2, 1: all correct, tokens 16, 80, 336, 80 (mean 128), FLOPs
  1, 0.5 + 0.5 + 1.5 = 2.5, 2.5 + 4.5 = 7, 2.5 G (mean 3.25 G)."""
  table = {"budgets": np.array([16, 64, 256]), "flops": np.array([1e9, 2e9, 5e9]), "vit_flops": 0.5e9,
           "index": np.arange(4), "family": np.array([0, 0, 3, 3]), "answers": policies.GREEDY,
           "correct": np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 1, 0]], bool),
           "answer_prob": np.array([[.9, .9, .9], [.3, .7, .9], [.2, .4, .5], [.1, .8, .2]]),
           "min_token_prob": np.ones((4, 3))}
  result = policies.simulate_cascade(table, [0.0, 0.6, 1.5])
  np.testing.assert_array_equal(result["stop"], [[0, 0, 0, 0], [0, 1, 2, 1], [2, 2, 2, 2]])
  low, mid, high = result["points"]
  assert (low["accuracy"]["overall"], low["mean_tokens"]["overall"], low["mean_flops"]["overall"]) == (0.25, 16, 1e9)
  assert mid["accuracy"]["overall"] == 1.0 and mid["mean_tokens"]["overall"] == pytest.approx(128)
  assert mid["mean_flops"]["overall"] == pytest.approx(3.25e9)
  assert mid["mean_tokens"]["counting"] == pytest.approx((336 + 80) / 2)
  assert mid["budget_counts"] == {"16": 1, "64": 2, "256": 1}
  assert high["accuracy"]["overall"] == 0.75 and high["mean_tokens"]["overall"] == 336
  assert high["mean_flops"]["overall"] == pytest.approx(7e9)
  # Headline: B = 256 scores 0.75; the cheapest point within 1 point is t = 0.6 (128 tokens):
  # a 50 % saving. The most accurate fixed budget is 64 (0.75, cheaper than 256); the only
  # point at <= 64 tokens is t = 0, 0.5 below it.
  out = policies.compare(table, cascade=result)
  head = out["headline"]["cascade"]["overall"]
  assert head["tokens_saving"]["saving"] == pytest.approx(0.5) and head["tokens_saving"]["threshold"] == 0.6
  assert head["flops_saving"]["saving"] == pytest.approx(1 - 3.25 / 5)
  assert head["tokens_gain"]["fixed_budget"] == 64 and head["tokens_gain"]["gain"] == pytest.approx(-0.5)
  assert out["headline"]["fixed"]["overall"]["tokens_saving"]["budget"] == 64
  assert out["headline"]["oracle"]["overall"]["tokens_saving"]["saving"] == pytest.approx(1 - (16 + 64 + 256 + 64) / 4 / 256)
  text = policies.format_comparison(out)
  assert "cascade over [16, 64, 256]" in text and "saving 50.0%" in text
  with pytest.raises(ValueError, match="greedy answers' scores"):
    policies.compare({**table, "answers": "teacher_forced"}, cascade=result)
  with pytest.raises(ValueError, match=r"budget\(s\) \[100\] were not scored"):
    policies.simulate_cascade(table, [0.5], ladder=(16, 100))
  with pytest.raises(ValueError, match="lack 'vit_flops'"):
    policies.simulate_cascade({k: v for k, v in table.items() if k != "vit_flops"}, [0.5])


def test_held_out_threshold_is_fixed_on_the_training_scores_only():
  """The threshold comes from the training table alone (changing the eval table's confidences
  leaves it), is the cheapest training point within 1 point of B = 256 there, and the eval
  numbers are the cascade's at exactly that threshold."""
  rng = np.random.default_rng()
  train, evals = random_table(400, rng=rng), random_table(300, rng=rng)
  train_points = policies.simulate_cascade(train)["points"]
  t = policies.choose_threshold(train_points, train)
  ref = policies.reference_point(policies.fixed_points(train))["accuracy"]["overall"]
  ok = [p for p in train_points if p["accuracy"]["overall"] >= ref - policies.ACCURACY_LOSS - 1e-12]
  assert ok and t == min(ok, key=lambda p: (p["mean_tokens"]["overall"], -p["accuracy"]["overall"]))["threshold"]
  shuffled = {**evals, "answer_prob": rng.permutation(evals["answer_prob"])}
  assert policies.choose_threshold(train_points, train) == t
  for table in (evals, shuffled):
    point = policies.simulate_cascade(table, [t])["points"][0]
    h = policies.held_out(t, train_points, point, policies.fixed_points(table))
    b256 = policies.fixed_points(table)[-1]
    assert h["threshold"] == t and h["accuracy"] == point["accuracy"]["overall"]
    assert h["tokens_saving"] == pytest.approx(1 - point["mean_tokens"]["overall"] / 256)
    assert h["loss"] == pytest.approx(b256["accuracy"]["overall"] - point["accuracy"]["overall"])
    assert h["flops_saving"] == pytest.approx(1 - point["mean_flops"]["overall"] / b256["mean_flops"]["overall"])
  # No training point within 1 point (every budget below 256 wrong, confidences flat): no threshold.
  hard = {**train, "correct": np.zeros_like(train["correct"])}
  hard["correct"][:, -1] = True
  hard["answer_prob"] = np.full_like(train["answer_prob"], 0.5)
  hard_points = policies.simulate_cascade(hard, [0.0, 0.4])["points"]
  assert policies.choose_threshold(hard_points, hard) is None
  assert policies.held_out(None, hard_points, None, policies.fixed_points(evals)) is None
  out = policies.compare(evals, cascade=policies.simulate_cascade(evals), held_out_results={
      "cascade": policies.held_out(t, train_points, policies.simulate_cascade(evals, [t])["points"][0],
                                   policies.fixed_points(evals)), "router": None})
  text = policies.format_comparison(out)
  assert "threshold fixed on the training split" in text and f"t={t:.4g}" in text
  assert "no threshold within 1 point" in text


@pytest.mark.parametrize("confidence", policies.CONFIDENCES)
def test_cascade_simulation_extremes_and_costs_on_random_scores(confidence):
  rng = np.random.default_rng()
  table = random_table(rng=rng)
  b, f, vit = table["budgets"], table["flops"], float(table["vit_flops"])
  ladder = tuple(sorted(rng.choice(b, size=3, replace=False).tolist()))
  cols = policies.columns_of(table, ladder)
  threshold = float(rng.uniform(0.2, 0.8))
  result = policies.simulate_cascade(table, [0.0, threshold, policies.ABOVE_ONE], ladder=ladder,
                                     confidence=confidence)
  low, mid, high = result["points"]
  # Threshold 0: every example at the smallest budget of the ladder; above 1: at the largest.
  assert low["accuracy"]["overall"] == pytest.approx(table["correct"][:, cols[0]].mean())
  assert low["mean_tokens"]["overall"] == ladder[0] and low["budget_counts"][str(ladder[0])] == 300
  assert high["accuracy"]["overall"] == pytest.approx(table["correct"][:, cols[-1]].mean())
  assert high["mean_tokens"]["overall"] == pytest.approx(sum(ladder))
  assert high["mean_flops"]["overall"] == pytest.approx(vit + sum(f[c] - vit for c in cols))
  # The middle threshold, example by example with the online rule: costs add up.
  cascade = policies.Cascade(ladder, threshold, confidence)
  tokens, cost, hits = [], [], []
  for i in range(300):
    run, budget = [], ladder[0]
    while budget is not None:
      run.append(budget)
      budget = cascade.next_budget(budget, table[confidence][i, cols[ladder.index(budget)]])
    tokens.append(sum(run))
    cost.append(vit + sum(f[cols[ladder.index(x)]] - vit for x in run))
    hits.append(table["correct"][i, cols[ladder.index(run[-1])]])
    assert result["stop"][1, i] == len(run) - 1
  assert mid["mean_tokens"]["overall"] == pytest.approx(np.mean(tokens))
  assert mid["mean_flops"]["overall"] == pytest.approx(np.mean(cost))
  assert mid["accuracy"]["overall"] == pytest.approx(np.mean(hits))
  for family in range(5):
    sel = table["family"] == family
    assert mid["mean_tokens"][synthetic.FAMILIES[family]] == pytest.approx(np.mean(np.asarray(tokens)[sel]))
  # A default sweep: thresholds ascending from 0 to above 1, mean tokens never falling.
  sweep = policies.simulate_cascade(table, ladder=ladder, confidence=confidence)["points"]
  assert sweep[0]["threshold"] == 0.0 and sweep[-1]["threshold"] > 1.0
  spent = [p["mean_tokens"]["overall"] for p in sweep]
  assert all(a <= b + 1e-9 for a, b in zip(spent, spent[1:]))


def test_router_simulation_extremes_and_costs_on_random_scores():
  rng = np.random.default_rng()
  table = random_table(rng=rng)
  prob = rng.random(table["correct"].shape)
  extra = float(rng.uniform(1e3, 1e6))
  low, mid, high = policies.simulate_router(table, prob, [0.0, 0.5, 1.5], router_flops=extra)["points"]
  assert low["mean_tokens"]["overall"] == 16 and low["mean_flops"]["overall"] == pytest.approx(table["flops"][0] + extra)
  assert high["mean_tokens"]["overall"] == 256 and high["accuracy"]["overall"] == pytest.approx(
      table["correct"][:, -1].mean())
  col = np.array([next((j for j in range(5) if prob[i, j] >= 0.5), 4) for i in range(300)])
  assert mid["mean_tokens"]["overall"] == pytest.approx(table["budgets"][col].mean())
  assert mid["mean_flops"]["overall"] == pytest.approx(table["flops"][col].mean() + extra)
  assert mid["accuracy"]["overall"] == pytest.approx(table["correct"][np.arange(300), col].mean())
  with pytest.raises(ValueError, match="prob_correct has shape"):
    policies.simulate_router(table, prob[:, :2])


def test_cascade_checks_its_ladder():
  with pytest.raises(ValueError, match="strictly ascending"):
    policies.Cascade((64, 16), 0.5)
  with pytest.raises(ValueError, match="confidence 'loss' is unknown"):
    policies.Cascade((16, 64), 0.5, "loss")
  with pytest.raises(ValueError, match="threshold must be"):
    policies.Cascade((16, 64), float("nan"))
  cascade = policies.Cascade((16, 64, 256), 0.5)
  assert cascade.next_budget(16, 0.49) == 64 and cascade.next_budget(16, 0.5) is None
  assert cascade.next_budget(256, 0.0) is None


# ------------------------------------------------------------------ the router

def test_router_inputs_pool_and_hash():
  rng = np.random.default_rng()
  features = rng.standard_normal((3, 16, 16, 5)).astype(np.float32)
  anchors = router_lib.pool_anchors(features)
  assert anchors.shape == (3, 16, 5)
  p, q = rng.integers(0, 4, 2)
  np.testing.assert_allclose(anchors[:, 4 * p + q], features[:, 4 * p:4 * p + 4, 4 * q:4 * q + 4].mean((1, 2)),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="do not pool to a 4x4 grid"):
    router_lib.pool_anchors(features[:, :10, :10])
  ids = rng.integers(0, 1000, 7)
  bag = router_lib.prompt_bag(router_lib.pad_prompts([ids, ids[:2]], 9), buckets=64)
  assert bag.shape == (2, 64) and bag[0].sum() == 7 and bag[1].sum() == 2
  assert bag[0, ids[0] % 64] >= 1


def toy_router_scores(rng, n, dv=6, budgets=(16, 64, 256), split="train"):
  """Labels that the inputs decide: budget j is correct iff anchor feature 0 > -1 + j (a
  harder example needs a larger budget)."""
  anchors = rng.standard_normal((n, 16, dv)).astype(np.float32)
  prompt = router_lib.pad_prompts([rng.integers(0, 50, rng.integers(3, 8)) for _ in range(n)], 10)
  correct = anchors[:, :1, 0] > np.arange(len(budgets))[None] * -1.0 + 0.5
  return {"budgets": np.asarray(budgets), "anchors": anchors, "prompt": prompt, "correct": correct,
          "index": np.arange(n) + 1000, "split": split}


@pytest.mark.parametrize("hidden", [0, 8])
def test_router_learns_a_rule_of_its_inputs_and_round_trips(hidden, tmp_path):
  rng = np.random.default_rng()
  train = toy_router_scores(rng, 1000, dv=2)
  router = router_lib.train(train, hidden=hidden, steps=300, threshold=0.7)
  held_out = toy_router_scores(rng, 400, dv=2)
  prob = router.probabilities(held_out["anchors"], held_out["prompt"])
  assert ((prob >= 0.5) == held_out["correct"]).mean() > 0.9
  assert router.weight_decay in router_lib.WEIGHT_DECAYS        # chosen on held-out training rows
  d, k = 16 * 2 + router_lib.PROMPT_BUCKETS, 3
  assert router.flops == (2 * d * k if not hidden else 2 * d * hidden + 2 * hidden * k)
  np.testing.assert_array_equal(router.train_index, train["index"])
  path = str(tmp_path / "router.safetensors")
  router.save(path)
  back = router_lib.load(path)
  np.testing.assert_array_equal(back.probabilities(held_out["anchors"], held_out["prompt"]), prob)
  assert (back.budgets, back.threshold, back.hidden, back.train_split) == ((16, 64, 256), 0.7, hidden, "train")
  # One request from its (g, g, Dv) features: the budget its pooled anchors route to.
  features = rng.standard_normal((16, 16, 2)).astype(np.float32)
  p = router.probabilities(router_lib.pool_anchors(features)[None], held_out["prompt"][:1])
  expected = router.budgets[policies.first_confident(p, 0.7)[0]]
  assert router.choose(features, held_out["prompt"][0][held_out["prompt"][0] >= 0]) == expected
  with pytest.raises(ValueError, match="trained on"):
    router.probabilities(held_out["anchors"][:, :, :1], held_out["prompt"])
  with pytest.raises(ValueError, match="is not a router file"):
    open(tmp_path / "x.safetensors", "wb").write(open(path, "rb").read().replace(b"jax.router/1", b"jax.ROUTER/1"))
    router_lib.load(str(tmp_path / "x.safetensors"))


def test_router_is_fit_on_the_training_split_only():
  rng = np.random.default_rng()
  with pytest.raises(ValueError, match="training split only; these scores are of split 'eval'"):
    router_lib.train(toy_router_scores(rng, 20, split="eval"), steps=1)


def test_router_reads_no_eval_example(random_run, monkeypatch):
  """Scoring the training split and fitting the router read training examples only, the
  ones the router records; none of them is an eval example."""
  reads = []
  original = synthetic.SyntheticSource.__getitem__
  monkeypatch.setattr(synthetic.SyntheticSource, "__getitem__",
                      lambda self, i: reads.append((self.split, int(i))) or original(self, i))
  train = policy_scores.collect(random_run, (16, 24), split="train", num_examples=12, batch_size=8,
                                progress=False)
  router = router_lib.train(train, steps=20)
  assert {split for split, _ in reads} == {"train"}
  np.testing.assert_array_equal(np.sort(router.train_index), sorted({i for _, i in reads}))
  assert router.train_split == "train"
  reads.clear()
  evals = policy_scores.collect(random_run, (16, 24), split="eval", num_examples=12, batch_size=8,
                                progress=False)
  assert {split for split, _ in reads} == {"eval"}
  # The same indices of the two splits are different examples (other images).
  data = random_run.config.data
  train_images = {original(pipeline.build_source(data, "train"), i)["image"].tobytes() for i in router.train_index}
  eval_images = {original(pipeline.build_source(data, "eval"), i)["image"].tobytes() for i in evals["index"]}
  assert not train_images & eval_images
  assert router.probabilities(evals["anchors"], evals["prompt"]).shape == (12, 2)


# ------------------------------------------------------------------ greedy scores

def test_policy_scores_are_the_served_greedy_answers(random_run):
  """The score pass's probabilities are those of the greedy answer decoded alone; its
  correctness is evaluate's exact match; a greedy answer taken as the target is correct
  under teacher forcing with the same probability; anchors pool the ViT features."""
  run, budgets = random_run, (16, 24)
  table = policy_scores.collect(run, budgets, split="eval", num_examples=8, batch_size=8, progress=False)
  assert table["correct"].shape == table["answer_prob"].shape == (8, 2) and table["answers"] == "greedy"
  assert table["vit_flops"] == flops.cost(run.config, 16)["vit"]
  assert table["flops"].tolist() == [flops.cost(run.config, b)["total"] for b in budgets]
  config = run.config.copy_and_resolve_references()
  config.eval.batch_size = config.eval.num_examples = 8
  result = evaluation.evaluate(run.graphdef, run.params, config, run.spec, budgets, run.mesh,
                               progress=False, per_example=True)
  np.testing.assert_array_equal(table["correct"], result["per_example"]["correct"])
  batch = next(iter(pipeline.build_eval_dataset(run.config.data, batch_size=8, num_examples=8)))
  features = evaluation.encode_images(run.graphdef, run.params, jnp.asarray(batch["image"]))
  np.testing.assert_allclose(table["anchors"], router_lib.pool_anchors(np.asarray(features)), rtol=1e-5, atol=1e-6)
  i = int(np.random.default_rng().integers(8))
  prompt = table["prompt"][i][table["prompt"][i] >= 0]
  np.testing.assert_array_equal(prompt, tokenizer_lib.prompt_ids(run.tokenizer, _question(run, i)))
  for j, b in enumerate(budgets):
    ref = generation_alone(run, features[i:i + 1], prompt, b)
    np.testing.assert_allclose(table["answer_prob"][i, j], ref["answer_prob"], rtol=1e-4)
    np.testing.assert_allclose(table["min_token_prob"][i, j], ref["min_token_prob"], rtol=1e-4)
    # Teacher-forced on the greedy answer as the target: exact match, the same probability.
    arrays = tokenizer_lib.prefix_lm_arrays(prompt, ref["ids"], run.config.data.max_text_len,
                                            run.tokenizer.pad_id)
    logits = np.asarray(run.model.text_logits(features[i:i + 1], jnp.asarray(arrays["text"])[None],
                                              jnp.asarray(arrays["text_mask"])[None],
                                              jnp.asarray(arrays["ar_mask"])[None],
                                              bucket=run.spec.compact_bucket(b), budgets=jnp.asarray([b])),
                        np.float64)[0]
    mask = arrays["loss_mask"]
    assert np.all(logits.argmax(-1)[mask] == arrays["targets"][mask])
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    target = np.take_along_axis(logp, arrays["targets"][:, None], -1)[:, 0]
    np.testing.assert_allclose(np.exp(target[mask].sum()), ref["answer_prob"], rtol=1e-4)


def _question(run, i):
  return pipeline.build_source(run.config.data, "eval")[i]["question"]


def generation_alone(run, features, prompt, budget):
  (row,) = serving.decode_rows(run, [np.asarray(features[0])], [prompt], [budget],
                               bucket=run.method_space().compact_bucket(budget), batch_size=1)
  return row


# ------------------------------------------------------------------ online cascade

LADDER = (16, 24, 100)   # three buckets: 4x4+0q, 4x4+46q, 8x8+64q
# One prompt length: the requests decoded alone share one compiled program per budget.
SAME_LENGTH = tuple(f"where is the {c} square" for c in ("red", "green", "blue", "red"))


def test_cascade_answers_are_direct_runs_at_the_budget_it_stopped(random_run, tmp_path):
  run = random_run
  images = write_images(tmp_path, 3, start=20)
  requests = [serving.Request(i + 1, f"r{i}", images[i % 3], q, "auto") for i, q in enumerate(SAME_LENGTH)]
  served, refs = {}, {}

  def direct(request, budget):   # the request alone at its compact bucket, the image re-encoded
    if (request.line, budget) not in refs:
      refs[request.line, budget] = alone(run, request.image, request.question, budget, server.decode_len)
    return refs[request.line, budget]

  for name, threshold in (("always", policies.ABOVE_ONE), ("never", 0.0), ("mid", None)):
    if threshold is None:   # between the first answers' confidences: some stop, some go on
      threshold = float(np.median([r["cascade"][0]["answer_prob"] for r in served["always"]]))
    server = serving.Server(run, batch_size=4, keep_logits=True, policy=policies.Cascade(LADDER, threshold))
    records = server.serve(requests)
    served[name] = records
    stats = server.stats
    assert stats.images_encoded == 3 and stats.errors == 0        # the ViT ran once per image
    assert stats.decoder_passes == sum(len(r["cascade"]) for r in records)
    assert stats.visual_tokens == sum(p["budget"] for r in records for p in r["cascade"])
    for request, record in zip(requests, records):
      passes = record["cascade"]
      assert [p["budget"] for p in passes] == list(LADDER[:len(passes)]) and record["budget"] == passes[-1]["budget"]
      assert all(p["answer_prob"] < threshold for p in passes[:-1])
      assert passes[-1]["answer_prob"] >= threshold or len(passes) == len(LADDER)
      # The answer given is the direct run at the budget it stopped at.
      ref = direct(request, record["budget"])
      n = record["logits"].shape[0]
      assert_rel_close(record["logits"], ref["logits"][0, :n], 1e-5)
      np.testing.assert_allclose(record["answer_prob"], np.exp(ref["logprobs"][0, :n].sum()), rtol=1e-4)
    if name == "mid":   # cached features: the same answers and logits as the first, re-encoded call
      again = server.serve(requests)
      assert server.stats.images_encoded == 0 and all(r["cached"] for r in again)
      for a, b in zip(records, again):
        assert a["cascade"] == b["cascade"]
        assert_rel_close(b["logits"], a["logits"], 1e-5)
  # Every pass had the confidence of the request served at that budget directly.
  fixed = {b: serving.Server(run, batch_size=4).serve(
      [serving.Request(r.line, r.id, r.image, r.question, b) for r in requests]) for b in LADDER}
  for i, record in enumerate(served["always"]):
    for p in record["cascade"]:
      d = fixed[p["budget"]][i]
      np.testing.assert_allclose([p["answer_prob"], p["min_token_prob"]], [d["answer_prob"], d["min_token_prob"]],
                                 rtol=1e-4)
  assert {r["budget"] for r in served["always"]} == {100} and {r["budget"] for r in served["never"]} == {16}
  assert all(len(r["cascade"]) == 1 for r in served["never"])
  # The online decisions are the simulation's on the same confidences.
  conf = np.array([[p["answer_prob"] for p in r["cascade"]] for r in served["always"]])
  stop = policies.first_confident(conf, threshold)
  assert [LADDER[s] for s in stop] == [r["budget"] for r in served["mid"]]
  assert 0 < sum(s == 0 for s in stop) < len(stop)


def test_cascade_budgets_outside_the_space_are_refused(random_run):
  with pytest.raises(ValueError, match=r"cascade budget\(s\) \[17\] are not valid for method 'parcel'"):
    serving.Server(random_run, policy=policies.Cascade((16, 17), 0.5))


def test_router_policy_serves_auto_requests(random_run, tmp_path):
  run = random_run
  rng = np.random.default_rng()
  (image,) = write_images(tmp_path, 1, start=30)
  train = toy_router_scores(rng, 50, dv=run.model_cfg.vision.width, budgets=(16, 24, 100))
  router = router_lib.train(train, steps=30)
  request = serving.Request(1, "x", image, QUESTIONS[0], "auto")
  record = serving.Server(run, batch_size=2, policy=serving.router_policy(router, run.tokenizer)).answer(request)
  features = evaluation.encode_images(run.graphdef, run.params,
                                      jnp.asarray(serving.generation.load_image(image, run.image_size))[None])
  expected = router.choose(np.asarray(features[0]), serving.generation.prompt_tokens(QUESTIONS[0], run.tokenizer))
  assert record["budget"] == expected


def test_predict_auto_policy_flags(random_run, tmp_path):
  flags_ = lambda **kw: types.SimpleNamespace(**{
      "auto_policy": None, "auto_scores": None, "auto_tolerance": 0.01, "cascade_budgets": None,
      "cascade_threshold": 0.5, "cascade_confidence": "answer_prob", "router": None, "router_threshold": None,
      "workdir": str(tmp_path), **kw})
  assert predict.auto_policy(random_run, flags_()) is None
  cascade = predict.auto_policy(random_run, flags_(auto_policy="cascade", cascade_budgets=["16", "64"],
                                                   cascade_threshold=0.3, cascade_confidence="min_token_prob"))
  assert cascade == policies.Cascade((16, 64), 0.3, "min_token_prob")
  default = predict.auto_policy(random_run, flags_(auto_policy="cascade"))
  assert default.budgets == tuple(b for b in random_run.config.eval.budgets if b in random_run.spec.budgets)
  with pytest.raises(FileNotFoundError, match="policies/router.safetensors does not exist"):
    predict.auto_policy(random_run, flags_(auto_policy="router"))
  with pytest.raises(ValueError, match="--auto_scores is read by --auto_policy=scores"):
    predict.auto_policy(random_run, flags_(auto_policy="cascade", auto_scores="x.npz"))


# ------------------------------------------------------------------ the command

def test_compare_policies_cli(tiny_workdir, tmp_path):
  out = tmp_path / "policies"
  proc = run_cli("parcel_jax.compare_policies", f"--workdir={tiny_workdir}", f"--out={out}", "--budgets=16,24",
                 "--num_examples=16", "--train_examples=16", "--batch_size=8", "--router_steps=20",
                 timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "cascade over [16, 24]" in proc.stdout and "router (linear" in proc.stdout
  assert "headline (overall)" in proc.stdout and "fit on 16 training examples" in proc.stdout
  assert "threshold fixed on the training split" in proc.stdout
  result = json.loads((out / "policies.json").read_text())
  assert set(result["held_out"]) == {"cascade", "router"}
  assert result["examples"] == 16 and result["reference_budget"] == 24
  assert result["cascade"]["points"][0]["mean_tokens"]["overall"] == 16
  assert result["cascade"]["points"][-1]["mean_tokens"]["overall"] == 16 + 24
  for name in ("policies.png", "policies_families.png", "router.safetensors"):
    assert (out / name).stat().st_size > 0
  evals, train = scores.load(str(out / "scores_eval.npz")), scores.load(str(out / "scores_train.npz"))
  assert (evals["split"], train["split"], evals["answers"]) == ("eval", "train", "greedy")
  router = router_lib.load(str(out / "router.safetensors"))
  np.testing.assert_array_equal(router.train_index, train["index"])
  # predict serves "auto" requests with the router written next to the run's scores.
  (image,) = write_images(tmp_path, 1, start=40)
  (tmp_path / "req.jsonl").write_text(json.dumps({"id": "a", "image": image, "question": QUESTIONS[0],
                                                  "budget": "auto"}) + "\n")
  proc = run_cli("parcel_jax.predict", f"--workdir={tiny_workdir}", f"--requests={tmp_path / 'req.jsonl'}",
                 f"--out={tmp_path / 'answers.jsonl'}", "--auto_policy=router",
                 f"--router={out / 'router.safetensors'}", "--router_threshold=0", timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (record,) = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
  assert record["budget"] == 16                                 # threshold 0: the smallest budget
  # Reused scores give the same comparison without scoring again.
  again = compare_policies.compare_run(runs.load_run(tiny_workdir), str(out), budgets=[16, 24], num_examples=16,
                                       train_examples=16, batch_size=8, router_steps=20, reuse=True)
  assert again["cascade"] == result["cascade"] and again["fixed"] == result["fixed"]

