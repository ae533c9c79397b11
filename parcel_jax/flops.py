"""Inference cost of a PaliGemma-style VLM with a visual-token connector (paper, Appendix C).

One multiply-add = 2 FLOPs; norms, activations, softmax, biases and the parameter-free
pooling are omitted, as in the paper. Symbols (all from the config):

  N_v = (image_size / patch_size)^2 patch tokens per frame, D_v / L_v / M_v ViT width / depth / MLP
      (a method that encodes per budget runs the ViT at its own grid, ``Connector.vision_grid``:
      N_v is that grid's size, e.g. B for an image downsampled to the budget's grid)
  D_l / L_l / M_l decoder width / depth / MLP, H_q / H_kv query / KV heads, d_h head dim, V vocab
  B visual tokens per frame = N_p anchors + N_q queries (the method's routing), T frames
  N_t text prefix = 129 for images, 65 for video;  N_tot = T B + N_t tokens prefilled

  ViT         T L_v (8 N_v D_v^2 + 4 N_v^2 D_v + 4 N_v D_v M_v)
  connector   T [8 B D_v^2 + 4 B^2 D_v                  self-attention over [anchors; queries]
                 + 4 (N_q + N_v) D_v^2 + 4 N_q N_v D_v  cross-attention of the queries to the ViT grid
                 + 4 N_q D_v M_c]                       one MLP on the query tokens (M_c = connector.mlp_dim)
              (PARCEL, only when N_q > 0: at B = 16 and 64 it is pure pooling and costs 0)
  projection  2 T B D_v D_l
  LLM prefill L_l (4 N_tot D_l d_h (H_q + H_kv) + 4 N_tot^2 H_q d_h + 6 N_tot D_l M_l)
  head        2 N_t D_l V                               logits over the text prefix only
  KV cache    2 bytes (bf16) x 2 (K, V) x L_l H_kv d_h x N_tot

Each method's connector term is its class's ``flops`` (``models/connectors/<method>.py``,
from the block terms of ``flop_terms``); this module asks the method. The variants the paper
does not cost (our choices, same block accounting):
  mqt                      cross-attention + MLP with N_q = B (no anchors, no self-attention).
  conditioning='none'      PARCEL without the self-attention term (ViT-only cross-attention).
  conditioning='dual_cross' the self-attention term is replaced by a cross-attention of the N_q
                           queries to the N_p anchors: 4 (N_q + N_p) D_v^2 + 4 N_q N_p D_v.
  extra_self_attn (m3/mqt) adds one self-attention over the B output tokens, 8 B D^2 + 4 B^2 D
                           (attention only: the paper's self-attention term carries no MLP);
                           for m3 this is the whole connector cost.
  m3, none                 0 (parameter-free pooling / identity).

CLI:
  python -m parcel_jax.flops --config=configs/base.py --budgets=16,64,256 [--frames=16] [--json]
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any, Callable

from parcel_jax import budgets as budgets_lib
from parcel_jax.flop_terms import cross_attention_flops, mlp_flops, self_attention_flops
from parcel_jax.models import connectors

__all__ = ["COMPONENTS", "connector_flops", "cost", "cross_attention_flops", "mlp_flops",
           "self_attention_flops", "text_tokens", "vit_flops", "xla_flops", "xla_forward_flops"]

IMAGE_TEXT_TOKENS = 129  # N_t for a single image (paper, Appendix C)
VIDEO_TEXT_TOKENS = 65   # N_t for 16-frame video
KV_BYTES_PER_VALUE = 2   # bf16 cache
COMPONENTS = ("vit", "connector", "projection", "llm", "head")


def text_tokens(frames: int) -> int:
  """N_t: the paper's text prefix length, 129 for an image and 65 for video (frames > 1)."""
  return IMAGE_TEXT_TOKENS if frames == 1 else VIDEO_TEXT_TOKENS


def grid_size(config) -> int:
  """Side of the square ViT feature grid, image_size // patch_size."""
  v = config.model.vision
  return v.image_size // v.patch_size


def vit_flops(n_v: int, d: int, depth: int, mlp: int) -> int:
  """One frame through the ViT: depth x (self-attention over N_v patches + MLP)."""
  return depth * (self_attention_flops(n_v, d) + mlp_flops(n_v, d, mlp))


