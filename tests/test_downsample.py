"""``downsample`` (models/connectors/downsample.py): the image averaged to the budget's grid and
encoded by the same ViT. Its block means, its tokens against a ViT built for the small image,
its cost model, and training / evaluation / generation / serving, which encode it per budget."""

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parcel_jax import budgets as B
from parcel_jax import config as config_lib
from parcel_jax import evaluation, flops, generation, policies, runs, serving, sharding, train
from parcel_jax import state as state_lib
from parcel_jax.data import pipeline
from parcel_jax.models import connectors as C
from parcel_jax.models import layers, vit, vlm
from parcel_jax.models.connectors import downsample
from tests.test_serving import QUESTIONS, write_images
from tests.util import REPO, assert_rel_close, tiny_config

GRID, PATCH = 16, 4


def block_means(images: np.ndarray, grid: int) -> np.ndarray:
  """(b, S, S, 3) -> (b, grid * PATCH, grid * PATCH, 3), each pixel the mean of its block, by loops."""
  k = images.shape[1] // (grid * PATCH)
  side = grid * PATCH
  out = np.zeros((images.shape[0], side, side, 3), np.float64)
  for i in range(side):
    for j in range(side):
      out[:, i, j] = images[:, i * k:(i + 1) * k, j * k:(j + 1) * k].astype(np.float64).mean(axis=(1, 2))
  return out


def random_images(rng, n: int = 2) -> jax.Array:
  return jnp.asarray(rng.uniform(-1, 1, (n, GRID * PATCH, GRID * PATCH, 3)), jnp.float32)


def model_of(config):
  """(graphdef, params, spec) of ``config``, params N(0, 0.2) from a fresh seed (numpy: nothing
  to compile)."""
  model_cfg, spec = config_lib.validate_config(config)
  graphdef, target = state_lib.abstract_params(model_cfg, sharding.make_mesh((-1, 1, 1)))
  rng = np.random.default_rng()
  params = jax.tree.map(lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape, np.float32)), target)
  return graphdef, params, spec


def direct_vit(model: vlm.VLM, grid: int, table, images) -> jax.Array:
  """A ViT built for (grid * patch)-pixel images, holding the model's ViT weights and ``table``
  (grid**2, width) as its learned position table, applied to ``images``."""
  cfg = dataclasses.replace(model.cfg.vision, image_size=grid * PATCH, posemb="learn")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0))))
  weights = nnx.state(model.vision, nnx.Param).to_pure_dict()
  nnx.replace_by_pure_dict(state, {**weights, "posemb": jnp.asarray(table)})
  return nnx.merge(graphdef, state)(images)


def test_no_other_module_names_it():
  """The method is its own file: the rest of the package asks the class (``encodes_per_budget``,
  ``vision_grid``), it never names the method."""
  package = os.path.join(REPO, "parcel_jax")
  naming = [os.path.relpath(os.path.join(root, f), REPO) for root, _, files in os.walk(package)
            for f in files if f.endswith(".py")
            and re.search(r"\bdownsample\b", open(os.path.join(root, f)).read())]
  assert naming == ["parcel_jax/models/connectors/downsample.py"]


def test_space_routing_and_sampling():
  cfg = C.method_config("downsample", grid_size=GRID)
  cls = C.method_class("downsample")
  assert cls is downsample.Downsample and cls.encodes_per_budget
  assert B.budget_space("downsample", GRID) == B.budget_space("m3", GRID) == (4, 16, 64, 256)
  assert B.budget_space("downsample", 12) == B.budget_space("m3", 12) == (4, 9, 16, 36, 144)
  for b in (4, 16, 64, 256):
    assert B.route("downsample", b, GRID) == (b, 0)
    assert cls.vision_grid(cfg, B.Bucket(math.isqrt(b), 0)) == math.isqrt(b)
  with pytest.raises(ValueError, match=r"method 'downsample'.*\{4, 16, 64, 256\}"):
    B.route("downsample", 32, GRID)
  spec = B.BudgetSpec.from_config(tiny_config(**{"model.connector.method": "downsample"}).model.connector, GRID)
  assert [spec.encoding_bucket(b) for b in spec.budgets] == [spec.compact_bucket(b) for b in spec.budgets]
  assert B.BudgetSpec("m3", GRID, (16, 64)).encoding_bucket(16) is None
  # per_example: each bucket is one budget, so every example of a batch gets the batch's.
  seed = int(np.random.default_rng().integers(1 << 16))
  drawn = set()
  for step in range(40):
    bucket, budgets = B.sample_step(spec, seed, step, 8, mode="per_example")
    assert set(budgets.tolist()) == {bucket.anchor_grid ** 2} and bucket.query_slots == 0
    drawn.add(int(budgets[0]))
  assert drawn == set(spec.budgets)


