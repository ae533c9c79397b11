"""Checkpoints: one Orbax ``CheckpointManager`` for model, optimizer, data and config.

A checkpoint step holds three items:
  state   {'params', 'opt_state', 'step'} (sharded arrays, restored onto the mesh)
  data    the Grain iterator state, so a resumed run sees exactly the batches it would have
  config  the run's config as JSON (checked against the current one on resume)
Saves are asynchronous. On a local disk Orbax writes into a temporary directory and
renames it only when complete; on gs:// (no atomic rename) it writes the step directory in
place and marks it complete with ``commit_success.txt``. Either way a crash mid-save leaves
the previous step as the latest.

The directory may be a local path or a gs:// URI (through ``etils.epath``; ``paths``).
Orbax 0.12.8 writes arrays (TensorStore) only to local paths and gs://, so other schemes
(s3://, az://) are refused with a ValueError. On gs:// Orbax needs two packages: gcsfs
(or tensorflow) for its files, through etils.epath, and google-cloud-storage (it asks the
bucket whether it has a hierarchical namespace before listing steps); TensorStore reaches
GCS itself with Application Default Credentials.
"""

from __future__ import annotations

import importlib.util
import json

import grain
import orbax.checkpoint as ocp
from absl import logging

from parcel_jax import paths

# Schemes Orbax can hold checkpoints on (TensorStore's kvstore: the local 'file' driver, or
# 'gcs' for gs://), and the modules Orbax imports for a scheme beyond etils.epath's own.
CHECKPOINT_SCHEMES = ("gs",)
_ORBAX_SCHEME_MODULES = {"gs": (("google.cloud.storage", "google-cloud-storage"),)}


def _module_missing(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is None
  except (ImportError, ValueError):  # a missing parent package
    return True


def check_checkpoint_directory(directory: str, flag: str) -> None:
  """ValueError (naming ``flag``) for a URI Orbax cannot hold checkpoints on, or whose packages
  are missing. Local paths: nothing to check."""
  s = paths.scheme(directory)
  if s is None:
    return
  if s not in CHECKPOINT_SCHEMES:
    raise ValueError(f"{flag}={directory}: Orbax (orbax-checkpoint 0.12.8) writes checkpoint "
                     f"arrays only to local paths and gs://, not {s}://; use a gs:// or local "
                     "workdir (a mounted bucket, e.g. gcsfuse / mountpoint-s3, is a local path)")
  missing = [pkg for module, pkg in _ORBAX_SCHEME_MODULES.get(s, ()) if _module_missing(module)]
  if missing:
    raise ValueError(f"{flag}={directory}: Orbax checkpoints on {s}:// need the package(s) "
                     f"{', '.join(missing)}, not installed (pip install {' '.join(missing)})")


class Checkpointer:
  """Thin wrapper that fixes the item names and the resume semantics."""

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True,
               flag: str = "checkpoint directory"):
    """``directory``: a local path (made absolute) or a gs:// URI; ``flag`` names where it
    came from in error messages (train.py: --workdir)."""
    self.directory = paths.normalize(directory, flag)  # str: local absolute path or the URI
    check_checkpoint_directory(self.directory, flag)
    self.path = paths.to_epath(self.directory, flag)  # what Orbax gets
    with paths.filesystem_errors(self.directory, flag):
      self._warn_incomplete()
      self.manager = ocp.CheckpointManager(
          self.path,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=keep, enable_async_checkpointing=async_save,
              cleanup_tmp_directories=True, create=True))

  def _warn_incomplete(self) -> None:
    """Warns about each interrupted save: a temporary directory (local disks), or on gs:// a
    step directory without ``commit_success.txt``."""
    if not paths.isdir(self.directory):
      return
    in_place = paths.is_uri(self.directory)
    for name in paths.listdir(self.directory):
      path = paths.join(self.directory, name)
      if not paths.isdir(path):
        continue
      if not name.isdigit() or (in_place and not paths.exists(paths.join(path, "commit_success.txt"))):
        logging.warning("ignoring incomplete checkpoint %s (an interrupted save); "
                        "resuming from the latest complete step", path)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_iterator, config) -> bool:
    """Starts an async save of ``state`` (a pytree) and the iterator at ``step``."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))
    return self.manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state: dict, data_iterator) -> dict:
    """Restores ``state`` onto the shardings of ``abstract_state`` and fills
    ``data_iterator`` in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"]

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