def connector_flops(connector, n_p: int, n_q: int, n_v: int, d: int) -> int:
  """One frame through the connector at the vision width d: the method's own cost
  (``connector``: the ``model.connector`` section; see the module docstring)."""
  if isinstance(connector, connectors.ConnectorConfig):
    connector = connector.method_config()
  cfg = connector if isinstance(connector, connectors.MethodConfig) else \
      connectors.config_from_section(connector, grid_size=math.isqrt(n_v))
  return connectors.method_class(cfg.method).flops(cfg, n_p, n_q, n_v, d)


def llm_prefill_flops(n_tot: int, dec) -> int:
  """Prefill of n_tot tokens through the grouped-query, gated-MLP decoder (no head)."""
  qkvo = 4 * n_tot * dec.width * dec.head_dim * (dec.num_heads + dec.num_kv_heads)
  attention = 4 * n_tot * n_tot * dec.num_heads * dec.head_dim
  mlp = 6 * n_tot * dec.width * dec.mlp_dim  # gate, up and down projections
  return dec.depth * (qkvo + attention + mlp)


def cost(config, budget: int, frames: int = 1) -> dict[str, int]:
  """Appendix C cost of one example at ``budget`` visual tokens per frame.

  Args:
    config: ConfigDict with ``model.vision``, ``model.decoder`` and ``model.connector``.
    budget: B, visual tokens per frame; must be in the method's budget space.
    frames: T, frames encoded independently (video when > 1).

  Returns:
    FLOPs of ``vit``, ``connector``, ``projection``, ``llm`` (prefill), ``head`` and their
    ``total``, and ``kv_cache_bytes`` after prefill; python ints. A decoder ``vocab_size``
    of 0 (``configs/base.py``: "the tokenizer decides") gives a head cost of 0.
  """
  if frames < 1:
    raise ValueError(f"frames must be >= 1, got {frames}")
  vis, dec, con = config.model.vision, config.model.decoder, config.model.connector
  grid = grid_size(config)
  method_cfg = connectors.config_from_section(con, grid_size=grid)
  n_p, n_q = budgets_lib.route_of(method_cfg, budget)
  # The ViT runs at the method's grid for this budget: the full grid, or for a method that
  # encodes per budget (downsampled images) a coarser one; the connector reads what it made.
  bucket = budgets_lib.Bucket(math.isqrt(n_p), n_q)
  n_v = connectors.method_class(method_cfg.method).vision_grid(method_cfg, bucket) ** 2
  n_t = text_tokens(frames)
  n_tot = frames * budget + n_t

  out = {
      "vit": frames * vit_flops(n_v, vis.width, vis.depth, vis.mlp_dim),
      "connector": frames * connector_flops(method_cfg, n_p, n_q, n_v, vis.width),
      "projection": 2 * frames * budget * vis.width * dec.width,
      "llm": llm_prefill_flops(n_tot, dec),
      "head": 2 * n_t * dec.width * dec.vocab_size,
  }
  out["total"] = sum(out[k] for k in COMPONENTS)
  out["kv_cache_bytes"] = KV_BYTES_PER_VALUE * 2 * dec.depth * dec.num_kv_heads * dec.head_dim * n_tot
  return out


def compiled_flops(compiled) -> float:
  """FLOPs XLA's cost analysis reports for a compiled program (0 if none)."""
  analysis = compiled.cost_analysis()
  # Older JAX returns one dict per computation in a list; newer returns a dict.
  if isinstance(analysis, dict):
    analysis = [analysis]
  return float(sum(a.get("flops", 0.0) for a in (analysis or []) if a))


def xla_flops(fn: Callable[..., Any], *args) -> float:
  """FLOPs XLA's cost analysis reports for ``jax.jit(fn)(*args)`` (compiled, not run)."""
  import jax  # lazily: the analytic cost model and its CLI need no accelerator runtime

  return compiled_flops(jax.jit(fn).lower(*args).compile())


