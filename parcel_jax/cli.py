"""What the command-line entry points share (logging set-up)."""

from __future__ import annotations

import logging as std_logging

from absl import logging


def quiet_library_logs() -> None:
  """Keeps INFO lines from our code only; libraries (Orbax, Grain) log warnings and up."""
  def keep(record):
    return record.levelno >= std_logging.WARNING or "site-packages" not in record.pathname
  logging.get_absl_handler().addFilter(keep)
