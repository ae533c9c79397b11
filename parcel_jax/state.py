"""Model and optimizer state: built, abstract (shapes + shardings only) or restored.

One way to construct them serves training, the tools and the compile-only checks:

  abstract_params   graphdef + ShapeDtypeStructs carrying the shardings (restore targets,
                    compile-only lowering: nothing is allocated)
  init_params       freshly initialised params, created directly on their shardings
  abstract_state    + the optimizer and its state's ShapeDtypeStructs
  init_state        + the optimizer state, created on the mesh
"""

from __future__ import annotations

import jax
from flax import nnx

from parcel_jax import optim, sharding
from parcel_jax.models import vlm


def _model_fn(model_cfg: vlm.ModelConfig, seed: int):
  return lambda: vlm.VLM(model_cfg, rngs=nnx.Rngs(seed))


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_params(model_cfg: vlm.ModelConfig, mesh, rules=None):
  """Graph definition and the params' ShapeDtypeStructs (pure dict) with shardings from the
  logical axis ``rules`` (``sharding.rules_from_config``; None = ``sharding.DEFAULT_RULES``)."""
  graphdef, abstract = nnx.split(nnx.eval_shape(_model_fn(model_cfg, 0)))
  shardings = sharding.param_shardings(abstract, mesh, rules)
  return graphdef, _with_shardings(nnx.to_pure_dict(abstract), shardings)


def init_params(model_cfg: vlm.ModelConfig, mesh, seed: int, rules=None):
  """Graph definition and params (pure dict of arrays), each created on its sharding."""
  graphdef, target = abstract_params(model_cfg, mesh, rules)
  make = _model_fn(model_cfg, seed)
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())),
                   out_shardings=sharding.tree_shardings(target))()
  return graphdef, params


def abstract_state(model_cfg: vlm.ModelConfig, optim_cfg, num_steps: int, mesh, rules=None):
  """(graphdef, tx, params, opt_state) with params and opt_state as ShapeDtypeStructs that carry
  their shardings: what the train step is lowered against when nothing may be allocated."""
  graphdef, params = abstract_params(model_cfg, mesh, rules)
  tx = optim.make_optimizer(optim_cfg, params, num_steps)
  opt_shapes = jax.eval_shape(tx.init, params)
  opt_shardings = sharding.optimizer_shardings(opt_shapes, params,
                                               sharding.tree_shardings(params), mesh)
  return graphdef, tx, params, _with_shardings(opt_shapes, opt_shardings)


def init_state(model_cfg: vlm.ModelConfig, optim_cfg, num_steps: int, mesh, seed: int, rules=None):
  """Graph definition, optimizer, and sharded params + optimizer state created on the mesh."""
  graphdef, params = init_params(model_cfg, mesh, seed, rules)
  tx = optim.make_optimizer(optim_cfg, params, num_steps)
  opt_shardings = sharding.optimizer_shardings(jax.eval_shape(tx.init, params), params,
                                               sharding.tree_shardings(params), mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  return graphdef, tx, params, opt_state


def abstract_train_state(state: dict) -> dict:
  """ShapeDtypeStructs with shardings of a concrete train state: the restore target for Orbax."""
  # Non-array leaves (the int step) are their own restore target.
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if isinstance(x, jax.Array) else x, state)


# Fields that change neither the parameters nor the function a model computes.
LAYOUT_ONLY_FIELDS = ("remat", "variant", "dtype")
# Model fields a checkpoint's config may predate, with the value that means "absent".
ABSENT_MEANS = {"frame_posemb": "none", "visual_positions": "packed"}


def model_field_diffs(saved: dict, current: dict, path: str = "model",
                      labels: tuple[str, str] = ("checkpoint", "config")) -> list[str]:
  """Every field of the nested config dicts ``saved`` / ``current`` that differs (tuples and
  lists compare by value; ``LAYOUT_ONLY_FIELDS`` are ignored), as 'path.key: <label> x, <label> y'."""
  diffs = []
  for key in sorted(set(saved) | set(current)):
    x, y = saved.get(key, ABSENT_MEANS.get(key)), current.get(key, ABSENT_MEANS.get(key))
    if isinstance(x, dict) and isinstance(y, dict):
      diffs += model_field_diffs(x, y, f"{path}.{key}", labels)
    elif key not in LAYOUT_ONLY_FIELDS and x != y and not (
        isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and list(x) == list(y)):
      diffs.append(f"{path}.{key}: {labels[0]} {x!r}, {labels[1]} {y!r}")
  return diffs


def check_same_model(saved: dict, config, directory: str) -> None:
  """A checkpoint only resumes into the model (and budget space) it was trained as."""
  diffs = model_field_diffs(saved.get("model", {}), config.model.to_dict())
  if diffs:
    raise ValueError(f"the checkpoint in {directory} is of another model; differing fields: "
                     + "; ".join(diffs) + ". Use a new --workdir or the checkpoint's config.")
