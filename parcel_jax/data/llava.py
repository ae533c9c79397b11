"""LLaVA-format instruction data: one JSON file + an image folder, as a random-access source.

The file is a JSON list of records::

  {"id": "...", "image": "coco/train2017/000000033471.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                     {"from": "gpt", "value": "A bus."},
                     {"from": "human", "value": "What colour is it?"},
                     {"from": "gpt", "value": "White and red."}]}

Every (human, gpt) exchange becomes one example with the record's image: prefix = the
human turn without the ``<image>`` placeholder (stripped), suffix = the gpt turn
(stripped). ``image`` is relative to the image folder (default: the JSON file's folder).
The file and the folder may be local paths or cloud URIs (gs://, s3://: ``parcel_jax.paths``).
``from`` may also be ``user`` / ``assistant``.

The file is parsed once, at construction (a file that is not valid JSON, or not a list,
fails then, naming the file and the position). Problems of single records are raised on
access as ``images.BadExample`` with a kind (``malformed_record``, ``missing_field``,
``empty_answer``), so the pipeline can apply ``data.on_error``; a malformed record counts
as one example.
"""

from __future__ import annotations

import json

from parcel_jax import paths
from parcel_jax.data.images import BadExample

IMAGE_PLACEHOLDER = "<image>"
_HUMAN, _GPT = ("human", "user"), ("gpt", "assistant")


class LlavaSource:
  """Random access to (image path, prefix, suffix) examples of a LLaVA JSON file."""

  def __init__(self, path: str, image_root: str = ""):
    self.path = path
    self.image_root = image_root or paths.dirname(paths.normalize(path))
    try:
      records = json.loads(paths.read_text(path, encoding="utf-8"))
    except FileNotFoundError as e:
      raise FileNotFoundError(f"LLaVA data file {path} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not valid JSON ({e}); the whole file is unusable") from e
    if not isinstance(records, list):
      raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    self._records = records
    # (record, exchange) per example; a record without a usable exchange list still gets
    # one entry, so that its problem is reported (or counted) when it is read.
    self._index: list[tuple[int, int]] = []
    for r, rec in enumerate(records):
      conv = rec.get("conversations") if isinstance(rec, dict) else None
      n = len(conv) // 2 if isinstance(conv, list) else 0
      self._index.extend((r, t) for t in range(max(n, 1)))

  def __len__(self) -> int:
    return len(self._index)

  def describe(self, index: int) -> str:
    r, t = self._index[index]
    return f"example {index} (record {r}, exchange {t})"

  def __getitem__(self, index: int) -> dict:
    r, t = self._index[index]
    rec = self._records[r]
    if not isinstance(rec, dict):
      raise BadExample("malformed_record", f"record is a {type(rec).__name__}, not an object")
    conv = rec.get("conversations")
    if conv is None:
      raise BadExample("missing_field", "record has no 'conversations'")
    if not isinstance(conv, list) or len(conv) < 2:
      raise BadExample("malformed_record", "'conversations' must be a list of at least two turns")
    human, gpt = conv[2 * t], conv[2 * t + 1]
    for k, turn, roles in ((2 * t, human, _HUMAN), (2 * t + 1, gpt, _GPT)):
      if not isinstance(turn, dict) or turn.get("from") not in roles:
        raise BadExample("malformed_record", f"turn {k} should be an object with 'from' in "
                                             f"{roles}, got {str(turn)[:80]!r}")
      if not isinstance(turn.get("value"), str):
        raise BadExample("missing_field", f"turn {k} has no string 'value'")
    image = rec.get("image")
    if not isinstance(image, str) or not image:
      raise BadExample("missing_field", "record has no 'image' (text-only records are not supported)")
    prefix = human["value"].replace(IMAGE_PLACEHOLDER, "").strip()
    suffix = gpt["value"].strip()
    if not suffix:
      raise BadExample("empty_answer", "the gpt answer is empty")
    return {"image": paths.join(self.image_root, image), "prefix": prefix, "suffix": suffix}

  def __repr__(self) -> str:
    return f"LlavaSource({self.path!r}, {len(self)} examples)"
