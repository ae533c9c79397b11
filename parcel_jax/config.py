"""Config validation and the ConfigDict -> model dataclasses adapter (one place for both).

Every entry point (train, evaluate, predict, compile, flops, spectral) starts with
``validate_config``: fields are checked before anything is compiled, and each error
names the field and the allowed values.
"""

from __future__ import annotations

import ml_collections

from parcel_jax import budgets as budgets_lib
from parcel_jax import host_memory
from parcel_jax import weights
from parcel_jax.data import pipeline
from parcel_jax.models import vlm


def validate_config(config: ml_collections.ConfigDict, *, check_data: bool = True
                    ) -> tuple[vlm.ModelConfig, budgets_lib.BudgetSpec]:
  """Checks the config before anything is compiled; errors name the field.

  Fills, in place, the model sizes left at 0 from the presets ``model.vision.variant`` /
  ``model.decoder.variant`` name (``vlm.preset_sizes``), then ``model.decoder.vocab_size`` from
  the data's tokenizer when it is still 0. ``check_data=False`` (compile-only tools) neither
  opens the data's tokenizer nor checks the data fields; the vocabulary must then come from the
  config or its preset.
  """
  vlm.apply_presets(config.model)
  v = config.model.vision
  if "image_size" in config.data and not config.data.image_size:
    # base.py's data.image_size follows the vision's by reference; a copy that resolved the
    # reference before the preset filled the vision's size holds 0: it means the same.
    config.data.image_size = v.image_size
  if v.image_size % v.patch_size:
    raise ValueError(f"model.vision.image_size={v.image_size} is not divisible by "
                     f"model.vision.patch_size={v.patch_size}")
  if config.data.name not in pipeline.DATASETS:
    raise ValueError(f"data.name={config.data.name!r} is unknown; allowed: {', '.join(pipeline.DATASETS)}")
  if check_data:
    weights.apply_checkpoint_dims(config)  # init.hf_checkpoint: model dims from its config.json
    vocab = pipeline.build_tokenizer(config.data).vocab_size
    with config.unlocked():
      if config.model.decoder.vocab_size == 0:
        config.model.decoder.vocab_size = vocab
    if config.model.decoder.vocab_size < vocab:
      raise ValueError(f"model.decoder.vocab_size={config.model.decoder.vocab_size} is smaller than "
                       f"the tokenizer's vocabulary ({vocab})")
  elif config.model.decoder.vocab_size < 1:
    raise ValueError("model.decoder.vocab_size must be set (> 0, or by model.decoder.variant's "
                     "preset) when the data's tokenizer is not read (compile-only tools)")
  grid = v.image_size // v.patch_size
  spec = budgets_lib.BudgetSpec.from_config(config.model.connector, grid)
  for field, value, allowed in (("budget.sampling", config.budget.sampling, budgets_lib.SAMPLING_MODES),
                                ("budget.distribution", config.budget.distribution, budgets_lib.DISTRIBUTIONS),
                                ("train.on_nonfinite", config.train.on_nonfinite, ("skip", "stop")),
                                ("train.host_malloc", config.train.host_malloc, host_memory.MODES)):
    if value not in allowed:
      raise ValueError(f"{field}={value!r} is unknown; allowed: {', '.join(allowed)}")
  for field in ("train.batch_size", "train.num_steps", "train.log_every", "train.checkpoint_every",
                "eval.batch_size", "optim.grad_accum_steps"):
    section, name = field.split(".")
    if config[section][name] < 1:
      raise ValueError(f"{field} must be >= 1, got {config[section][name]}")
  if loss_chunk(config) < 0:
    raise ValueError(f"train.loss_chunk={loss_chunk(config)} must be >= 0 (0 = logits at once)")
  ramp = budgets_lib.ramp_fraction(config)
  if not 0.0 <= ramp <= 1.0:
    raise ValueError(f"budget.ramp_fraction={ramp} must be in [0, 1] (a fraction of train.num_steps)")
  if config.train.batch_size % config.optim.grad_accum_steps:
    raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by "
                     f"optim.grad_accum_steps={config.optim.grad_accum_steps}")
  if check_data and config.eval.num_examples > config.data.eval_size:
    raise ValueError(f"eval.num_examples={config.eval.num_examples} exceeds data.eval_size={config.data.eval_size}")
  if not eval_budgets(config, spec):
    raise ValueError(f"eval.budgets={tuple(config.eval.budgets)} has no budget of method "
                     f"{spec.method!r} (allowed: {spec.budgets[0]}..{spec.budgets[-1]})")
  return vlm.model_config(model_fields(config.model)), spec


def check_batch_divisible(config, mesh) -> None:
  """The global batch, and each of its micro-batches, splits evenly over the batch shards."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.train.batch_size % shards:
    raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by the {shards} "
                     f"data shards of mesh.shape={tuple(config.mesh.shape)}")


def model_fields(model_cfg):
  """Maps the config's 0 = off convention onto the modules' None."""
  m = ml_collections.ConfigDict(model_cfg.to_dict())
  for key in ("attn_softcap", "final_softcap", "sliding_window", "query_scale"):
    if not m.decoder.get(key):
      m.decoder[key] = None
  return m


def loss_chunk(config) -> int:
  """``train.loss_chunk`` (text positions per loss chunk; 0 = off); configs saved before the
  field existed read as 0."""
  return int(config.train.get("loss_chunk", 0))


def eval_budgets(config, spec: budgets_lib.BudgetSpec) -> tuple[int, ...]:
  """Requested eval budgets that the method supports (M3: only its own squares)."""
  return tuple(b for b in config.eval.budgets if b in spec.budgets)
