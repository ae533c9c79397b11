"""Optimiser: AdamW with warm-up + cosine, clipping, per-module LR multipliers and freezing.

Parameter groups are chosen by regular expressions over '/'-joined parameter paths
(``vision/blocks/0/attn/q_kernel``), as big_vision's config-driven schedules do.
"""

from __future__ import annotations

import re

import jax
import optax


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _labels(params, multipliers, freeze: str):
  """Label each parameter with its group: 'frozen', a multiplier index, or 'default'."""
  def label(path, leaf):
    name = path_str(path)
    if freeze and re.search(freeze, name):
      return "frozen"
    for i, (pattern, _) in enumerate(multipliers):
      if re.search(pattern, name):
        return f"group{i}"
    return "default"
  return jax.tree_util.tree_map_with_path(label, params)


def _decay_mask(params):
  # Decay matrices and embeddings only: norms' scales and biases are 1-D.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def learning_rate(optim_cfg, num_steps: int, multiplier: float = 1.0) -> optax.Schedule:
  peak = optim_cfg.lr * multiplier
  warmup = min(optim_cfg.warmup_steps, max(num_steps - 1, 0))
  if optim_cfg.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup])
  if optim_cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps=warmup, decay_steps=max(num_steps, warmup + 1),
        end_value=peak * optim_cfg.end_lr_fraction)
  raise ValueError(f"optim.schedule={optim_cfg.schedule!r} is unknown; allowed: cosine, constant")


def make_optimizer(optim_cfg, params, num_steps: int) -> optax.GradientTransformation:
  """The full update rule for ``params`` (a pytree, used only for its paths)."""
  multipliers = tuple((str(p), float(m)) for p, m in optim_cfg.lr_multipliers)
  for pattern, _ in multipliers:
    re.compile(pattern)

  def adamw(mult):
    return optax.adamw(learning_rate(optim_cfg, num_steps, mult), b1=optim_cfg.b1, b2=optim_cfg.b2,
                       weight_decay=optim_cfg.weight_decay, mask=_decay_mask)

  groups = {"default": adamw(1.0), "frozen": optax.set_to_zero()}
  groups.update({f"group{i}": adamw(m) for i, (_, m) in enumerate(multipliers)})
  labels = _labels(params, multipliers, optim_cfg.freeze)
  chain = []
  if optim_cfg.clip_norm:
    chain.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
  chain.append(optax.partition(groups, labels))
  # Gradient accumulation happens inside the train step (one budget per update).
  return optax.chain(*chain)
