"""LLaVA-format instruction data: one JSON file + an image folder, as a random-access source.

The file is a JSON list of records::

  {"id": "...", "image": "coco/train2017/000000033471.jpg",
   "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                     {"from": "gpt", "value": "A bus."},
                     {"from": "human", "value": "What colour is it?"},
                     {"from": "gpt", "value": "White and red."}]}

``conversation`` (``data.conversation``) says what one example is:

  multi_turn       one example per record: every (human, gpt) exchange, in order; the human
                   turns (and the image) are context, every gpt turn is supervised
                   (``gemma_tokenizer.layout_example``'s ``turns``). The default.
  single_exchange  one example per (human, gpt) exchange, each with the record's image.

Turns alternate human / gpt from the first; a trailing human turn without an answer is
dropped (there is nothing to supervise after it). Prompts are the human turns without the
``<image>`` placeholder, stripped; answers the gpt turns, stripped. A record without
``image`` (or with ``"image": null``) is text-only: ``image`` is None and the example has
no visual tokens (LLaVA-1.5's mix665k holds ~6 % such records). ``image`` is relative to
the image folder (default: the JSON file's folder). The file and the folder may be local
paths or cloud URIs (gs://, s3://: ``parcel_jax.paths``). ``from`` may also be ``user`` /
``assistant``.

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
CONVERSATIONS = ("multi_turn", "single_exchange")
_HUMAN, _GPT = ("human", "user"), ("gpt", "assistant")


def check_conversation(conversation: str) -> None:
  if conversation not in CONVERSATIONS:
    raise ValueError(f"data.conversation={conversation!r} is unknown; allowed: {', '.join(CONVERSATIONS)}")


class LlavaSource:
  """Random access to (image path or None, prefix, suffix, later turns) examples of a LLaVA
  JSON file."""

  def __init__(self, path: str, image_root: str = "", conversation: str = "multi_turn"):
    check_conversation(conversation)
    self.path = path
    self.image_root = image_root or paths.dirname(paths.normalize(path))
    self.conversation = conversation
    try:
      records = json.loads(paths.read_text(path, encoding="utf-8"))
    except FileNotFoundError as e:
      raise FileNotFoundError(f"LLaVA data file {path} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not valid JSON ({e}); the whole file is unusable") from e
    if not isinstance(records, list):
      raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    self._records = records
    # (record, exchange) per example; exchange None = the whole conversation. A record
    # without a usable exchange list still gets one entry, so that its problem is reported
    # (or counted) when it is read.
    self._index: list[tuple[int, int | None]] = []
    for r, rec in enumerate(records):
      if conversation == "multi_turn":
        self._index.append((r, None))
        continue
      conv = rec.get("conversations") if isinstance(rec, dict) else None
      n = len(conv) // 2 if isinstance(conv, list) else 0
      self._index.extend((r, t) for t in range(max(n, 1)))

  def __len__(self) -> int:
    return len(self._index)

  def describe(self, index: int) -> str:
    r, t = self._index[index]
    return f"example {index} (record {r})" if t is None else f"example {index} (record {r}, exchange {t})"

  def __getitem__(self, index: int) -> dict:
    """-> dict(image: path, a list of paths (frames) or None (text-only), prefix, suffix: the first (or only) exchange,
    turns: the later (prompt, answer) exchanges, () under single_exchange)."""
    r, t = self._index[index]
    rec = self._records[r]
    if not isinstance(rec, dict):
      raise BadExample("malformed_record", f"record is a {type(rec).__name__}, not an object")
    conv = rec.get("conversations")
    if conv is None:
      raise BadExample("missing_field", "record has no 'conversations'")
    if not isinstance(conv, list) or len(conv) < 2:
      raise BadExample("malformed_record", "'conversations' must be a list of at least two turns")
    wanted = range(len(conv) // 2) if t is None else (t,)
    exchanges = [self._exchange(conv, k) for k in wanted]
    image = rec.get("image")
    frames = image if isinstance(image, list) else [image]   # a list: several frames, in order
    if image is not None and (not frames or not all(isinstance(f, str) and f for f in frames)):
      raise BadExample("malformed_record", f"'image' must be a path string or a list of them (or "
                                           f"absent for a text-only record), got {str(image)[:80]!r}")
    (prefix, suffix), *turns = exchanges
    joined = None if image is None else [paths.join(self.image_root, f) for f in frames]
    return {"image": joined if isinstance(image, list) else joined and joined[0],
            "prefix": prefix, "suffix": suffix, "turns": tuple(turns)}

  @staticmethod
  def _exchange(conv: list, t: int) -> tuple[str, str]:
    """Exchange ``t`` (turns 2t, 2t + 1) -> (prompt, answer); raises BadExample."""
    human, gpt = conv[2 * t], conv[2 * t + 1]
    for k, turn, roles in ((2 * t, human, _HUMAN), (2 * t + 1, gpt, _GPT)):
      if not isinstance(turn, dict) or turn.get("from") not in roles:
        raise BadExample("malformed_record", f"turn {k} should be an object with 'from' in "
                                             f"{roles}, got {str(turn)[:80]!r}")
      if not isinstance(turn.get("value"), str):
        raise BadExample("missing_field", f"turn {k} has no string 'value'")
    answer = gpt["value"].strip()
    if not answer:
      raise BadExample("empty_answer", f"the gpt answer (turn {2 * t + 1}) is empty")
    return human["value"].replace(IMAGE_PLACEHOLDER, "").strip(), answer

  def __repr__(self) -> str:
    return f"LlavaSource({self.path!r}, {len(self)} examples, {self.conversation})"
