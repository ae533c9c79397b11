r"""Real-size compact prefill on CPU: PaliGemma-2 3B + PARCEL at B = 16 / 64 / 256, and
transformers' PaliGemma-2 3B at its fixed 256 image tokens.

    python -m benchmarks.real_size_prefill [--repeats=3] [--dtype=bfloat16|float32] [--torch_dtype=auto|bfloat16|float32]

(the full-size run needs ~18 GiB of free memory, see "Memory", and takes on the order of 30
minutes on 2 cores; the size flags ``--vision_width --vision_depth --vision_mlp --vision_heads
--connector_heads --connector_mlp --text_width --text_depth --text_mlp --heads --kv_heads
--head_dim --vocab`` shrink the model, their defaults are the real 3B sizes).

This is a CPU measurement of *relative* cost (budget against budget, ours against theirs on the
same cores), not a TPU number: XLA's CPU backend and PyTorch's CPU kernels say nothing about
absolute TPU step times (``python -m parcel_jax.compile`` compiles the same prefill for a TPU
slice).

Ours: the model of ``configs/paligemma2/parcel_224.py`` (SigLIP So400m/14 at 224 px = 16 x 16
patches, PARCEL connector with 12 heads and a 4304-wide MLP, Gemma-2 2B with soft-caps and
alternating local / global layers, scanned layers), RANDOM weights drawn by the model's own
initialisers directly in ``--dtype`` (bfloat16 parameters and compute by default;
``state.init_params`` jits the initialisation, so no float32 copy exists; the 1152 -> 2304
projection keeps float32 parameters as the model defines it). The PRNG is JAX's ``rbg``
implementation: with the default threefry the jitted 3B initialisation needs ~20 GiB of
temporaries on CPU (its counters for the 257152 x 2304 embedding alone are ~9 GiB), with
``rbg`` ~0.6 GiB. Batch 1. For each budget B the program is the serving
"compact prefill" of ``parcel_jax.compile.compile_serving``: ``encode_images`` (ViT) ->
connector at ``spec.compact_bucket(B)`` -> projection -> ``decoder.prefill`` over
[B visual tokens; 129 text tokens] (``flops.IMAGE_TEXT_TOKENS``, the paper's Appendix-C text
prefix, all prompt: bidirectional) returning the last position's logits and the KV cache
(sized for 32 more tokens). Each program is lowered and compiled ahead of time (compile time
printed, excluded), run once as a warm-up (excluded), then ``--repeats`` rounds each running
every budget once (the order alternates between rounds); medians. Printed next to each time
ratio against B = 256: the ratio of ``parcel_jax.flops.cost(config, B)['total']`` (Appendix C:
~963 / 1161 / 1973 GFLOPs at 16 / 64 / 256; it counts the LM head over all 129 text tokens)
and the same model with the head on the last position only, which is what a prefill computes.

Theirs: transformers' ``PaliGemmaForConditionalGeneration`` with a PaliGemma-2 3B config
built offline (``PaliGemmaConfig`` of ``SiglipVisionConfig`` + ``Gemma2Config`` with the same
sizes, soft-caps 50 / 30, window 4096, query_pre_attn_scalar = head_dim), transformers' own
random initialisation, built directly in its dtype (``torch.set_default_dtype``). Input: its
fixed 256 image tokens + the same 129 text tokens, one ``model(...)`` call under
``torch.inference_mode()`` with ``logits_to_keep=1`` and ``use_cache=True`` (last logits and
the KV cache, as ours). Warm-up call, then ``--repeats`` timed calls, median. Printed: torch
time / our time at B = 256 (256 visual tokens on both sides).

``--torch_dtype=auto`` (default) runs transformers in bfloat16 where the CPU has native bf16
matrix units (avx512_bf16 / amx_bf16) and in float32 otherwise: on AVX2-only CPUs PyTorch's
bf16 matmuls are several times slower than its float32 ones (measured ~3x here), which would
turn the comparison into one of kernel coverage. ``--torch_dtype=bfloat16`` forces it.

Threads: JAX's CPU client sizes its pool to the CPUs this process may run on;
``torch.set_num_threads`` is set to that count (printed).

Memory: the two models are never resident together. Ours is built, timed and freed
(``jax.clear_caches``, gc, ``malloc_trim``), then theirs is built and timed. Parameters: ours
3.05 B = 5.7 GiB in bf16, theirs 3.03 B = 11.3 GiB in float32 (5.6 GiB in bf16); the batch-1
activations are small. But on this AVX2 CPU XLA's CPU backend computes the bf16 matmuls in
float32: the compiled program converts the bf16 weights and hoists those converts out of the
layer scan (visible in its HLO), so the bf16 prefill holds a float32 copy of every weight as temporaries (the "XLA temp" column,
~11.4 GiB at full size): ours peaks at ~17 GiB + runtime, the process at ~18 GiB.
``--dtype=float32`` needs ~12 GiB (11.4 GiB parameters, ~0.6 GiB temporaries). Printed: the
process's resident set after each phase and its peak.

Nothing is downloaded (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``). The last lines are
machine-parsable:

    B=16 vs B=256: time ratio X (cost model Y; head on the last token only Z)
    B=64 vs B=256: time ratio X (cost model Y; head on the last token only Z)
    ratio (torch / ours) at 256 image tokens: Rx
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import os
import resource
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs.paligemma2 import recipe  # noqa: E402
from parcel_jax import config as config_lib  # noqa: E402
from parcel_jax import flops as flops_lib  # noqa: E402
from parcel_jax import generation  # noqa: E402
from parcel_jax import sharding  # noqa: E402
from parcel_jax import state as state_lib  # noqa: E402
from parcel_jax.models import vlm  # noqa: E402

BUDGETS = (16, 64, 256)        # the last is the reference; 256 = transformers' fixed image tokens
IMAGE_SIZE, PATCH_SIZE = 224, 14
NEW_TOKENS = 32                # KV-cache room after the prompt, as compile.SERVE_NEW_TOKENS
GB = 1024 ** 3


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--vision_width", type=int, default=1152)
  p.add_argument("--vision_depth", type=int, default=27)
  p.add_argument("--vision_mlp", type=int, default=4304)
  p.add_argument("--vision_heads", type=int, default=16)
  p.add_argument("--connector_heads", type=int, default=12)
  p.add_argument("--connector_mlp", type=int, default=4304)
  p.add_argument("--text_width", type=int, default=2304)
  p.add_argument("--text_depth", type=int, default=26, help="even (local / global layer pairs)")
  p.add_argument("--text_mlp", type=int, default=9216)
  p.add_argument("--heads", type=int, default=8, help="decoder query heads")
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=256)
  p.add_argument("--vocab", type=int, default=257_152)
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="our parameters and compute")
  p.add_argument("--torch_dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                 help="auto: bfloat16 on CPUs with native bf16 matmul (avx512_bf16 / amx_bf16), else float32")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: the CPUs JAX uses)")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def release_memory() -> None:
  """Returns freed heap pages to the OS (glibc), so the next phase's RSS starts low."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def rss_gb() -> tuple[float, float]:
  """(current, peak) resident set of this process in GiB."""
  current = 0.0
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        current = int(line.split()[1]) * 1024 / GB
  return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def our_config(a: argparse.Namespace):
  """configs/paligemma2/parcel_224.py with the size flags applied."""
  c = recipe.make_config("parcel", image_size=IMAGE_SIZE)
  c.model.dtype = a.dtype
  v, con, d = c.model.vision, c.model.connector, c.model.decoder
  v.image_size, v.patch_size = IMAGE_SIZE, PATCH_SIZE
  v.width, v.depth, v.mlp_dim, v.num_heads = a.vision_width, a.vision_depth, a.vision_mlp, a.vision_heads
  con.num_heads, con.mlp_dim = a.connector_heads, a.connector_mlp
  d.vocab_size, d.width, d.depth, d.mlp_dim = a.vocab, a.text_width, a.text_depth, a.text_mlp
  d.num_heads, d.num_kv_heads, d.head_dim = a.heads, a.kv_heads, a.head_dim
  d.query_scale = a.head_dim ** -0.5  # Gemma-2 2B: query_pre_attn_scalar = head_dim
  c.eval.budgets = BUDGETS
  return c


