"""Image decoding as PaliGemma does it, and the bad-data vocabulary of the real sources.

``decode_image``: any format Pillow reads (PNG, JPEG, GIF, WebP, BMP, ...) -> RGB
(grayscale is replicated, palette images are expanded, an alpha channel is dropped),
resized to ``size x size`` without keeping the aspect ratio (bilinear, as big_vision's
``resize``), scaled to [-1, 1] float32: (size, size, 3).

Numpy/Pillow only (Grain workers never import JAX).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np

from parcel_jax import paths

# Every way an example can be bad; ``skip`` counts them by these names.
BAD_KINDS = (
    "missing_image",      # the image file does not exist
    "corrupt_image",      # truncated or damaged image data
    "unreadable_image",   # not an image format Pillow can read
    "malformed_record",   # a JSON / jsonl line that does not parse, or has the wrong structure
    "missing_field",      # a required field is absent (or not a string)
    "empty_answer",       # the answer (suffix) is empty
    "text_too_long",      # does not fit data.max_text_len (under long_text=reject, or even truncated)
)


# Signatures of common formats: a file that starts like one but does not open is damaged,
# not of an unknown format.
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
               b"MM\x00*")


def _looks_like_image(data: bytes) -> bool:
  return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


class BadExample(Exception):
  """One example cannot be used. ``kind`` is one of BAD_KINDS."""

  def __init__(self, kind: str, message: str):
    if kind not in BAD_KINDS:
      raise ValueError(f"unknown bad-data kind {kind!r}")
    super().__init__(message)
    self.kind = kind
    self.message = message


def _read_image_file(path: str) -> bytes:
  if not paths.is_uri(path):
    if not os.path.exists(path):
      raise BadExample("missing_image", f"image file {path} does not exist")
    try:
      with open(path, "rb") as f:
        return f.read()
    except OSError as e:
      raise BadExample("missing_image", f"image file {path} cannot be read ({e})") from e
  try:  # a URI (gs://, s3://): one read, no separate existence check
    return paths.read_bytes(path)
  except FileNotFoundError as e:
    raise BadExample("missing_image", f"image file {path} does not exist") from e
  except OSError as e:
    raise BadExample("missing_image", f"image file {path} cannot be read ({e})") from e


def decode_image(data: bytes | str, size: int) -> np.ndarray:
  """Image bytes, or a file path / cloud URI (gs://, s3://) -> (size, size, 3) float32 in
  [-1, 1]. Raises BadExample."""
  from PIL import Image, UnidentifiedImageError

  where = data if isinstance(data, str) else "image bytes"
  if isinstance(data, str):
    data = _read_image_file(data)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Pillow warns on some damaged files before failing
      img = Image.open(io.BytesIO(data))
  except UnidentifiedImageError as e:
    if _looks_like_image(data):
      raise BadExample("corrupt_image", f"{where} starts like an image file but is damaged") from e
    raise BadExample("unreadable_image", f"{where} is not an image format Pillow can read") from e
  except Exception as e:  # noqa: BLE001 - Pillow raises many types on damaged headers
    raise BadExample("corrupt_image", f"{where} has a damaged header ({type(e).__name__}: {e})") from e
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      img.load()  # decodes fully: a truncated file fails here
      if img.mode == "P":  # palette: expand (with transparency) before dropping alpha
        img = img.convert("RGBA")
      img = img.convert("RGB")
      img = img.resize((size, size), Image.BILINEAR)
  except Exception as e:  # noqa: BLE001
    raise BadExample("corrupt_image", f"{where} ({img.format}, {img.size[0]}x{img.size[1]}) is "
                                      f"truncated or damaged ({type(e).__name__}: {e})") from e
  arr = np.asarray(img, dtype=np.float32)
  return arr / 127.5 - 1.0


def check_frame_count(count: int, max_frames: int) -> None:
  """Raises BadExample (malformed_record) when an example has more frames than the config
  allows (``data.max_frames``), before any of them is decoded."""
  if count > max_frames:
    raise BadExample("malformed_record", f"{count} images (frames), more than data.max_frames="
                                         f"{max_frames}; raise data.max_frames or drop frames")


def pad_frames(image: np.ndarray, max_frames: int) -> tuple[np.ndarray, np.ndarray | None]:
  """An example's image (S, S, 3) or frames (T, S, S, 3) -> the model's input at
  ``data.max_frames``: with max_frames = 1 the image (S, S, 3) and no frame mask; else frames
  (max_frames, S, S, 3) (the real T first, zeros after) and a frame mask (max_frames,) bool.
  Raises BadExample when T > max_frames."""
  frames = image if image.ndim == 4 else image[None]
  check_frame_count(len(frames), max_frames)
  if max_frames == 1:
    return frames[0], None
  padded = np.zeros((max_frames, *frames.shape[1:]), frames.dtype)
  padded[:len(frames)] = frames
  return padded, np.arange(max_frames) < len(frames)
