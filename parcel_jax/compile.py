r"""Compile a config's training and serving programs for a TPU slice, on any machine.

    python -m parcel_jax.compile --config=configs/paligemma2/parcel_224.py --topology=v4-512 \
        [--config.optim.grad_accum_steps=4] [--programs=train,prefill,decode] [--frames=16] [--json]

builds the real train step of the config (``train_step.make_train_step``, the sharding rules,
scan / remat / dtype switches, every budget bucket) and the serving programs (compact prefill
at each of ``--serve_budgets``, one KV-cache decode step) from abstract shapes only (no
parameter is allocated), lowers and compiles them for the named topology through libtpu,
and prints per program: per-device bytes of arguments, outputs, temporaries and generated
code against the chip's HBM, XLA's FLOPs next to the Appendix-C cost model's, and a
step-time *estimate* at ``--mfu`` of the chip's peak bf16 FLOP/s. Nothing runs on a TPU:
this proves that a program compiles and fits, not how fast it is.

``--frames=T`` (default: the config's ``data.max_frames``, 1 = one image): every program
takes T frames per example, as the input pipeline batches them for ``data.max_frames`` = T > 1:
train batches carry ``image`` (b, T, S, S, 3) and ``frame_mask`` (b, T), prefill takes
(b, T, S, S, 3) frames with the video text prefix (``flops.text_tokens``: 65 tokens), and the
decode cache holds T x slots visual tokens. The model FLOPs are then ``flops.cost(..., frames=T)``'s
(each frame through the ViT and connector, T x B visual tokens through the decoder), as in
``python -m parcel_jax.flops --frames=T``; T = 1 keeps the single-image (b, S, S, 3) programs.

``--fit`` (train programs): if the largest bucket does not fit, doubles
``optim.grad_accum_steps`` (same global batch, smaller micro-batches) until it does, and
reports the first setting that fits.

Topology names: ``parcel_jax.topologies`` (Cloud TPU accelerator types: v4-512 = 256 v4 chips).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from parcel_jax import config as config_lib
from parcel_jax import flops as flops_lib
from parcel_jax import generation
from parcel_jax import sharding
from parcel_jax import state as state_lib
from parcel_jax import topologies
from parcel_jax import train_step as train_step_lib

PROGRAMS = ("train", "prefill", "decode")
# Serving: answer tokens the decode cache is sized for after the prompt.
SERVE_NEW_TOKENS = 32


@dataclasses.dataclass
class Report:
  """One compiled program. Bytes are per device; FLOPs per device unless named ``total``."""
  program: str                 # train | prefill | decode
  bucket: str                  # visual-token layout (``budgets.Bucket``), or B=... for serving
  batch: int                   # global batch of the program (micro-batch x accumulation for train)
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  hbm_bytes: int
  xla_flops: float             # per device, per call (XLA counts a scanned loop's body once)
  model_flops_total: float     # Appendix-C cost model, whole slice, per call
  step_time_estimate_s: float  # executed FLOPs per chip / (mfu x peak bf16 FLOP/s)
  settings: dict = dataclasses.field(default_factory=dict)
  # The data inputs as compiled, name -> shape (train: the batch's fields and ``budgets``).
  input_shapes: dict = dataclasses.field(default_factory=dict)
  error: str = ""              # set when XLA refused the program (out of HBM): its message

  @property
  def peak_bytes(self) -> int:
    """What must be resident at once: inputs and outputs (donated ones counted once),
    temporaries and the program."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes

  @property
  def fits(self) -> bool:
    return not self.error and self.peak_bytes <= self.hbm_bytes

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes, "fits": self.fits}


_OOM = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\).*?available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _compile(lowered):
  """``lowered.compile()``, or the out-of-HBM error's message (any other error is raised)."""
  try:
    return lowered.compile(), ""
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return None, str(e).splitlines()[0]


def _input_shapes(lowered, names_and_positions) -> dict:
  """The data inputs of a lowered program, {name: shape}: ``names_and_positions`` maps a name to
  its positional argument (a dict argument, the train batch, contributes each of its fields)."""
  args = lowered.args_info[0]
  out = {}
  for name, position in names_and_positions.items():
    arg = args[position]
    if isinstance(arg, dict):
      out.update({k: list(v.shape) for k, v in sorted(arg.items())})
    else:
      out[name] = list(arg.shape)
  return out