def with_param_dtype(model_cfg: vlm.ModelConfig, dtype) -> vlm.ModelConfig:
  """The config sections carry no param_dtype: set it on the module dataclasses."""
  return dataclasses.replace(
      model_cfg, vision=dataclasses.replace(model_cfg.vision, param_dtype=dtype),
      connector=dataclasses.replace(model_cfg.connector, param_dtype=dtype),
      decoder=dataclasses.replace(model_cfg.decoder, param_dtype=dtype))


def make_prefill(graphdef, bucket, cache_size):
  """compile.compile_serving's prefill (``generation.prefill``): last logits and the KV cache."""
  def prefill(params, images, text, text_mask, budget_vec):
    model = nnx.merge(graphdef, params)
    return generation.prefill(model, model.encode_images(images), text, text_mask, budget_vec,
                              bucket=bucket, cache_size=cache_size)
  return prefill


def run_ours(a, config, images, text) -> dict:
  model_cfg, spec = config_lib.validate_config(config, check_data=False)
  model_cfg = with_param_dtype(model_cfg, vlm.DTYPES[a.dtype])
  mesh = sharding.make_mesh(config.mesh.shape)
  rules = sharding.rules_from_config(config.mesh)
  start = time.perf_counter()
  graphdef, params = state_lib.init_params(model_cfg, mesh, config.seed, rules)
  jax.block_until_ready(params)
  init_s = time.perf_counter() - start
  leaves = jax.tree.leaves(params)
  n_params, n_bytes = sum(x.size for x in leaves), sum(x.nbytes for x in leaves)
  n_t = text.shape[1]
  j_images, j_text = jnp.asarray(images), jnp.asarray(text)
  j_mask = jnp.ones(text.shape, bool)
  rows = {}
  for b in BUDGETS:
    bucket = spec.compact_bucket(b)
    fn = make_prefill(graphdef, bucket, bucket.num_slots + n_t + NEW_TOKENS)
    budget_vec = jnp.full((1,), b, jnp.int32)
    start = time.perf_counter()
    with sharding.activation_sharding(mesh, rules):
      compiled = jax.jit(fn).lower(params, j_images, j_text, j_mask, budget_vec).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    args = (params, j_images, j_text, j_mask, budget_vec)
    start = time.perf_counter()
    logits, _ = jax.block_until_ready(compiled(*args))  # warm-up
    rows[b] = dict(bucket=bucket, compiled=compiled, args=args, compile_s=compile_s,
                   warm_s=time.perf_counter() - start, finite=bool(np.isfinite(np.asarray(logits)).all()),
                   temp_gb=(mem.temp_size_in_bytes / GB) if mem is not None else float("nan"), times=[])
  for i in range(a.repeats):  # every budget once per round; the order alternates
    for b in (BUDGETS if i % 2 == 0 else BUDGETS[::-1]):
      r = rows[b]
      start = time.perf_counter()
      jax.block_until_ready(r["compiled"](*r["args"]))
      r["times"].append(time.perf_counter() - start)
  out = {"params": n_params, "bytes": n_bytes, "init_s": init_s, "rss": rss_gb(), "rows": {}}
  for b, r in rows.items():
    out["rows"][b] = {k: r[k] for k in ("bucket", "compile_s", "warm_s", "finite", "temp_gb")}
    out["rows"][b]["time"] = statistics.median(r["times"])
  del rows, params, leaves, args, compiled, logits
  jax.clear_caches()
  release_memory()
  out["rss_freed"] = rss_gb()
  return out


