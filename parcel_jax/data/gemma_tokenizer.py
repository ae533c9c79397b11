"""The Gemma tokenizer of a PaliGemma checkpoint, and PaliGemma's prompt layout.

Loads ``tokenizer.model`` (sentencepiece) or, failing that, ``tokenizer.json`` (the
``tokenizers`` library) from a checkpoint directory, or either file directly. Both give
the same ids for the same checkpoint. The path may be local or a cloud URI (gs://, s3://:
``parcel_jax.paths``; the file is read into memory). Special ids are looked up by piece
(``<pad>``, ``<eos>``, ``<bos>``, ``<unk>``; Gemma: 0, 1, 2, 3); ``special_pieces`` names the
pieces found.

PaliGemma's text layout (big_vision / the HF processor), length ``max_len``::

  text       <bos> prefix.. "\\n" suffix.. <eos> <pad>..
  ar_mask     F     F..      F    T..      T     F..     prefix (and image) bidirectional
  loss_mask   F     F..      T    T..      F     F..     positions whose target is a suffix token or EOS
  targets    text shifted left by one

A multi-turn conversation continues the suffix with ``prompt.. "\\n" answer.. <eos>`` per later
exchange (causal; loss on the answers and their EOS only): ``layout_example``'s ``turns``
(defined in ``tokenizer``: the synthetic data uses the same function).

The separator is the tokenization of "\\n" (one token in Gemma's vocabulary).
Location and segmentation tokens (``<loc0000>``..``<loc1023>``, ``<seg000>``..``<seg127>``)
are ordinary pieces of PaliGemma's vocabulary: text containing them encodes to them;
``loc_ids``/``seg_ids`` are None where the vocabulary lacks them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from parcel_jax import paths
# PaliGemma's layout is the one every source uses (tokenizer.layout_example); named here too.
from parcel_jax.data.tokenizer import (LONG_TEXT_POLICIES, TextTooLong, ids_before_eos,  # noqa: F401
                                       layout_example)

NUM_LOC, NUM_SEG = 1024, 128


def resolve_tokenizer_path(path: str) -> str:
  """A tokenizer file from a checkpoint directory (tokenizer.model first) or the file itself."""
  if paths.isdir(path):
    for name in ("tokenizer.model", "tokenizer.json"):
      candidate = paths.join(path, name)
      if paths.exists(candidate):
        return candidate
    raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json in this directory")
  if not paths.exists(path):
    raise FileNotFoundError(f"{path}: no such tokenizer file")
  return path


class GemmaTokenizer:
  """Sentencepiece- or tokenizers-backed Gemma tokenizer (picklable: Grain copies transforms)."""

  def __init__(self, path: str):
    self.path = resolve_tokenizer_path(path)
    self._load()

  def _load(self):
    if self.path.endswith(".json"):
      from tokenizers import Tokenizer  # only needed for tokenizer.json checkpoints
      self._tok = (Tokenizer.from_str(paths.read_text(self.path)) if paths.is_uri(self.path)
                   else Tokenizer.from_file(self.path))
      self._sp = None
      self._piece_to_id = self._tok.token_to_id
      self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    else:
      import sentencepiece as spm
      self._sp = (spm.SentencePieceProcessor(model_proto=paths.read_bytes(self.path))
                  if paths.is_uri(self.path) else spm.SentencePieceProcessor(model_file=self.path))
      self._tok = None
      unk = self._sp.unk_id()
      self._piece_to_id = lambda p: (None if self._sp.piece_to_id(p) == unk and p != self._sp.id_to_piece(unk)
                                     else self._sp.piece_to_id(p))
      self.vocab_size = self._sp.vocab_size()
    ids, self.special_pieces = {}, {}
    for name, pieces in (("pad", ("<pad>",)), ("eos", ("<eos>", "</s>")), ("bos", ("<bos>", "<s>")),
                         ("unk", ("<unk>",))):
      piece = next((p for p in pieces if self._piece_to_id(p) is not None), None)
      if piece is None and name != "unk":
        raise ValueError(f"{self.path}: the vocabulary has no {name} token (tried {', '.join(pieces)})")
      ids[name] = None if piece is None else self._piece_to_id(piece)
      if piece is not None:
        self.special_pieces[name] = piece
    self.pad_id, self.eos_id, self.bos_id, self.unk_id = ids["pad"], ids["eos"], ids["bos"], ids["unk"]
    self.sep_ids = tuple(self.encode("\n"))
    if not self.sep_ids:
      raise ValueError(f"{self.path}: '\\n' encodes to no token")
    self.loc_ids = self._range("<loc{:04d}>", NUM_LOC)
    self.seg_ids = self._range("<seg{:03d}>", NUM_SEG)

  def _range(self, fmt: str, n: int) -> np.ndarray | None:
    ids = [self._piece_to_id(fmt.format(i)) for i in range(n)]
    return None if any(i is None for i in ids) else np.asarray(ids, np.int32)

  def piece_id(self, piece: str) -> int | None:
    """The id of a whole vocabulary piece (e.g. ``<image>``), None if the vocabulary lacks it."""
    return self._piece_to_id(piece)

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.path = state["path"]
    self._load()

  @property
  def sep_id(self) -> int:
    """The separator token (requires "\\n" to be one token, as in Gemma)."""
    if len(self.sep_ids) != 1:
      raise ValueError(f"'\\n' encodes to {len(self.sep_ids)} tokens in {self.path}")
    return self.sep_ids[0]

  def encode(self, text: str) -> list[int]:
    """Text -> ids, without BOS/EOS."""
    if self._sp is not None:
      return list(self._sp.encode(text))
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    """Ids up to the first EOS, skipping PAD and BOS, -> text."""
    out = [i for i in ids_before_eos(ids, self.eos_id, skip=(self.pad_id, self.bos_id))
           if 0 <= i < self.vocab_size]
    if self._sp is not None:
      return self._sp.decode(out)
    return self._tok.decode(out, skip_special_tokens=False)

  def loc_token(self, value: float) -> str:
    """A coordinate in [0, 1] -> its location token (PaliGemma: 1024 bins)."""
    if self.loc_ids is None:
      raise ValueError(f"{self.path}: the vocabulary has no <locNNNN> tokens")
    b = int(np.clip(np.floor(value * NUM_LOC), 0, NUM_LOC - 1))
    return f"<loc{b:04d}>"

  def box_tokens(self, ymin: float, xmin: float, ymax: float, xmax: float) -> str:
    """A normalised box as PaliGemma writes it: four location tokens, y before x."""
    return "".join(self.loc_token(v) for v in (ymin, xmin, ymax, xmax))

  def __repr__(self) -> str:
    return f"GemmaTokenizer({self.path!r}, vocab_size={self.vocab_size})"