def _refused(program, bucket, batch, message, topology, model_flops, settings,
             input_shapes=None) -> Report:
  """A program XLA would not compile for lack of HBM: the temporaries it asked for."""
  m = _OOM.search(message)
  temp = int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0
  return Report(program=program, bucket=str(bucket), batch=batch, argument_bytes=0, output_bytes=0,
                alias_bytes=0, temp_bytes=temp, code_bytes=0, hbm_bytes=topology.chip.hbm_bytes,
                xla_flops=0.0, model_flops_total=float(model_flops), step_time_estimate_s=float("nan"),
                settings=dict(settings), input_shapes=dict(input_shapes or {}), error=message)


def _report(program, bucket, batch, compiled, topology, num_devices, model_flops, mfu, settings,
            recompute: float = 1.0, input_shapes=None):
  """``recompute``: executed / modelled FLOPs beyond the model (full remat re-runs the forward:
  4/3 of forward + backward). The step-time estimate uses the cost model, not XLA's count,
  because XLA's cost analysis counts the body of a scanned layer stack once, not per layer."""
  mem = compiled.memory_analysis()
  if mem is None:
    raise RuntimeError(f"XLA returned no memory analysis for the {program} program")
  xla = flops_lib.compiled_flops(compiled)
  executed_per_chip = model_flops * recompute / num_devices
  return Report(program=program, bucket=str(bucket), batch=batch,
                argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
                code_bytes=int(mem.generated_code_size_in_bytes), hbm_bytes=topology.chip.hbm_bytes,
                xla_flops=xla, model_flops_total=float(model_flops),
                step_time_estimate_s=executed_per_chip / (mfu * topology.chip.peak_bf16_flops),
                settings=dict(settings), input_shapes=dict(input_shapes or {}))


def _sds(shape, dtype, mesh, names, rules):
  """A serving input's ShapeDtypeStruct, split by its logical ``names`` like an activation."""
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
      mesh, sharding.logical_to_spec(names, shape, mesh, rules)))


def _target(config, topology):
  """What every program of ``config`` on ``topology`` shares: (model_cfg, spec, mesh, rules)."""
  model_cfg, spec = config_lib.validate_config(config, check_data=False)
  mesh = sharding.make_mesh(config.mesh.shape, topologies.devices(topology))
  return model_cfg, spec, mesh, sharding.rules_from_config(config.mesh)


def frames_of(config, frames: int | None = None) -> int:
  """T, the frames per example the programs take: ``frames`` (``--frames``), or the config's
  ``data.max_frames`` (1 when it has none). ValueError naming the field below 1."""
  name, value = ("--frames", frames) if frames else ("data.max_frames",
                                                     config.get("data", {}).get("max_frames", 1))
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  return value


def _image_shape(b: int, frames: int, size: int) -> tuple[int, ...]:
  """One image per example (b, S, S, 3), or frames (b, T, S, S, 3): the pipeline's layout."""
  return (b, size, size, 3) if frames == 1 else (b, frames, size, size, 3)


def _train_batch(config, mesh, frames: int = 1) -> dict:
  """ShapeDtypeStructs of one global batch as the input pipeline yields it (with ``frames`` > 1:
  image (b, T, S, S, 3) and frame_mask (b, T))."""
  b, length, size = config.train.batch_size, config.data.max_text_len, config.model.vision.image_size
  rows = sharding.batch_sharding(mesh)
  text = lambda dtype: jax.ShapeDtypeStruct((b, length), dtype, sharding=rows)
  batch = {"image": jax.ShapeDtypeStruct(_image_shape(b, frames, size), jnp.float32, sharding=rows),
           "text": text(jnp.int32), "text_mask": text(jnp.bool_), "ar_mask": text(jnp.bool_),
           "targets": text(jnp.int32), "loss_mask": text(jnp.bool_)}
  if frames > 1:
    batch["frame_mask"] = jax.ShapeDtypeStruct((b, frames), jnp.bool_, sharding=rows)
  return batch


