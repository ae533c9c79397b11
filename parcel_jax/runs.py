"""A trained run, ready for inference: config, budgets, model graph and parameters.

``load_run(workdir)`` restores the parameters of a checkpoint written by
``parcel_jax.train`` (only ``state['params']``: the optimizer state and data
iterator are never read) onto a mesh of the local devices, with the run's own
config from the checkpoint's JSON item. ``init_run(config)`` builds the same
object with freshly initialised parameters (tests, benchmarks).

The tools (``evaluate``, ``predict``, ``spectral``) all start from a ``Run``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from parcel_jax import budgets as budgets_lib
from parcel_jax import checkpoint as ckpt_lib
from parcel_jax import paths
from parcel_jax import sharding
from parcel_jax import config as config_lib
from parcel_jax import state as state_lib
from parcel_jax.data import pipeline
from parcel_jax.models import vlm


@dataclasses.dataclass
class Run:
  """Attributes:
    config: the run's ConfigDict, validated (``model.decoder.vocab_size`` filled in).
    model_cfg, spec: from ``config.validate_config``; ``spec.budgets`` is the trained set.
    graphdef, params: ``nnx.split`` of the model; params a pure dict of arrays on ``mesh``.
    workdir, step: where the parameters came from (None for ``init_run``).
  """
  config: ml_collections.ConfigDict
  model_cfg: vlm.ModelConfig
  spec: budgets_lib.BudgetSpec
  graphdef: nnx.GraphDef
  params: dict
  mesh: jax.sharding.Mesh
  workdir: str | None = None
  step: int | None = None

  @functools.cached_property
  def tokenizer(self):
    """The data's tokenizer (synthetic word list, or Gemma's for real data)."""
    return pipeline.build_tokenizer(self.config.data)

  @property
  def model(self) -> vlm.VLM:
    return nnx.merge(self.graphdef, self.params)

  @property
  def method(self) -> str:
    return self.spec.method

  @property
  def grid_size(self) -> int:
    return self.spec.grid_size

  @property
  def image_size(self) -> int:
    return self.model_cfg.vision.image_size

  def method_space(self) -> budgets_lib.BudgetSpec:
    """The spec widened to every budget the architecture can serve (the method's whole
    space at this grid and query bank), not only those it was trained on."""
    con = ml_collections.ConfigDict(self.config.model.connector.to_dict())
    con.budgets = ()
    return budgets_lib.BudgetSpec.from_config(con, self.grid_size)

  def label(self) -> str:
    name = paths.basename(self.workdir) if self.workdir else "init"
    return f"{self.method} ({name})"


def _mesh(config) -> jax.sharding.Mesh:
  """The run's mesh shape if it fits the local devices, else data parallel over all of them."""
  try:
    return sharding.make_mesh(config.mesh.shape)
  except ValueError as e:
    logging.warning("%s; using mesh.shape=(-1, 1, 1) instead", e)
    return sharding.make_mesh((-1, 1, 1))


def init_run(config: ml_collections.ConfigDict, *, seed: int | None = None) -> Run:
  """A Run with freshly initialised parameters (``config.seed`` unless ``seed``)."""
  config = ml_collections.ConfigDict(config.to_dict())  # validate_config fills fields in place
  model_cfg, spec = config_lib.validate_config(config)
  mesh = _mesh(config)
  seed = config.seed if seed is None else seed
  graphdef, params = state_lib.init_params(model_cfg, mesh, seed, sharding.rules_from_config(config.mesh))
  return Run(config, model_cfg, spec, graphdef, params, mesh)


def checkpoint_dir(workdir: str) -> str:
  """``workdir/checkpoints``: a local absolute path, or a URI for a gs:// workdir."""
  return paths.join(paths.normalize(workdir, "workdir"), "checkpoints")


def _checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  """A read-only manager of ``workdir``'s checkpoints; FileNotFoundError naming what is missing."""
  workdir = paths.normalize(workdir, "workdir")
  directory = checkpoint_dir(workdir)
  ckpt_lib.check_checkpoint_directory(directory, "workdir")
  with paths.filesystem_errors(workdir, "workdir"):
    if not paths.isdir(workdir):
      raise FileNotFoundError(f"workdir {workdir} does not exist")
    if not paths.isdir(directory):
      raise FileNotFoundError(f"no checkpoints in {workdir}: {directory} does not "
                              "exist (train with python -m parcel_jax.train --workdir=...)")
    return ocp.CheckpointManager(paths.to_epath(directory), options=ocp.CheckpointManagerOptions(create=False))


def _restore_config(manager: ocp.CheckpointManager, step: int | None) -> tuple[int, dict]:
  """(step, the config saved with it as a plain dict); ``step`` None: the latest."""
  directory = str(manager.directory)
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"{directory} holds no complete checkpoint")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"{directory} has no checkpoint at step {step}; complete steps: {sorted(steps)}")
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  return int(step), saved


def saved_config(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """The config ``workdir``'s checkpoint ``step`` (default: the latest) was saved with, as a
  plain dict, without building the model or reading any array (reports, checks).

  Raises:
    FileNotFoundError: as ``load_run``.
  """
  manager = _checkpoint_manager(workdir)
  try:
    return _restore_config(manager, step)
  finally:
    manager.close()


def restore_params(workdir: str, step: int | None = None, *, mesh=None, rules=None
                   ) -> tuple[ml_collections.ConfigDict, vlm.ModelConfig, budgets_lib.BudgetSpec,
                              nnx.GraphDef, dict, jax.sharding.Mesh, int]:
  """The parameters of ``workdir``'s checkpoint ``step`` (default: the latest) with the run's
  validated config: (config, model_cfg, spec, graphdef, params, mesh, step). ``mesh`` / ``rules``
  None: the run's own (or data parallel over the local devices when it does not fit).

  Raises:
    FileNotFoundError: naming the path, when the workdir, its checkpoints or the step
      are missing.
  """
  manager = _checkpoint_manager(workdir)
  try:
    step, saved = _restore_config(manager, step)
    config = ml_collections.ConfigDict(saved)
    model_cfg, spec = config_lib.validate_config(config)
    mesh = _mesh(config) if mesh is None else mesh
    rules = sharding.rules_from_config(config.mesh) if rules is None else rules
    graphdef, target = state_lib.abstract_params(model_cfg, mesh, rules)
    item = {"params": target}
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))["state"]
  finally:
    manager.close()
  logging.info("restored %s step %d (method %s)", checkpoint_dir(workdir), step, spec.method)
  return config, model_cfg, spec, graphdef, state["params"], mesh, int(step)


def load_run(workdir: str, step: int | None = None) -> Run:
  """Restores the parameters of ``workdir``'s checkpoint ``step`` (default: the latest).

  Raises:
    FileNotFoundError: as ``restore_params``.
  """
  config, model_cfg, spec, graphdef, params, mesh, step = restore_params(workdir, step)
  return Run(config, model_cfg, spec, graphdef, params, mesh,
             workdir=paths.normalize(workdir), step=step)
