"""Local paths and cloud URIs (gs://, s3://, ...): which is which, and how to reach either.

A *URI* is ``scheme://rest``; anything else is a local path. Cloud URIs go through
``etils.epath`` (as Orbax and Grain do), so every scheme epath knows works (gs://, s3://,
az://, hf://); local paths keep plain ``os`` semantics (``os.path.abspath``, ``os.makedirs``,
``open``). ``file:///x`` is the local path ``/x``. A scheme epath does not know (hdfs://,
memory://) is a ValueError, never a local folder named ``hdfs:``.

Each scheme needs its filesystem package (``PACKAGES``: gcsfs for gs://, s3fs for s3://;
with TensorFlow installed epath uses tf.io.gfile instead). ``makedirs`` and
``check_access``, called at a path's first touch, turn a missing package into a ValueError
naming the flag, the scheme and the package to install.

Numpy-free and JAX-free: the data sources use it inside Grain workers.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
from typing import Iterator

from etils import epath

# The package behind each scheme of etils.epath's fsspec backend.
PACKAGES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def scheme(path) -> str | None:
  """``'gs'`` for ``gs://bucket/x``; None for a local path (``file://`` included)."""
  m = _SCHEME.match(os.fspath(path))
  if m is None or m.group(1).lower() == "file":
    return None
  return m.group(1).lower()


def is_uri(path) -> bool:
  """True for a cloud URI (``gs://...``, ``s3://...``), False for a local path."""
  return scheme(path) is not None


def supported_schemes() -> tuple[str, ...]:
  """The URI schemes etils.epath can open (gs, s3, az, hf in etils 1.15)."""
  try:
    from etils.epath import register  # pylint: disable=g-import-not-at-top
    found = tuple(p.split("://")[0] for p in register._URI_PREFIXES_TO_CLS)  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    found = ()
  return found or tuple(PACKAGES)


def _local(path) -> str:
  path = os.fspath(path)
  return path[len("file://"):] if path.lower().startswith("file://") else path


def _check_scheme(path, flag: str) -> None:
  s = scheme(path)
  if s is not None and s not in supported_schemes():
    raise ValueError(f"{flag}={path}: the scheme {s}:// is not supported; use a local path or a "
                     f"URI with one of {', '.join(f'{x}://' for x in supported_schemes())}")


def normalize(path, flag: str = "path") -> str:
  """A URI unchanged (its scheme checked), a local path made absolute."""
  path = os.fspath(path)
  _check_scheme(path, flag)
  return path if is_uri(path) else os.path.abspath(_local(path))


def to_epath(path, flag: str = "path") -> epath.Path:
  """``epath.Path`` of ``path`` (local paths absolute): what Orbax's CheckpointManager takes."""
  return epath.Path(normalize(path, flag))


def join(base, *parts) -> str:
  """``os.path.join`` for local paths, ``/``-joined for URIs; a part that is itself a URI (or,
  as with os.path.join, an absolute path) replaces what came before."""
  out = os.fspath(base)
  for part in map(os.fspath, parts):
    if is_uri(part):
      out = part
    elif is_uri(out):
      out = posixpath.join(out, part)
    else:
      out = os.path.join(out, part)
  return out


def dirname(path) -> str:
  path = os.fspath(path)
  if not is_uri(path):
    return os.path.dirname(path)
  head, rest = path.split("://", 1)
  return f"{head}://{posixpath.dirname(rest.rstrip('/'))}"


def basename(path) -> str:
  """The last component (``run`` for ``gs://b/run/`` and ``/x/run/``)."""
  path = os.fspath(path)
  if is_uri(path):
    return posixpath.basename(path.split("://", 1)[1].rstrip("/"))
  return os.path.basename(os.path.normpath(path))


def _missing_package_error(path, flag: str, error: Exception) -> ValueError:
  s = scheme(path)
  package = PACKAGES.get(s, f"the fsspec implementation of {s}://")
  return ValueError(f"{flag}={path}: cannot reach {s}:// paths, the package {package} is not "
                    f"installed (pip install {package}; or install tensorflow, whose tf.io.gfile "
                    f"etils.epath then uses for gs://). Underlying error: {type(error).__name__}: {error}")


@contextlib.contextmanager
def filesystem_errors(path, flag: str) -> Iterator[None]:
  """Turns the ImportError / NotImplementedError of a URI whose filesystem package is missing
  into a ValueError naming ``flag``, the scheme and the package."""
  if not is_uri(path):
    yield
    return
  _check_scheme(path, flag)
  try:
    yield
  except (ImportError, NotImplementedError) as e:
    raise _missing_package_error(path, flag, e) from e
  except Exception as e:  # tf.io.gfile without a filesystem for the scheme
    if type(e).__name__ == "UnimplementedError":
      raise _missing_package_error(path, flag, e) from e
    raise


def check_access(path, flag: str) -> None:
  """First touch of a path to read: a URI's filesystem package must be installed (ValueError
  naming ``flag`` otherwise). Says nothing about existence; local paths: nothing to check."""
  if is_uri(path):
    with filesystem_errors(path, flag):
      epath.Path(path).exists()


def makedirs(path, flag: str = "path") -> None:
  """``os.makedirs(path, exist_ok=True)``, for URIs too (first touch: see ``filesystem_errors``)."""
  if not is_uri(path):
    os.makedirs(_local(path), exist_ok=True)
    return
  with filesystem_errors(path, flag):
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path) -> bool:
  return epath.Path(path).exists() if is_uri(path) else os.path.exists(_local(path))


def isdir(path) -> bool:
  return epath.Path(path).is_dir() if is_uri(path) else os.path.isdir(_local(path))


def listdir(path) -> list[str]:
  """Entry names (not paths), sorted."""
  if is_uri(path):
    return sorted(p.name for p in epath.Path(path).iterdir())
  return sorted(os.listdir(_local(path)))


def open_file(path, mode: str = "r", **kwargs):
  """``open`` for local paths, ``epath.Path.open`` for URIs (modes r, w, a with b)."""
  if is_uri(path):
    return epath.Path(path).open(mode, **kwargs)
  return open(_local(path), mode, **kwargs)  # pylint: disable=unspecified-encoding


def read_bytes(path) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path, encoding: str = "utf-8") -> str:
  return read_bytes(path).decode(encoding)


def write_text(path, text: str, encoding: str = "utf-8") -> None:
  """Writes (replaces) the whole file; on object stores the object appears complete or not at all."""
  with open_file(path, "wb") as f:
    f.write(text.encode(encoding))


def copy_file(src, dst) -> None:
  """Copies a file between any two of local paths and URIs (whole-file rewrite of ``dst``)."""
  data = read_bytes(src)
  with open_file(dst, "wb") as f:
    f.write(data)