def _train_model_flops(config, bucket, frames: int = 1) -> float:
  """Cost model of one training step: forward at the bucket's slot count (per frame) with the
  step's text length, times 3 (forward + backward), times the global batch. Full
  rematerialisation adds about one more forward, which XLA counts and this does not."""
  # The bucket's compute does not depend on how many of its slots (or frames) are valid.
  per_example = _forward_flops(config, bucket.num_slots, config.data.max_text_len, frames)
  return 3.0 * per_example * config.train.batch_size


def _forward_flops(config, slots: int, text_len: int, frames: int = 1) -> float:
  """Appendix-C forward FLOPs of one example of ``frames`` frames at ``slots`` visual tokens
  each and ``text_len`` text tokens (the paper's formula with N_t = ``text_len``; head over
  the text)."""
  try:
    c = flops_lib.cost(config, slots, frames)
  except ValueError:  # a bucket size outside the space (padded bucket): nearest budget below
    space = config_lib.validate_config(config, check_data=False)[1].budgets
    c = flops_lib.cost(config, max(b for b in space if b <= slots), frames)
  dec = config.model.decoder
  # The paper's fixed N_t prefix replaced by this program's text length.
  llm = flops_lib.llm_prefill_flops(frames * slots + text_len, dec)
  head = 2 * text_len * dec.width * dec.vocab_size
  return c["vit"] + c["connector"] + c["projection"] + llm + head


def compile_train(config, topology, *, mfu: float = 0.4, buckets=None,
                  frames: int | None = None) -> list[Report]:
  """Compiles the train step for every bucket (or ``buckets``) on ``topology``'s devices, for
  batches of ``frames`` frames per example (None: the config's ``data.max_frames``)."""
  frames = frames_of(config, frames)
  model_cfg, spec, mesh, rules = _target(config, topology)
  config_lib.check_batch_divisible(config, mesh)
  graphdef, tx, params, opt_state = state_lib.abstract_state(
      model_cfg, config.optim, config.train.num_steps, mesh, rules)
  step_fn = train_step_lib.make_train_step(graphdef, tx, accum_steps=config.optim.grad_accum_steps,
                                           mesh=mesh, loss_chunk=config_lib.loss_chunk(config))
  shardings = (sharding.tree_shardings(params), sharding.tree_shardings(opt_state))
  batch = _train_batch(config, mesh, frames)
  budgets = jax.ShapeDtypeStruct((config.train.batch_size,), jnp.int32,
                                 sharding=sharding.batch_sharding(mesh))
  settings = _settings(config, mesh, frames)
  out = []
  for bucket in select_buckets(spec, buckets):
    lowered = train_step_lib.lower_step(step_fn, bucket, (params, opt_state, batch, budgets),
                                        mesh, shardings, rules)
    compiled, error = _compile(lowered)
    model_flops = _train_model_flops(config, bucket, frames)
    inputs = _input_shapes(lowered, {"batch": 2, "budgets": 3})
    if error:
      out.append(_refused("train", bucket, config.train.batch_size, error, topology, model_flops,
                          settings, inputs))
      continue
    out.append(_report("train", bucket, config.train.batch_size, compiled, topology,
                       mesh.size, model_flops, mfu, settings,
                       recompute=4 / 3 if config.model.decoder.remat == "full" else 1.0,
                       input_shapes=inputs))
  return out


def select_buckets(spec, names=None):
  """The spec's buckets, or those named (``8x8+192q``); ValueError lists the valid names."""
  if not names:
    return spec.buckets
  by_name = {str(b): b for b in spec.buckets}
  chosen = [b if not isinstance(b, str) else by_name.get(b) for b in names]
  if any(c is None for c in chosen):
    raise ValueError(f"--buckets={','.join(map(str, names))}: allowed {', '.join(by_name)}")
  return chosen