def torch_dtype_choice(choice: str) -> tuple[str, str]:
  """(dtype name, why)."""
  if choice != "auto":
    return choice, "--torch_dtype"
  try:
    with open("/proc/cpuinfo") as f:
      flags = set(next((l for l in f if l.startswith("flags")), "").split())
  except OSError:
    flags = set()
  if flags & {"avx512_bf16", "amx_bf16"}:
    return "bfloat16", "auto: the CPU has native bf16 matmul"
  return "float32", "auto: no avx512_bf16 / amx_bf16 on this CPU, torch's bf16 matmul is slower there"


def their_model(a, dtype):
  """transformers' PaliGemma-2 with our sizes, its own random init, built directly in ``dtype``."""
  import torch
  from transformers import Gemma2Config, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

  torch.manual_seed(a.seed)
  vision = SiglipVisionConfig(hidden_size=a.vision_width, intermediate_size=a.vision_mlp,
                              num_hidden_layers=a.vision_depth, num_attention_heads=a.vision_heads,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False)
  text = Gemma2Config(vocab_size=a.vocab, hidden_size=a.text_width, intermediate_size=a.text_mlp,
                      num_hidden_layers=a.text_depth, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads, head_dim=a.head_dim, sliding_window=4096,
                      query_pre_attn_scalar=a.head_dim, attn_logit_softcapping=50.0,
                      final_logit_softcapping=30.0)
  cfg = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=a.text_width,
                        image_token_index=a.vocab - 1, vocab_size=a.vocab)
  previous = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    model = PaliGemmaForConditionalGeneration(cfg).eval()
  finally:
    torch.set_default_dtype(previous)
  return model


