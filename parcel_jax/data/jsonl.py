"""big_vision-style jsonl: one JSON object per line with an image path, a prefix and a suffix.

  {"image": "images/0001.jpg", "prefix": "caption en", "suffix": "A dog on a beach."}
  {"images": ["clip/f0.jpg", "clip/f1.jpg"], "prefix": "what happens", "suffix": "It falls."}

A list of images (under ``"images"``, or a list under the image field) is one example of
several frames, in order (``data.max_frames``).

Field names are configurable (``data.image_key``, ``data.prefix_key``, ``data.suffix_key``);
image paths are relative to the image folder (default: the jsonl file's folder); both may
be local paths or cloud URIs (gs://, s3://: ``parcel_jax.paths``). Blank
lines are ignored; every other line is one example, parsed on access, so a malformed line
is reported (or skipped) as that example, naming the file and the line number.
"""

from __future__ import annotations

import json

import numpy as np

from parcel_jax import paths
from parcel_jax.data.images import BadExample

FRAMES_KEY = "images"  # a list of image paths: one example of several frames


class JsonlSource:
  """Random access to (image path, prefix, suffix) examples of a jsonl file."""

  def __init__(self, path: str, image_root: str = "", *, image_key: str = "image",
               prefix_key: str = "prefix", suffix_key: str = "suffix"):
    self.path = path
    self.image_root = image_root or paths.dirname(paths.normalize(path))
    self.keys = (image_key, prefix_key, suffix_key)
    try:
      data = paths.read_bytes(path)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"jsonl data file {path} does not exist") from e
    starts, lines = [], []
    pos = 0
    for n, line in enumerate(data.split(b"\n")):
      if line.strip():
        starts.append(pos)
        lines.append(n + 1)
      pos += len(line) + 1
    self._data = data
    self._starts = np.asarray(starts, np.int64)
    self._lines = np.asarray(lines, np.int64)

  def __len__(self) -> int:
    return len(self._starts)

  def describe(self, index: int) -> str:
    return f"example {index} (line {int(self._lines[index])})"

  def __getitem__(self, index: int) -> dict:
    start = int(self._starts[index])
    end = self._data.find(b"\n", start)
    raw = self._data[start:end if end >= 0 else len(self._data)]
    try:
      rec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise BadExample("malformed_record", f"not valid JSON ({e})") from e
    if not isinstance(rec, dict):
      raise BadExample("malformed_record", f"a line must hold a JSON object, got {type(rec).__name__}")
    image_key, prefix_key, suffix_key = self.keys
    for key in self.keys[1:]:
      if not isinstance(rec.get(key), str):
        raise BadExample("missing_field", f"no string field {key!r} (fields: {sorted(rec)})")
    image = rec[image_key] if image_key in rec else rec.get(FRAMES_KEY)
    if isinstance(image, list):   # frames
      if not image or not all(isinstance(f, str) and f for f in image):
        raise BadExample("malformed_record", f"a list of images must hold one or more paths, "
                                             f"got {str(image)[:80]!r}")
    elif not isinstance(image, str):
      raise BadExample("missing_field", f"no string field {image_key!r} nor a list "
                                        f"{FRAMES_KEY!r} (fields: {sorted(rec)})")
    if not rec[suffix_key].strip():
      raise BadExample("empty_answer", f"field {suffix_key!r} is empty")
    join = lambda p: paths.join(self.image_root, p)
    return {"image": [join(f) for f in image] if isinstance(image, list) else join(image),
            "prefix": rec[prefix_key].strip(), "suffix": rec[suffix_key].strip()}

  def __repr__(self) -> str:
    return f"JsonlSource({self.path!r}, {len(self)} examples)"