def compile_serving(config, topology, *, budgets, batch: int, mfu: float = 0.4,
                    programs=("prefill", "decode"), frames: int | None = None) -> list[Report]:
  """Compact prefill (ViT + connector + prompt; the paper's text prefix, ``flops.text_tokens``:
  129 tokens for an image, 65 for frames) at each budget, and one decode step over the KV cache
  it returns, for a serving ``batch`` of ``frames`` frames per example (None: the config's
  ``data.max_frames``; each frame at the budget, T x B visual tokens)."""
  frames = frames_of(config, frames)
  model_cfg, spec, mesh, rules = _target(config, topology)
  graphdef, params = state_lib.abstract_params(model_cfg, mesh, rules)
  param_shardings = sharding.tree_shardings(params)
  n_t, size = flops_lib.text_tokens(frames), model_cfg.vision.image_size
  settings = {**_settings(config, mesh, frames), "serve_batch": batch}
  image_shape = _image_shape(batch, frames, size)
  images = _sds(image_shape, jnp.float32, mesh, ("activation_batch",) + (None,) * (len(image_shape) - 1),
                rules)
  text = _sds((batch, n_t), jnp.int32, mesh, ("activation_batch", None), rules)
  text_mask = _sds((batch, n_t), jnp.bool_, mesh, ("activation_batch", None), rules)
  budget_vec = _sds((batch,), jnp.int32, mesh, ("activation_batch",), rules)
  out = []
  for budget in budgets:
    bucket = spec.compact_bucket(budget)
    cache_size = frames * bucket.num_slots + n_t + SERVE_NEW_TOKENS

    def prefill(params, images, text, text_mask, budget_vec, bucket=bucket, cache_size=cache_size):
      model = nnx.merge(graphdef, params)
      return generation.prefill(model, model.encode_images(images, bucket), text, text_mask, budget_vec,
                                bucket=bucket, cache_size=cache_size)

    jitted = jax.jit(prefill, in_shardings=(param_shardings, *(a.sharding for a in
                                                               (images, text, text_mask, budget_vec))))
    with sharding.activation_sharding(mesh, rules):
      lowered = jitted.lower(params, images, text, text_mask, budget_vec)
    compiled, error = _compile(lowered)
    cost = flops_lib.cost(config, budget, frames)
    inputs = _input_shapes(lowered, {"image": 1, "text": 2, "text_mask": 3, "budgets": 4})
    if error:
      out.append(_refused("prefill", f"B={budget}", batch, error, topology, cost["total"] * batch,
                          settings, inputs))
      continue
    if "prefill" in programs:
      out.append(_report("prefill", f"B={budget}", batch, compiled, topology, mesh.size,
                         cost["total"] * batch, mfu, settings, input_shapes=inputs))
    if "decode" in programs and budget == max(budgets):
      out.append(_compile_decode(graphdef, params, param_shardings, lowered.out_info[1], mesh,
                                 rules, topology, mesh.size, batch, budget, cache_size,
                                 model_cfg, mfu, settings))
  return out


def _compile_decode(graphdef, params, param_shardings, cache_info, mesh, rules, topology,
                    num_devices, batch, budget, cache_size, model_cfg, mfu, settings) -> Report:
  """One greedy decode step (embed, every layer over the cache, logits) after a prefill at
  ``budget``; the cache keeps the layout prefill produced and is donated."""
  cache = jax.tree.map(lambda i: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=i.sharding), cache_info)
  token = _sds((batch,), jnp.int32, mesh, ("activation_batch",), rules)

  def decode(params, token, cache):
    model = nnx.merge(graphdef, params)
    hidden, cache = model.decoder.decode_step(model.decoder.embed(token[:, None]), cache)
    return model.decoder.logits(hidden[:, 0]), cache

  jitted = jax.jit(decode, donate_argnums=(2,), in_shardings=(
      param_shardings, token.sharding, jax.tree.map(lambda c: c.sharding, cache)))
  with sharding.activation_sharding(mesh, rules):
    lowered = jitted.lower(params, token, cache)
  compiled, error = _compile(lowered)
  inputs = {"token": list(token.shape), "cache_size": [cache_size]}
  dec = model_cfg.decoder
  # One token through every layer: projections, attention over the cache, MLP, and the head.
  per_token = dec.depth * (2 * dec.width * dec.head_dim * (2 * dec.num_heads + 2 * dec.num_kv_heads)
                           + 4 * cache_size * dec.num_heads * dec.head_dim
                           + 6 * dec.width * dec.mlp_dim) + 2 * dec.width * dec.vocab_size
  if error:
    return _refused("decode", f"B={budget} cache={cache_size}", batch, error, topology,
                    per_token * batch, settings, inputs)
  return _report("decode", f"B={budget} cache={cache_size}", batch, compiled, topology, num_devices,
                 per_token * batch, mfu, settings, input_shapes=inputs)