def test_downsampled_image_is_exact_block_means():
  rng = np.random.default_rng()
  images = random_images(rng, 3)
  conn = C.make_connector(C.method_config("downsample", grid_size=GRID, width=8), rngs=nnx.Rngs(0))
  assert not jax.tree.leaves(nnx.state(conn, nnx.Param))          # parameter-free
  for g in (2, 4, 8, 16):
    small = np.asarray(conn.vision_input(images, B.Bucket(g, 0)))
    assert small.shape == (3, g * PATCH, g * PATCH, 3)
    np.testing.assert_allclose(small, block_means(np.asarray(images), g), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(conn.vision_input(images, B.Bucket(16, 0)), images)   # B = 256: the image


@pytest.mark.parametrize("posemb", ["sincos2d", "learn"])
def test_visual_tokens_are_the_vit_of_the_downsampled_image(posemb):
  rng = np.random.default_rng()
  graphdef, params, spec = model_of(tiny_config(**{"model.connector.method": "downsample",
                                                   "model.vision.posemb": posemb}))
  model = nnx.merge(graphdef, params)
  assert vlm.parameter_counts(model)["connector"] == 0
  images = random_images(rng)
  width = model.cfg.vision.width
  for b in spec.budgets:
    bucket, g = spec.compact_bucket(b), math.isqrt(b)
    features = model.encode_images(images, bucket)
    # Position codes at the coarse grid keep the full grid's frame (checked by hand below).
    if posemb == "learn":
      full = np.asarray(model.vision.posemb[...]).reshape(GRID, GRID, width)
      k = GRID // g
      table = full.reshape(g, k, g, k, width).mean(axis=(1, 3)).reshape(g * g, width)
    else:
      table = layers.sincos_2d(g, width, frame=GRID)
    direct = direct_vit(model, g, table, jnp.asarray(block_means(np.asarray(images), g), jnp.float32))
    assert features.shape == (2, g, g, width)
    assert_rel_close(features, direct, 1e-5)
    tokens, mask = model.visual_tokens(features, bucket, jnp.full((2,), b, jnp.int32))
    kernel, bias = np.asarray(model.projection.kernel[...]), np.asarray(model.projection.bias[...])
    assert_rel_close(tokens, np.asarray(direct).reshape(2, b, width) @ kernel + bias, 1e-5)
    assert mask.shape == (2, b) and bool(mask.all())
  if posemb == "sincos2d":   # a 2x2 cell's centre sits between fine patches 0 and 1: x = 0.5
    code = np.asarray(layers.sincos_2d(8, width, frame=GRID))[0]
    np.testing.assert_allclose(code[:width // 4], np.sin(0.5 / 1e4 ** (np.arange(width // 4) / (width // 4 - 1))),
                               rtol=1e-6)
  with pytest.raises(ValueError, match="'downsample' encodes the image for each budget"):
    model.encode_images(images)
  with pytest.raises(ValueError, match=r"expects the features of the image downsampled.*\(batch, 4, 4"):
    model.visual_tokens(features, spec.compact_bucket(16), jnp.full((2,), 16, jnp.int32))


def vit_flops(n: int, d: int, depth: int, mlp: int) -> int:
  return depth * (8 * n * d * d + 4 * n * n * d + 4 * n * d * mlp)


def test_cost_is_the_vit_at_the_budget_grid_plus_the_decoder():
  rng = np.random.default_rng()
  dv, dl, mlp = 4 * int(rng.integers(4, 12)), 32, int(rng.integers(32, 96))
  sizes = {"model.vision.image_size": GRID * PATCH, "model.vision.patch_size": PATCH}
  config = tiny_config(**{**sizes, "model.connector.method": "downsample", "model.vision.width": dv,
                          "model.vision.mlp_dim": mlp, "model.vision.depth": int(rng.integers(1, 4)),
                          "model.decoder.vocab_size": 64})
  v, dec = config.model.vision, config.model.decoder
  m3 = tiny_config(**{**sizes, "model.connector.method": "m3", "model.vision.width": dv, "model.vision.mlp_dim": mlp,
                      "model.vision.depth": v.depth, "model.decoder.vocab_size": 64})
  for b in (4, 16, 64, 256):
    cost = flops.cost(config, b)
    n_tot = b + 129
    llm = dec.depth * (4 * n_tot * dl * dec.head_dim * (dec.num_heads + dec.num_kv_heads)
                       + 4 * n_tot * n_tot * dec.num_heads * dec.head_dim + 6 * n_tot * dl * dec.mlp_dim)
    expected = {"vit": vit_flops(b, dv, v.depth, mlp), "connector": 0, "projection": 2 * b * dv * dl,
                "llm": llm, "head": 2 * 129 * dl * 64}
    assert {k: cost[k] for k in expected} == expected
    assert cost["total"] == sum(expected.values())
    pooled = flops.cost(m3, b)   # M3 pools the full ViT's features: same decoder, full ViT
    assert pooled["vit"] == vit_flops(GRID * GRID, dv, v.depth, mlp)
    assert (cost["vit"] < pooled["vit"]) == (b < 256) and cost["llm"] == pooled["llm"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step run through the config override, trained and evaluated at 16 and 64."""
  workdir = str(tmp_path_factory.mktemp("downsample"))
  config = tiny_config(**{"model.connector.method": "downsample", "train.num_steps": 2,
                          "model.connector.budgets": (16, 64), "eval.budgets": (16, 64)})
  result = train.train_and_evaluate(config, workdir)
  return runs.load_run(workdir), result


def direct_logits(run, batch: dict, budget: int) -> jax.Array:
  """The forward pass at ``budget`` on the block means of ``batch``'s images, the ViT run at
  the budget's grid directly (not through ``encode_images``)."""
  g = math.isqrt(budget)

  def forward(params, images, text, text_mask, ar_mask):
    model = nnx.merge(run.graphdef, params)
    return model.text_logits(model.vision(images, grid=g), text, text_mask, ar_mask, bucket=B.Bucket(g, 0),
                             budgets=jnp.full((text.shape[0],), budget, jnp.int32))
  return jax.jit(forward)(run.params, jnp.asarray(block_means(batch["image"], g), jnp.float32),
                          *(jnp.asarray(batch[k]) for k in ("text", "text_mask", "ar_mask")))


def test_trains_and_evaluates_through_the_config_override(trained, monkeypatch):
  run, result = trained
  assert result["method"] == "downsample" and set(result["budgets"]) == {"16", "64"}
  assert type(run.model.connector) is downsample.Downsample and run.step == 2
  calls = []
  real = evaluation.encode_images
  monkeypatch.setattr(evaluation, "encode_images", lambda *a: calls.append(a[3]) or real(*a))
  report = evaluation.evaluate_run(run, (16, 64), num_examples=32, progress=False)
  assert calls == [run.spec.compact_bucket(16), run.spec.compact_bucket(64)]   # one batch, per budget
  (batch,) = list(pipeline.build_eval_dataset(run.config.data, batch_size=32, num_examples=32))
  assert bool(np.all(batch["valid"])) and "has_image" not in batch
  for b in (16, 64):
    row = report["budgets"][str(b)]
    assert 0.0 <= row["score"]["overall"] <= 1.0 and np.isfinite(row["loss"])
    assert row["flops"]["vit"] == vit_flops(b, run.model_cfg.vision.width, run.model_cfg.vision.depth,
                                            run.model_cfg.vision.mlp_dim)
    # Evaluation at B is the direct forward pass at B (mean answer-token cross-entropy).
    logp = np.asarray(jax.nn.log_softmax(direct_logits(run, batch, b).astype(jnp.float32)), np.float64)
    nll = -np.take_along_axis(logp, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
    np.testing.assert_allclose(row["loss"], nll[np.asarray(batch["loss_mask"], bool)].mean(), rtol=1e-4)
  assert report["budgets"]["16"]["loss"] != report["budgets"]["64"]["loss"]   # the budget matters


def test_generation_and_serving_encode_per_budget(trained, tmp_path):
  run, _ = trained
  image_a, image_b = write_images(tmp_path, 2, start=3)
  question = QUESTIONS[0]
  limit = run.config.data.max_text_len - len(generation.prompt_tokens(question))
  answers = {path: generation.generate(run, generation.load_image(path, run.image_size), question, [16, 64])
             for path in (image_a, image_b)}
  for b in (16, 64):   # generate decodes each budget from the features encoded for it
    image = generation.load_image(image_a, run.image_size)[None]
    features = evaluation.encode_images(run.graphdef, run.params, jnp.asarray(image), B.Bucket(math.isqrt(b), 0))
    prefix = generation.prompt_tokens(question, run.tokenizer)[None]
    tokens = generation.greedy_tokens(run, features, prefix, b, limit)
    assert answers[image_a][b] == run.tokenizer.decode(tokens[0].tolist())
  # One image at two budgets, another under a cascade that always goes on to 64.
  requests = [serving.Request(1, "a16", image_a, question, 16),
              serving.Request(2, "a64", image_a, question, 64),
              serving.Request(3, "b", image_b, question, "auto")]
  server = serving.Server(run, batch_size=4, policy=policies.Cascade((16, 64), threshold=2.0))
  records = server.serve(requests)
  stats = server.stats
  assert (stats.answered, stats.errors, stats.images_encoded, stats.cache_hits) == (3, 0, 4, 0)
  assert len(server.cache) == 4                     # (image, budget) entries: a@16 a@64 b@16 b@64
  assert [p["budget"] for p in records[2]["cascade"]] == [16, 64] and records[2]["budget"] == 64
  assert [r["answer"] for r in records] == [answers[image_a][16], answers[image_a][64], answers[image_b][64]]
  again = server.serve(requests)                    # every encoding now comes from the cache
  assert (server.stats.images_encoded, server.stats.cache_hits) == (0, 3)
  assert [r["answer"] for r in again] == [r["answer"] for r in records]
  # The default "auto" policy (the smallest trained budget) reads no features.
  (auto,) = serving.Server(run, batch_size=4, cache=server.cache).serve(
      [serving.Request(1, "s", image_a, question, "auto")])
  assert auto["budget"] == 16 and auto["cached"] and auto["answer"] == answers[image_a][16]
