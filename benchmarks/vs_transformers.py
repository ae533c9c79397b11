r"""Forward pass and greedy generation: ours (JAX) vs transformers' PaliGemma (PyTorch CPU).

    python -m benchmarks.vs_transformers [--text=gemma|gemma2] [--batch=4] [--new_tokens=16] [--repeats=5]

One small PaliGemma configuration, built in transformers (``PaliGemmaForConditionalGeneration``,
float32, the attention implementation transformers picks by default: SDPA for SigLIP and
Gemma-1, eager for Gemma-2, whose soft-cap SDPA cannot do), weights redrawn at random so that
every parameter matters, saved with ``save_pretrained`` to a temporary directory and imported
into ours with ``parcel_jax.weights.hf`` (connector method ``none``: PaliGemma's plain linear
projection of all grid tokens). Default configuration (flags change it):

  image      224 px, patch 14 -> 16 x 16 = 256 image tokens (PaliGemma-224's geometry)
  SigLIP     4 layers, width 256, MLP 1024, 4 heads
  Gemma      4 layers, width 256, MLP 1024, 4 heads of 64 (Gemma-1: 1 KV head, as PaliGemma-1;
             Gemma-2: 2 KV heads, soft-caps 50 / 30, window 4096, as PaliGemma-2), vocab 2048
  batch      4 images, a 32-token text prefix (bidirectional, as PaliGemma's prompt)

Measured, both on the same inputs, after a warm-up call each (ours: jit compile; theirs: first
call), reported separately; then ``--repeats`` interleaved rounds (the order alternates), medians:

  forward    logits over the text prefix. Ours: ``encode_images`` + ``text_logits``, jitted;
             theirs: ``model(...)`` with ``logits_to_keep`` = the prefix length.
  generate   ``--new_tokens`` greedy tokens. Ours: ``evaluation.encode_images`` +
             ``generation.greedy_tokens`` (``decoder.prefill`` + KV-cache ``decode_step``s in a
             jitted while loop, EOS not stopping it); theirs: ``model.generate(do_sample=False,
             max_new_tokens=N)`` with EOS disabled, so both emit exactly N tokens.

Both use the same number of threads: JAX's CPU client sizes its pool to the CPUs this process
may run on, and ``torch.set_num_threads`` is set to that count (printed). Prints the logits'
relative error, whether the generated tokens are equal, and ratio = torch time / our time
(the target is >= 1.5).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import base  # noqa: E402
from parcel_jax import config as config_lib  # noqa
from parcel_jax import evaluation, generation, runs, sharding  # noqa: E402
from parcel_jax.models import vlm  # noqa: E402
from parcel_jax.weights import hf  # noqa: E402

TARGET = 1.5


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--text", choices=("gemma", "gemma2"), default="gemma",
                 help="PaliGemma-1 (Gemma-1 decoder) or PaliGemma-2 (Gemma-2 decoder)")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--patch_size", type=int, default=14)
  p.add_argument("--vision_width", type=int, default=256)
  p.add_argument("--vision_depth", type=int, default=4)
  p.add_argument("--vision_heads", type=int, default=4)
  p.add_argument("--text_width", type=int, default=256)
  p.add_argument("--text_depth", type=int, default=4)
  p.add_argument("--text_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--vocab", type=int, default=2048)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--prefix_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=16)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: the CPUs JAX uses)")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def hf_model(a: argparse.Namespace):
  """The transformers model, weights N(0, 1/fan_in) for matrices and N(0, 0.2^2) for vectors."""
  import torch
  from transformers import (Gemma2Config, GemmaConfig, PaliGemmaConfig,
                            PaliGemmaForConditionalGeneration, SiglipVisionConfig)

  torch.manual_seed(a.seed)
  vision = SiglipVisionConfig(hidden_size=a.vision_width, intermediate_size=4 * a.vision_width,
                              num_hidden_layers=a.vision_depth, num_attention_heads=a.vision_heads,
                              image_size=a.image_size, patch_size=a.patch_size, vision_use_head=False)
  common = dict(vocab_size=a.vocab, hidden_size=a.text_width, intermediate_size=4 * a.text_width,
                num_hidden_layers=a.text_depth, num_attention_heads=a.text_heads, head_dim=a.head_dim)
  if a.text == "gemma2":
    text = Gemma2Config(**common, num_key_value_heads=max(1, a.text_heads // 2), sliding_window=4096,
                        query_pre_attn_scalar=a.head_dim, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0)
  else:
    text = GemmaConfig(**common, num_key_value_heads=1)
  cfg = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=a.text_width,
                        image_token_index=a.vocab - 1, vocab_size=a.vocab)
  model = PaliGemmaForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.normal_(0.0, 0.2)
      elif "embed_tokens" in name:
        p.normal_(0.0, a.text_width ** -0.5)
      else:
        p.normal_(0.0, p[0].numel() ** -0.5)
  model.generation_config.eos_token_id = None  # exactly max_new_tokens tokens, as ours
  model.generation_config.pad_token_id = 0
  return model


def our_run(path: str) -> runs.Run:
  """The checkpoint imported as ours: dimensions from its config.json, connector 'none'."""
  c = base.get_config("none")
  hf.apply_overrides(c.model, hf.config_from_hf(path))
  grid = c.model.vision.image_size // c.model.vision.patch_size
  c.eval.budgets = (grid * grid,)
  model_cfg, spec = config_lib.validate_config(c)
  mesh = sharding.make_mesh((-1, 1, 1))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: vlm.VLM(model_cfg, rngs=nnx.Rngs(0))))
  shardings = sharding.param_shardings(abstract, mesh)
  template = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(abstract), shardings)
  params = hf.load_hf_checkpoint(path, template, model_cfg)
  return runs.Run(c, model_cfg, spec, graphdef, params, mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "bucket"))
def _forward(graphdef, params, images, text, bucket):
  """Logits over a bidirectional text prefix (b, L, V), all grid tokens visible."""
  model = nnx.merge(graphdef, params)
  features = model.encode_images(images)
  budgets = jnp.full((images.shape[0],), bucket.num_slots, jnp.int32)
  mask = jnp.ones(text.shape, bool)
  return model.text_logits(features, text, mask, ~mask, bucket=bucket, budgets=budgets)


def main(argv=None) -> dict:
  a = parse_args(argv)
  import torch
  import transformers

  transformers.utils.logging.disable_progress_bar()
  threads = a.threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  model = hf_model(a)
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    run = our_run(tmp)
  grid = run.grid_size
  budget = grid * grid
  bucket = run.method_space().compact_bucket(budget)

  rng = np.random.RandomState(a.seed + 1)
  images = rng.uniform(-1, 1, (a.batch, a.image_size, a.image_size, 3)).astype(np.float32)
  text = rng.randint(0, a.vocab - 1, (a.batch, a.prefix_len)).astype(np.int32)  # not the image token
  ids = torch.tensor(np.concatenate([np.full((a.batch, budget), a.vocab - 1), text], 1))
  hf_inputs = dict(input_ids=ids, pixel_values=torch.tensor(images).permute(0, 3, 1, 2).contiguous(),
                   token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids))
  j_images, j_text = jnp.asarray(images), jnp.asarray(text)

  def ours_forward():
    return np.asarray(_forward(run.graphdef, run.params, j_images, j_text, bucket))

  def ours_generate():
    features = evaluation.encode_images(run.graphdef, run.params, j_images)
    return generation.greedy_tokens(run, features, text, budget, a.new_tokens, stop_at_eos=False)

  def torch_forward():
    with torch.inference_mode():
      return model(**hf_inputs, logits_to_keep=a.prefix_len).logits.numpy()

  def torch_generate():
    with torch.inference_mode():
      out = model.generate(**hf_inputs, do_sample=False, max_new_tokens=a.new_tokens)
    return out[:, ids.shape[1]:].numpy()

  fns = {"ours_forward": ours_forward, "torch_forward": torch_forward,
         "ours_generate": ours_generate, "torch_generate": torch_generate}
  first, outs = {}, {}
  for name, fn in fns.items():  # warm-up: compile (ours) / first call (theirs)
    start = time.perf_counter()
    outs[name] = fn()
    first[name] = time.perf_counter() - start
  times = {name: [] for name in fns}
  for i in range(a.repeats):  # interleaved; the order alternates between rounds
    for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
      start = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - start)
  med = {name: statistics.median(t) for name, t in times.items()}

  lo, lt = outs["ours_forward"].astype(np.float64), outs["torch_forward"].astype(np.float64)
  rel_err = float(np.linalg.norm(lo - lt) / np.linalg.norm(lt))
  go, gt = outs["ours_generate"], outs["torch_generate"]
  same = go.shape == gt.shape and bool(np.array_equal(go, gt))
  matching = int(np.sum(go == gt)) if go.shape == gt.shape else 0
  v, d = run.model_cfg.vision, run.model_cfg.decoder
  attn = getattr(model.config.text_config, "_attn_implementation", "?")
  vattn = getattr(model.config.vision_config, "_attn_implementation", "?")
  print(f"config: PaliGemma-{'2' if a.text == 'gemma2' else '1'} style, {a.image_size} px / patch "
        f"{a.patch_size} ({budget} image tokens); SigLIP {v.depth}x{v.width} (MLP {v.mlp_dim}); "
        f"{a.text} {d.depth}x{d.width} (MLP {d.mlp_dim}, {d.num_heads} heads / {d.num_kv_heads} KV "
        f"of {d.head_dim}), vocab {d.vocab_size}; batch {a.batch}, prefix {a.prefix_len}, "
        f"{a.new_tokens} new tokens; float32")
  print(f"threads: JAX {len(os.sched_getaffinity(0))} (CPU client, {jax.devices()[0].device_kind}), "
        f"torch {torch.get_num_threads()} (torch {torch.__version__}, attention: SigLIP {vattn}, "
        f"{a.text} {attn}); median of {a.repeats} interleaved rounds")
  print(f"warm-up (excluded): ours compile+run forward {first['ours_forward']:.2f}s, generate "
        f"{first['ours_generate']:.2f}s; torch first call forward {first['torch_forward']:.2f}s, "
        f"generate {first['torch_generate']:.2f}s")
  print(f"agreement: logits rel err {rel_err:.2e}; generated tokens equal: {same} "
        f"({matching}/{go.size})")
  result = {"rel_err": rel_err, "tokens_equal": same}
  print(f"{'':10} {'ours ms':>9} {'torch ms':>9} {'ratio torch/ours':>17}")
  for what in ("forward", "generate"):
    o, t = med[f"ours_{what}"], med[f"torch_{what}"]
    result[what] = t / o
    print(f"{what:10} {1e3 * o:>9.1f} {1e3 * t:>9.1f} {t / o:>16.2f}x")
  print(f"ratio (torch / ours): forward {result['forward']:.2f}x, generate {result['generate']:.2f}x "
        f"(target >= {TARGET}x: forward {'met' if result['forward'] >= TARGET else 'NOT met'}, "
        f"generate {'met' if result['generate'] >= TARGET else 'NOT met'})")
  return result


if __name__ == "__main__":
  main()