def run_theirs(a, dtype_name, images, text, threads) -> dict:
  import torch

  torch.set_num_threads(threads)
  dtype = getattr(torch, dtype_name)
  start = time.perf_counter()
  model = their_model(a, dtype)
  init_s = time.perf_counter() - start
  n_params = sum(p.numel() for p in model.parameters())  # tied embedding / LM head counted once
  n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
  n_image = (IMAGE_SIZE // PATCH_SIZE) ** 2
  ids = torch.tensor(np.concatenate([np.full((1, n_image), a.vocab - 1), text], 1))
  inputs = dict(input_ids=ids, pixel_values=torch.tensor(images).permute(0, 3, 1, 2).contiguous().to(dtype),
                token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids))

  def forward():
    with torch.inference_mode():
      return model(**inputs, logits_to_keep=1, use_cache=True).logits

  start = time.perf_counter()
  logits = forward()  # warm-up
  warm_s = time.perf_counter() - start
  times = []
  for _ in range(a.repeats):
    start = time.perf_counter()
    forward()
    times.append(time.perf_counter() - start)
  out = {"params": n_params, "bytes": n_bytes, "init_s": init_s, "warm_s": warm_s,
         "time": statistics.median(times), "finite": bool(torch.isfinite(logits.float()).all()),
         "logits_shape": tuple(logits.shape), "rss": rss_gb(), "torch": torch.__version__,
         "threads": torch.get_num_threads(),
         "attn": (getattr(model.config.vision_config, "_attn_implementation", "?"),
                  getattr(model.config.text_config, "_attn_implementation", "?"))}
  del model, logits
  release_memory()
  return out


