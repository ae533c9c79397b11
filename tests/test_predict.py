"""Prediction: KV-cache greedy decoding equals recomputing the whole sequence; the CLI."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs.paligemma2 import none_224, parcel_224
from parcel_jax import config as config_lib
from parcel_jax import evaluation, generation, runs, sharding
from parcel_jax import state as state_lib
from parcel_jax.data import synthetic
from parcel_jax.data import tokenizer as tokenizer_lib
from tests.conftest import run_cli, tiny_config

NEW_TOKENS = 6
BUDGETS = (16, 24, 100)  # pure pooling; 4x4 anchors + 8 queries; 8x8 anchors + 36 queries
QUESTIONS = ("where is the red square", "where is the blue square")  # one length: a batch


def _inputs(run):
  images = np.stack([synthetic.generate("eval", i).image for i in range(len(QUESTIONS))])
  prefix = np.stack([generation.prompt_tokens(q) for q in QUESTIONS])
  return evaluation.encode_images(run.graphdef, run.params, jnp.asarray(images)), prefix


@pytest.fixture(scope="module")
def random_run():
  """A random PARCEL model with Gemma-2 local/global layers: the window (16) is shorter than
  every sequence (>= 16 visual + prompt + answer tokens), so the cache's positions matter.

  Parameters are N(0, 0.5) from fresh seeds (numpy: nothing to compile) with a small token
  embedding (0.05); a large one dominates the residual stream and, with tied logits, the
  model repeats its last token. Draws whose greedy answers barely vary are redrawn: a
  constant answer would make the comparison prove little.
  """
  config = tiny_config()
  config.model.decoder.depth = 2
  config.model.decoder.local_global = True
  config.model.decoder.sliding_window = 16
  model_cfg, spec = config_lib.validate_config(config)
  mesh = sharding.make_mesh((-1, 1, 1))
  graphdef, target = state_lib.abstract_params(model_cfg, mesh)
  rng = np.random.default_rng()
  normal = lambda x, std: jax.device_put(std * rng.standard_normal(x.shape, np.float32), x.sharding)
  run = runs.Run(config, model_cfg, spec, graphdef, None, mesh)
  for _ in range(10):
    run.params = jax.tree.map(lambda x: normal(x, 0.5), target)
    run.params["decoder"]["embedding"] = normal(target["decoder"]["embedding"], 0.05)
    features, prefix = _inputs(run)
    if all(len(np.unique(generation.greedy_tokens(run, features, prefix, b, NEW_TOKENS, stop_at_eos=False))) > 2
           for b in BUDGETS):
      return run
  pytest.fail("no random draw gave varied greedy answers")


@functools.partial(jax.jit, static_argnames=("graphdef", "bucket"))
def _next_token(graphdef, params, features, text, text_mask, ar_mask, budgets, last, *, bucket):
  """Greedy token after position ``last`` (b,) of a full forward pass (the training path)."""
  logits = nnx.merge(graphdef, params).text_logits(features, text, text_mask, ar_mask,
                                                   bucket=bucket, budgets=budgets)
  return jnp.argmax(jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], -1)


def recompute_tokens(run, features, prefix, budget, num_tokens):
  """Greedy decoding by re-running [visual; prefix; answer so far] every step. The text is
  padded to one length (padding masked out), so every step shares one compiled program."""
  b, length = prefix.shape
  total = length + num_tokens
  text = np.zeros((b, total), np.int32)
  text[:, :length] = prefix
  ar = np.arange(total)[None].repeat(b, 0) >= length
  bucket = run.method_space().compact_bucket(budget)
  out = []
  for t in range(num_tokens):
    mask = np.arange(total)[None].repeat(b, 0) < length + t
    token = _next_token(run.graphdef, run.params, features, jnp.asarray(text), jnp.asarray(mask),
                        jnp.asarray(ar), jnp.full((b,), budget, jnp.int32),
                        jnp.full((b,), length + t - 1, jnp.int32), bucket=bucket)
    text[:, length + t] = np.asarray(token)
    out.append(np.asarray(token))
  return np.stack(out, 1)


@pytest.mark.parametrize("budget", BUDGETS)
def test_kv_cache_equals_recompute(random_run, budget):
  features, prefix = _inputs(random_run)
  cached = generation.greedy_tokens(random_run, features, prefix, budget, NEW_TOKENS, stop_at_eos=False)
  assert cached.shape == (2, NEW_TOKENS)
  np.testing.assert_array_equal(cached, recompute_tokens(random_run, features, prefix, budget, NEW_TOKENS))


def scanned_recipe_run(config, budget, *, seed=0, attempts=10):
  """A random model of a PaliGemma-2 recipe config (configs/paligemma2) at tiny widths.

  What the recipe sets stays: scanned decoder layers with full rematerialisation,
  Gemma-2 (local, global) pairs (post-norms, soft-caps, GQA), bfloat16 compute with float32
  parameters, the image size (so the 16 x 16 or 32 x 32 grid) and the connector method. The
  window (16) is shorter than every sequence, so the cache's positions matter on local layers.
  Parameters are drawn as in ``random_run``, from fixed seeds (deterministic), and redrawn
  until the greedy answer at ``budget`` varies. Returns the run, random ViT features and the
  prompts.
  """
  with config.unlocked():
    config.data.name = "synthetic"  # no tokenizer file; the vocabulary is the synthetic one's
    config.data.max_text_len = 16
    v = config.model.vision
    v.width, v.depth, v.mlp_dim, v.num_heads = 32, 2, 64, 2
    config.model.connector.num_heads, config.model.connector.mlp_dim = 2, 64
    d = config.model.decoder
    d.vocab_size, d.width, d.depth, d.mlp_dim = 0, 32, 4, 64
    d.num_heads, d.num_kv_heads, d.head_dim = 2, 1, 16
    d.sliding_window, d.query_scale = 16, 0.0
    config.mesh.shape = (-1, 1, 1)
  model_cfg, spec = config_lib.validate_config(config)
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  graphdef, target = state_lib.abstract_params(model_cfg, mesh)
  run = runs.Run(config, model_cfg, spec, graphdef, None, mesh)
  rng = np.random.default_rng(seed)
  normal = lambda x, std: jax.device_put(std * rng.standard_normal(x.shape, np.float32), x.sharding)
  # Random ViT features (b, g, g, width) stand in for encoded images (the ViT is not what is
  # tested, and compiling it would double the test's time).
  grid = model_cfg.vision.image_size // model_cfg.vision.patch_size
  features = jnp.asarray(rng.standard_normal((len(QUESTIONS), grid, grid, model_cfg.vision.width),
                                             np.float32))
  prefix = np.stack([generation.prompt_tokens(q) for q in QUESTIONS])
  for _ in range(attempts):
    run.params = jax.tree.map(lambda x: normal(x, 0.5), target)
    run.params["decoder"]["embedding"] = normal(target["decoder"]["embedding"], 0.05)
    if len(np.unique(generation.greedy_tokens(run, features, prefix, budget, NEW_TOKENS,
                                           stop_at_eos=False))) > 2:
      return run, features, prefix
  pytest.fail("no random draw gave varied greedy answers")


@pytest.mark.parametrize("recipe,budget", [(parcel_224, 24), (none_224, 256)],
                         ids=["parcel_224", "none_224"])
def test_kv_cache_equals_recompute_scanned_recipe(recipe, budget):
  """The PaliGemma-2 recipes scan their decoder layers: ``_decode``'s while loop must run the
  scanned stack (nnx.scan inside jax.lax.while_loop) and agree with the full forward pass."""
  run, features, prefix = scanned_recipe_run(recipe.get_config(), budget)
  d = run.model_cfg.decoder  # the recipe's, shrunk
  assert d.scan and d.remat == "full" and d.local_global and d.post_norms and d.dtype == jnp.bfloat16
  cached = generation.greedy_tokens(run, features, prefix, budget, NEW_TOKENS, stop_at_eos=False)
  assert cached.shape == (2, NEW_TOKENS)
  np.testing.assert_array_equal(cached, recompute_tokens(run, features, prefix, budget, NEW_TOKENS))


def test_prompt_layout():
  tok = generation.prompt_tokens("where is the red square")
  assert tok[0] == 1 and tok[-1] == 3 and len(tok) == 7        # [BOS, 5 words, SEP]


def test_prompt_tokens_name_unknown_words(caplog):
  """Words outside the word list are UNK in the prompt and named, in order, in one warning;
  a question of known words logs nothing."""
  rng = np.random.default_rng()
  tok = tokenizer_lib.synthetic_tokenizer()
  known = [str(w) for w in rng.choice(synthetic.vocabulary(), 6)]
  unknown = [f"zz{k}" for k in rng.choice(1000, 3, replace=False)]
  words = known + unknown
  rng.shuffle(words)
  question = " ".join(words)
  with caplog.at_level("WARNING"):
    ids = generation.prompt_tokens(question)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [tok.bos_id, *tok.encode(question), tok.sep_id])
  assert [w for w, i in zip(words, ids[1:-1]) if i == tok.unk_id] == [w for w in words if w in unknown]
  warned = [r.getMessage() for r in caplog.records if "outside the tokenizer's vocabulary" in r.getMessage()]
  assert warned == [f"words outside the tokenizer's vocabulary (encoded as <unk>): "
                    f"{[w for w in words if w in unknown]}"]
  caplog.clear()
  with caplog.at_level("WARNING"):
    generation.prompt_tokens(" ".join(known))
  assert not [r for r in caplog.records if "outside the tokenizer's vocabulary" in r.getMessage()]


def test_load_image_resizes_to_model_range(tmp_path):
  rgba = np.zeros((32, 48, 4), np.uint8)
  rgba[..., 0] = 255
  rgba[..., 3] = 255
  Image.fromarray(rgba, "RGBA").save(tmp_path / "red.png")
  image = generation.load_image(str(tmp_path / "red.png"), 64)
  assert image.shape == (64, 64, 3) and image.dtype == np.float32
  np.testing.assert_allclose(image[..., 0], 1.0)
  np.testing.assert_allclose(image[..., 1:], -1.0)
  with pytest.raises(FileNotFoundError, match="missing.png"):
    generation.load_image(str(tmp_path / "missing.png"), 64)


def test_generate_rejects_budgets_outside_the_method(random_run):
  with pytest.raises(ValueError, match="allowed: even integers 16..256"):
    generation.generate(random_run, np.zeros((64, 64, 3), np.float32), "what pattern is shown", [24, 17])


def test_cli(tiny_workdir, tmp_path):
  example = synthetic.generate("eval", 3)
  pixels = np.round((example.image + 1) * 127.5).clip(0, 255).astype(np.uint8)
  Image.fromarray(pixels).save(tmp_path / "example.png")
  proc = run_cli("parcel_jax.predict", f"--workdir={tiny_workdir}", f"--image={tmp_path / 'example.png'}",
                 f"--question={example.question}", "--budget=16,24")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert [line.split(":")[0] for line in lines] == ["budget 16", "budget 24"]
  # An answer is tokenizer words (possibly none, if EOS comes first).
  vocab = set(synthetic.vocabulary()) | {"<sep>", "<unk>"}
  for line in lines:
    assert set(line.split(":", 1)[1].split()) <= vocab


def test_cli_batch_requests(tiny_workdir, tmp_path):
  """--requests: mixed budgets and a repeated image in one file; a bad line is an error record
  naming it, every other request is answered, in order."""
  for i in (3, 4):
    example = synthetic.generate("eval", i)
    pixels = np.round((example.image + 1) * 127.5).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / f"e{i}.png")
  q = synthetic.generate("eval", 3).question
  lines = [{"id": "a", "image": "e3.png", "question": q, "budget": 16},
           {"id": "b", "image": "e3.png", "question": q, "budget": 24},
           {"id": "c", "image": "e4.png", "question": "how many red squares", "budget": "auto"},
           {"id": "d", "image": "e4.png", "question": q, "budget": 25}]
  (tmp_path / "req.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  out = tmp_path / "answers.jsonl"
  proc = run_cli("parcel_jax.predict", f"--workdir={tiny_workdir}", f"--requests={tmp_path / 'req.jsonl'}",
                 f"--out={out}", "--batch_size=4")
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in out.read_text().splitlines()]
  assert [r["id"] for r in records] == ["a", "b", "c", "d"]
  assert [r.get("budget") for r in records[:3]] == [16, 24, 16]       # auto: the smallest trained budget
  assert [r["cached"] for r in records[:3]] == [False, True, False]
  assert "budget 25 is not valid" in records[3]["error"] and records[3]["line"] == 4
  assert "skipped request line 4 (id 'd')" in proc.stdout
  assert re.search(r"4 requests \(3 answered, 1 errors\) .* requests/s, .* visual tokens/s; "
                   r"image cache 1 hits, 2 encoded", proc.stdout), proc.stdout
  vocab = set(synthetic.vocabulary()) | {"<sep>", "<unk>"}
  assert all(set(r["answer"].split()) <= vocab for r in records[:3])


def test_kv_cache_equals_recompute_for_frames(random_run):
  """Frames (b, T, S, S, 3): the cache holds T*slots visual tokens, and greedy decoding from it
  equals re-running the training forward pass over [frame 0; ...; frame T-1; text]."""
  rng = np.random.default_rng()
  clips = [synthetic.generate("eval", int(i), families=("motion",)).image for i in rng.integers(0, 10**6, 2)]
  features = evaluation.encode_images(random_run.graphdef, random_run.params, jnp.asarray(np.stack(clips)[:, :3]))
  prefix = np.stack([generation.prompt_tokens(q) for q in QUESTIONS])
  for budget in (16, 100):
    cached = generation.greedy_tokens(random_run, features, prefix, budget, NEW_TOKENS, stop_at_eos=False)
    np.testing.assert_array_equal(cached, recompute_tokens(random_run, features, prefix, budget, NEW_TOKENS))


def test_cli_frames(tiny_workdir, tmp_path):
  """--image a,b and --image a --image b are the same two frames, answered at every budget."""
  clip = synthetic.generate("eval", 5, families=("appearance",)).image
  files = []
  for t, frame in enumerate(clip[:2]):
    files.append(str(tmp_path / f"frame{t}.png"))
    Image.fromarray(np.round((frame + 1) * 127.5).clip(0, 255).astype(np.uint8)).save(files[-1])
  outputs = []
  for image_flags in ([f"--image={','.join(files)}"], [f"--image={p}" for p in files]):
    proc = run_cli("parcel_jax.predict", f"--workdir={tiny_workdir}", *image_flags,
                   "--question=where is the red square", "--budget=16,24")
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs.append(proc.stdout)
  assert outputs[0] == outputs[1]
  assert [line.split(":")[0] for line in outputs[0].strip().splitlines()] == ["budget 16", "budget 24"]
