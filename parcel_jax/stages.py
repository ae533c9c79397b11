"""The paper's two-stage recipe: stage 1 trains the backbone uncompressed, stage 2 adds a connector.

Stage 1 is an ordinary run with ``model.connector.method='none'`` (ViT + projection +
decoder, every visual token). Stage 2 starts from its parameters: the backbone (every
parameter outside ``connector/``) is copied bitwise from the stage-1 checkpoint, the
connector is freshly initialised, the optimizer state is new and the learning-rate schedule
restarts at step 0 (the paper trains everything in stage 2). Several stage-2 runs (methods,
ablations, seeds) can share one stage 1, which keeps their comparison fair and each cheap.

Config fields:
  init.stage1_workdir  a stage-1 run's workdir ('' = none); its latest checkpoint, or
                       ``init.stage1_step`` (0 = latest), seeds the backbone of a fresh run.
  train.stage1_steps   > 0 with no init.stage1_workdir: ``parcel_jax.train`` runs stage 1
                       itself first, in WORKDIR/stage1, for this many steps (same data, optimiser
                       and model dims, method 'none'), then stage 2 in WORKDIR; one command, and a
                       restart resumes whichever stage was interrupted.

The backbone of stage 1 must be the model's: a differing vision / decoder field or parameter
shape is an error naming ``init.stage1_workdir`` and the field.
"""

from __future__ import annotations

import jax
import ml_collections
from absl import logging

from parcel_jax import paths
from parcel_jax import runs
from parcel_jax import state as state_lib
from parcel_jax import weights
from parcel_jax.models import connectors

CONNECTOR = "connector"  # the only top-level parameter subtree stage 2 does not take over
STAGE1_SUBDIR = "stage1"


def _init(config) -> ml_collections.ConfigDict:
  return config.get("init") or ml_collections.ConfigDict()


def stage1_workdir(config) -> str:
  return str(_init(config).get("stage1_workdir", "") or "")


def stage1_step(config) -> int | None:
  return int(_init(config).get("stage1_step", 0) or 0) or None


def stage1_steps(config) -> int:
  """``train.stage1_steps`` (configs saved before the field existed read as 0)."""
  return int(config.train.get("stage1_steps", 0) or 0)


def validate(config) -> None:
  """Errors name the field."""
  if stage1_steps(config) < 0:
    raise ValueError(f"train.stage1_steps={stage1_steps(config)} must be >= 0 (0 = no stage 1)")
  if stage1_workdir(config):
    hf_dir, npz = weights.init_fields(config)
    if hf_dir or npz:
      raise ValueError("init.stage1_workdir and init.hf_checkpoint / init.big_vision_npz both set: "
                       "the backbone comes from one of them; start stage 1 from the pretrained "
                       "weights instead")
    if stage1_steps(config):
      raise ValueError("init.stage1_workdir and train.stage1_steps are both set: name an existing "
                       "stage 1, or let train run one, not both")


def stage1_config(config) -> ml_collections.ConfigDict:
  """Stage 1 of ``config``: the same run with method 'none' for ``train.stage1_steps`` steps."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.connector.method = "none"
  c.model.connector.budgets = ()
  for name, default in connectors.method_field_defaults("none").items():
    if name in c.model.connector:  # stage 2's connector settings are not stage 1's
      c.model.connector[name] = default
  c.train.num_steps = stage1_steps(config)
  c.train.stage1_steps = 0
  c.train.stop_at = 0  # train.stop_at applies to stage 2
  v = c.model.vision
  c.eval.budgets = ((v.image_size // v.patch_size) ** 2,)  # every visual token: the `none` reference
  return c


def stage2_config(config, stage1_dir: str) -> ml_collections.ConfigDict:
  """``config`` starting from the stage 1 in ``stage1_dir``: pretrained-weight fields are
  consumed by stage 1 (their model dims are kept), ``init.stage1_workdir`` names it."""
  c = ml_collections.ConfigDict(config.to_dict())
  weights.apply_checkpoint_dims(c)
  if "init" not in c:
    c.init = ml_collections.ConfigDict()
  for key in ("hf_checkpoint", "big_vision_npz"):
    if key in c.init:
      c.init[key] = ""
  c.init.stage1_workdir = stage1_dir
  c.train.stage1_steps = 0
  return c


def finished(workdir: str, num_steps: int) -> bool:
  """Whether ``workdir`` holds a run that reached ``num_steps`` and wrote its eval.json."""
  try:
    step, _ = runs.saved_config(workdir)
  except FileNotFoundError:
    return False
  return step >= num_steps and paths.exists(paths.join(workdir, "eval.json"))


def load_backbone(config, params: dict, mesh, rules) -> dict:
  """``params`` (a fresh model's, on ``mesh``) with every non-connector leaf replaced by the
  stage-1 checkpoint's (``init.stage1_workdir``), restored onto the same shardings.

  Raises:
    ValueError: naming init.stage1_workdir and the field / parameter when the backbones differ.
    FileNotFoundError: naming the path when the stage-1 run or its step is missing.
  """
  directory = stage1_workdir(config)
  try:
    saved_step, saved = runs.saved_config(directory, stage1_step(config))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"init.stage1_workdir={directory}: {e}") from e
  saved_model, current = saved.get("model", {}), config.model.to_dict()
  diffs = [d for section in ("vision", "decoder")   # the backbone; the connector is new
           for d in state_lib.model_field_diffs(saved_model.get(section, {}), current.get(section, {}),
                                                f"model.{section}", ("stage 1", "this config"))]
  if diffs:
    raise ValueError(f"init.stage1_workdir={directory} holds another backbone: " + "; ".join(diffs))
  *_, stage1_params, _, step = runs.restore_params(directory, saved_step, mesh=mesh, rules=rules)
  mine = {k: v for k, v in params.items() if k != CONNECTOR}
  theirs = {k: v for k, v in stage1_params.items() if k != CONNECTOR}
  mine_paths = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(mine)}
  their_paths = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(theirs)}
  problems = [f"{p}: missing in stage 1" for p in sorted(set(mine_paths) - set(their_paths))]
  problems += [f"{p}: only in stage 1" for p in sorted(set(their_paths) - set(mine_paths))]
  problems += [f"{p}: stage 1 {their_paths[p].shape}, this model {x.shape}"
               for p, x in sorted(mine_paths.items()) if p in their_paths and their_paths[p].shape != x.shape]
  if problems:
    raise ValueError(f"init.stage1_workdir={directory} holds another backbone: " + "; ".join(problems[:8]))
  logging.info("stage 2: backbone from %s step %d; connector freshly initialised", directory, step)
  out = dict(theirs)
  if CONNECTOR in params:
    out[CONNECTOR] = params[CONNECTOR]
  return out