def main(argv=None) -> dict:
  a = parse_args(argv)
  # The counter-based default (threefry) materialises ~4 words per drawn value: ~20 GiB of
  # temporaries for the 3B init on CPU. rbg (XLA's RngBitGenerator) needs next to none.
  jax.config.update("jax_default_prng_impl", "rbg")
  config = our_config(a)
  jax_threads = len(os.sched_getaffinity(0))
  threads = a.threads or jax_threads
  rng = np.random.RandomState(a.seed + 1)
  n_t = flops_lib.IMAGE_TEXT_TOKENS
  images = rng.uniform(-1, 1, (1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  text = rng.randint(0, a.vocab - 1, (1, n_t)).astype(np.int32)  # never the image token

  cost = {b: flops_lib.cost(config, b) for b in BUDGETS}
  # A prefill's head computes the last position's logits, not all N_t of the cost model.
  as_run = {b: c["total"] - c["head"] + c["head"] / n_t for b, c in cost.items()}

  ours = run_ours(a, config, images, text)
  torch_dtype, why = torch_dtype_choice(a.torch_dtype)
  import transformers
  transformers.utils.logging.disable_progress_bar()
  theirs = run_theirs(a, torch_dtype, images, text, threads)

  ref = BUDGETS[-1]
  R = ours["rows"][ref]
  print(f"config: configs/paligemma2/parcel_224.py sizes: SigLIP {a.vision_depth}x{a.vision_width} "
        f"(MLP {a.vision_mlp}, {a.vision_heads} heads) at {IMAGE_SIZE} px / patch {PATCH_SIZE}; PARCEL "
        f"connector {a.connector_heads} heads, MLP {a.connector_mlp}; Gemma-2 {a.text_depth}x{a.text_width} "
        f"(MLP {a.text_mlp}, {a.heads} heads / {a.kv_heads} KV of {a.head_dim}), vocab {a.vocab}; batch 1, "
        f"{n_t} text tokens; random weights")
  print(f"threads: JAX {jax_threads} (CPU client, {jax.devices()[0].device_kind}), torch {theirs['threads']} "
        f"(torch {theirs['torch']}, transformers {transformers.__version__}, attention: SigLIP "
        f"{theirs['attn'][0]}, Gemma-2 {theirs['attn'][1]}); medians of {a.repeats} runs")
  print(f"dtypes: ours {a.dtype} parameters and compute; theirs torch {torch_dtype} ({why})")
  print(f"params: ours {ours['params'] / 1e6:.1f} M ({ours['bytes'] / GB:.3f} GiB, init {ours['init_s']:.1f}s); "
        f"theirs {theirs['params'] / 1e6:.1f} M ({theirs['bytes'] / GB:.3f} GiB, init {theirs['init_s']:.1f}s)")
  print(f"memory (RSS, GiB): after ours {ours['rss'][0]:.2f} (peak {ours['rss'][1]:.2f}), ours freed "
        f"{ours['rss_freed'][0]:.2f}; after theirs {theirs['rss'][0]:.2f} (process peak {theirs['rss'][1]:.2f})")
  print(f"{'B':>5} {'bucket':>14} {'compile s':>9} {'warm-up s':>9} {'XLA temp GiB':>12} {'ms':>10} "
        f"{'time':>6} {'GFLOPs':>8} {'model':>6} {'as run':>6} finite")
  for b in BUDGETS:
    r = ours["rows"][b]
    print(f"{b:>5} {str(r['bucket']):>14} {r['compile_s']:>9.1f} {r['warm_s']:>9.1f} {r['temp_gb']:>12.3f} "
          f"{1e3 * r['time']:>10.1f} {r['time'] / R['time']:>6.3f} {cost[b]['total'] / 1e9:>8.1f} "
          f"{cost[b]['total'] / cost[ref]['total']:>6.3f} {as_run[b] / as_run[ref]:>6.3f} {r['finite']}")
  print(f"theirs: 256 image tokens + {n_t} text, warm-up {theirs['warm_s']:.1f}s, {1e3 * theirs['time']:.1f} ms "
        f"(logits {theirs['logits_shape']}, finite {theirs['finite']}); cost model of its prefill "
        f"(no connector, head on the last token) {(as_run[ref] - cost[ref]['connector']) / 1e9:.1f} GFLOPs")
  result = {"ours": {b: r["time"] for b, r in ours["rows"].items()}, "theirs": theirs["time"]}
  for b in BUDGETS[:-1]:
    r = ours["rows"][b]
    print(f"B={b} vs B={ref}: time ratio {r['time'] / R['time']:.3f} (cost model "
          f"{cost[b]['total'] / cost[ref]['total']:.3f}; head on the last token only {as_run[b] / as_run[ref]:.3f})")
  result["ratio"] = theirs["time"] / R["time"]
  print(f"ratio (torch / ours) at 256 image tokens: {result['ratio']:.2f}x")
  return result


if __name__ == "__main__":
  main()