def _settings(config, mesh, frames: int = 1) -> dict:
  v, d = config.model.vision, config.model.decoder
  return {"mesh": dict(mesh.shape), "dtype": config.model.dtype, "frames": int(frames),
          "scan": (bool(v.scan), bool(d.scan)), "remat": (v.remat, d.remat),
          "grad_accum_steps": int(config.optim.grad_accum_steps),
          "loss_chunk": config_lib.loss_chunk(config),
          "micro_batch": int(config.train.batch_size // config.optim.grad_accum_steps)}


def fit_train(config, topology, *, mfu: float = 0.4, max_accum: int = 256,
              frames: int | None = None) -> tuple[int, list[Report]]:
  """Smallest power-of-two ``optim.grad_accum_steps`` whose largest bucket fits, and its reports.

  Raises:
    ValueError: nothing up to ``max_accum`` (or one example per batch shard) fits.
  """
  _, spec, mesh, _ = _target(config, topology)
  largest = max(spec.buckets, key=lambda b: b.num_slots)
  accum = int(config.optim.grad_accum_steps)
  shards = sharding.batch_shards(mesh)
  tried = []
  while True:
    with config.unlocked():
      config.optim.grad_accum_steps = accum
    report = compile_train(config, topology, mfu=mfu, buckets=[largest], frames=frames)[0]
    tried.append(report)
    if report.fits:
      return accum, tried
    nxt = accum * 2
    if nxt > max_accum or config.train.batch_size % nxt or (config.train.batch_size // nxt) % shards:
      raise ValueError(f"no optim.grad_accum_steps up to {accum} fits bucket {largest} in "
                       f"{topology.chip.hbm_bytes / 2**30:.1f} GiB per chip (last: "
                       f"{report.peak_bytes / 2**30:.1f} GiB)")
    accum = nxt


# ------------------------------------------------------------------------ output

def format_reports(reports: list[Report], topology) -> str:
  chip = topology.chip
  lines = [f"{topology.name}: {topology.num_chips} x {chip.name} ({topology.libtpu_name}), "
           f"{chip.hbm_bytes / 2**30:.0f} GiB HBM and {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 "
           "per chip. Bytes are per chip (GiB); step time is an ESTIMATE (cost-model FLOPs at --mfu of peak).",
           f"{'program':<8} {'bucket':<18} {'batch':>6} {'accum':>5} {'args':>7} {'out':>7} {'temp':>8} "
           f"{'code':>6} {'peak':>8} {'fits':>5} {'XLA TFLOP':>10} {'model TF':>9} {'XLA/mod':>7} "
           f"{'est. s':>7}"]
  frames = sorted({r.settings.get("frames", 1) for r in reports})
  if frames != [1]:
    lines.insert(1, f"frames per example: {', '.join(map(str, frames))} (every frame through the ViT "
                    "and connector at the budget, T x slots visual tokens; model FLOPs of "
                    "flops.cost(frames=T))")
  if any(r.settings.get("scan", (False, False))[1] for r in reports):
    lines.insert(1, "(scanned layers: XLA's cost analysis counts a loop body once, so 'XLA TFLOP' "
                    "undercounts; the estimate uses the cost model, x4/3 under full remat)")
  g = lambda x: f"{x / 2**30:.2f}"
  for r in reports:
    if r.error:
      lines.append(f"{r.program:<8} {r.bucket:<18} {r.batch:>6} {r.settings.get('grad_accum_steps', 1):>5} "
                   f"refused by XLA: temporaries {g(r.temp_bytes)} GiB ({r.error[:120]})")
      continue
    total_xla = r.xla_flops * topology.num_chips
    ratio = total_xla / r.model_flops_total if r.model_flops_total else float("nan")
    lines.append(f"{r.program:<8} {r.bucket:<18} {r.batch:>6} {r.settings.get('grad_accum_steps', 1):>5} "
                 f"{g(r.argument_bytes):>7} {g(r.output_bytes):>7} {g(r.temp_bytes):>8} "
                 f"{g(r.code_bytes):>6} {g(r.peak_bytes):>8} {'yes' if r.fits else 'NO':>5} "
                 f"{total_xla / 1e12:>10.1f} {r.model_flops_total / 1e12:>9.1f} {ratio:>7.2f} "
                 f"{r.step_time_estimate_s:>7.3f}")
  bad = [r for r in reports if not r.fits]
  if bad:
    worst = max(bad, key=lambda r: r.peak_bytes)
    lines.append(f"does not fit: {worst.program} {worst.bucket} needs {g(worst.peak_bytes)} GiB of "
                 f"{g(worst.hbm_bytes)} ({worst.peak_bytes / worst.hbm_bytes:.2f}x; refused programs "
                 "count their temporaries only). Switches, in the "
                 "order to try: --fit (gradient accumulation: smaller micro-batches, same global "
                 "batch); model.*.remat=full; model.*.scan=True; model.dtype=bfloat16; more chips "
                 "on the fsdp axis.")
  return "\n".join(lines)


def main(argv) -> None:
  from absl import flags

  del argv
  f = flags.FLAGS
  config = f.config
  try:
    topology = topologies.parse(f.topology)
    frames = frames_of(config, f.frames)
    programs = [p for p in f.programs]
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
      raise ValueError(f"--programs: unknown {unknown}; allowed: {', '.join(PROGRAMS)}")
    reports = []
    if "train" in programs:
      buckets = list(select_buckets(config_lib.validate_config(config, check_data=False)[1],
                                    f.buckets))
      if f.fit:  # the largest bucket decides; the others then compile at the setting found
        accum, tried = fit_train(config, topology, mfu=f.mfu, frames=frames)
        print(f"--fit: optim.grad_accum_steps={accum} fits (tried "
              f"{', '.join(str(r.settings['grad_accum_steps']) for r in tried)})", file=sys.stderr)
        reports += tried
        buckets = [b for b in buckets if str(b) != tried[-1].bucket]
      if buckets:
        reports += compile_train(config, topology, mfu=f.mfu, buckets=buckets, frames=frames)
    serve = [p for p in programs if p != "train"]
    if serve:
      budgets = [int(b) for b in f.serve_budgets] or list(config_lib.eval_budgets(
          config, config_lib.validate_config(config, check_data=False)[1]))
      reports += compile_serving(config, topology, budgets=budgets, batch=f.serve_batch, mfu=f.mfu,
                                 programs=tuple(serve), frames=frames)
  except (ValueError, RuntimeError) as e:
    raise SystemExit(f"error: {e}") from e
  if f.json:
    print(json.dumps({"topology": dataclasses.asdict(topology), "num_chips": topology.num_chips,
                      "reports": [r.as_dict() for r in reports]}, indent=2))
  else:
    print(format_reports(reports, topology))


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Config file (ml_collections).", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice: an accelerator type (v4-512, v5e-256, ...) or a "
                      "libtpu topology (v4:8x8x4).")
  flags.DEFINE_list("programs", list(PROGRAMS), f"Programs to compile: {', '.join(PROGRAMS)}.")
  flags.DEFINE_list("buckets", [], "Train buckets to compile, e.g. 8x8+192q (default: all).")
  flags.DEFINE_list("serve_budgets", [], "Prefill budgets (default: the config's eval.budgets).")
  flags.DEFINE_integer("serve_batch", 256, "Global batch of the serving programs.")
  flags.DEFINE_integer("frames", 0, "Frames T per example (video or several images; default 0: "
                       "the config's data.max_frames). T > 1: image (b, T, S, S, 3), frame_mask "
                       "(b, T), N_t = 65 for serving, as python -m parcel_jax.flops --frames=T.")
  flags.DEFINE_float("mfu", 0.4, "Fraction of peak bf16 FLOP/s for the step-time estimate.")
  flags.DEFINE_bool("fit", False, "Double optim.grad_accum_steps until the largest train bucket fits.")
  flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
  flags.mark_flags_as_required(["config", "topology"])


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
