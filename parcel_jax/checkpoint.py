"""Checkpoints: one Orbax ``CheckpointManager`` for model, optimizer, data and config.

A checkpoint step holds three items:
  state   {'params', 'opt_state', 'step'} (sharded arrays, restored onto the mesh)
  data    the Grain iterator state, so a resumed run sees exactly the batches it would have
  config  the run's config as JSON (checked against the current one on resume)
Saves are asynchronous; Orbax writes into a temporary directory and renames it
only when complete, so a crash mid-save leaves the previous step as the latest.
"""

from __future__ import annotations

import json
import os

import grain
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Thin wrapper that fixes the item names and the resume semantics."""

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._warn_incomplete()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True))

  def _warn_incomplete(self) -> None:
    if not os.path.isdir(self.directory):
      return
    for name in sorted(os.listdir(self.directory)):
      path = os.path.join(self.directory, name)
      if os.path.isdir(path) and not name.isdigit():
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