def xla_forward_flops(config, budget: int, frames: int = 1) -> float:
  """XLA's FLOP count of the compiled forward pass that ``cost`` models: one image (or
  ``frames`` frames, each at ``budget``) at the compact shape of ``budget`` plus the paper's
  text prefix (``text_tokens``), logits over the text.

  Built from abstract shapes only (nothing is allocated), so it works for any size.
  """
  import jax  # lazily, as in xla_flops
  import jax.numpy as jnp
  from flax import nnx

  from parcel_jax import config as config_lib
  from parcel_jax.models import vlm

  model_cfg, spec = config_lib.validate_config(config)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: vlm.VLM(model_cfg, rngs=nnx.Rngs(0))))
  v, n_t = config.model.vision, text_tokens(frames)
  frame_axis = () if frames == 1 else (frames,)   # one image: the model's (b, S, S, 3) input
  image = jax.ShapeDtypeStruct((1, *frame_axis, v.image_size, v.image_size, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((1, n_t), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, n_t), jnp.bool_)
  budgets = jax.ShapeDtypeStruct((1,), jnp.int32)
  bucket = spec.compact_bucket(budget)

  def forward(p, image, text, text_mask, ar_mask, budgets):
    return nnx.merge(graphdef, p)(image, text, text_mask, ar_mask, bucket=bucket, budgets=budgets)
  return compiled_flops(jax.jit(forward).lower(params, image, text, mask, mask, budgets).compile())


# -------------------------------------------------------------------------- CLI

def _options(method_cfg) -> str:
  """The method's string options (routing=..., conditioning=...) for the table header."""
  return "".join(f"{f.name}={getattr(method_cfg, f.name)} " for f in dataclasses.fields(method_cfg)
                 if f.name != "method" and isinstance(getattr(method_cfg, f.name), str))


def _table(config, rows: list[tuple[int, dict]], frames: int) -> str:
  grid = grid_size(config)
  con = config.model.connector
  method_cfg = connectors.config_from_section(con, grid_size=grid)
  ref = max(rows, key=lambda r: r[0])[1]["total"]
  head = (f"{'B':>5} {'N_p':>5} {'N_q':>5} {'ViT':>9} {'conn':>9} {'proj':>9} {'LLM':>9} "
          f"{'head':>9} {'total':>9} {'KV MiB':>8} {'rel':>6}")
  lines = [f"method={con.method} {_options(method_cfg)}grid={grid}x{grid} frames={frames} "
           f"N_t={text_tokens(frames)}   (GFLOPs; rel = total / total at the largest budget)", head]
  for b, c in rows:
    n_p, n_q = budgets_lib.route_of(method_cfg, b)
    g = {k: c[k] / 1e9 for k in COMPONENTS + ("total",)}
    lines.append(f"{b:>5} {n_p:>5} {n_q:>5} {g['vit']:>9.2f} {g['connector']:>9.2f} "
                 f"{g['projection']:>9.2f} {g['llm']:>9.2f} {g['head']:>9.2f} {g['total']:>9.2f} "
                 f"{c['kv_cache_bytes'] / 2**20:>8.2f} {c['total'] / ref:>6.3f}")
  return "\n".join(lines)


def main(argv) -> None:
  from absl import flags

  from parcel_jax.models import vlm

  del argv
  config, frames = flags.FLAGS.config, flags.FLAGS.frames
  if "model" in config:
    vlm.apply_presets(config.model)  # size fields left at 0 name a preset (configs/base.py)
  try:
    budget_list = [int(b) for b in flags.FLAGS.budgets]
    rows = [(b, cost(config, b, frames)) for b in budget_list]
  except ValueError as e:  # a budget outside the method's space: say which are allowed
    raise SystemExit(f"error: {e}") from e
  if config.model.decoder.vocab_size == 0:
    print("note: model.decoder.vocab_size is 0 (set by the tokenizer at train time): head cost is 0",
          file=sys.stderr)
  if flags.FLAGS.xla:  # XLA's count of the compiled forward pass next to the model's
    for b, c in rows:
      c["xla_forward"] = xla_forward_flops(config, b, frames)
      c["xla_over_model"] = c["xla_forward"] / c["total"]
  if flags.FLAGS.json:
    print(json.dumps({str(b): c for b, c in rows}, indent=2))
  else:
    print(_table(config, rows, frames))
    if flags.FLAGS.xla:
      for b, c in rows:
        print(f"B={b}: XLA forward {c['xla_forward'] / 1e9:.3f} GFLOPs, model {c['total'] / 1e9:.3f} "
              f"GFLOPs, ratio XLA/model {c['xla_over_model']:.3f}")


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Config file (ml_collections).", lock_config=True)
  flags.DEFINE_list("budgets", ["16", "64", "256"], "Visual-token budgets per frame.")
  flags.DEFINE_integer("frames", 1, "Frames T (video when > 1: N_t = 65).")
  flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
  flags.DEFINE_bool("xla", False, "Also compile the forward pass and report XLA's FLOP count "
                    "and its ratio to the cost model.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
