r"""Mixed-budget batched inference with an image-feature cache.

One checkpoint serves every visual-token budget. ``Server.serve(requests)`` answers a list
of requests (image or frames, question, budget: an int or ``"auto"``) with KV-cache greedy
decoding:

  1. Each image file is read and hashed (sha256 of its bytes). Images already in the
     ``FeatureCache`` are not decoded or encoded again (a hit); the others are encoded by
     the ViT in batches of ``batch_size`` (padded: one compiled encoder). A method whose
     ViT input depends on the budget (``BudgetSpec.encoding_bucket``) caches and encodes an
     image once per such encoding, an ``"auto"`` request's once its budget is chosen (its
     policy is given no features; a cascade's later passes encode at their budget).
  2. ``"auto"`` budgets are chosen by the server's ``policy(request, features) -> budget``
     (``smallest_budget_policy``, ``policy_from_scores``, ``router_policy``), or by a
     ``policies.Cascade``: the request is answered at the ladder's first budget and, while
     the answer's confidence is below the threshold, again at the next budget on the same
     cached features (the ViT runs once; each pass is a decoder run at its budget).
  3. Requests are grouped by the bucket that serves their budget (``BudgetSpec.bucket`` of
     the method's whole space: at grid 16 PARCEL has six, 4x4+0q .. 8x8+192q), and each
     group runs in batches of ``batch_size`` rows with per-row budget masks: requests of
     different budgets share one compiled prefill and decode program. Prompts are
     left-padded to ``data.max_text_len`` and short batches repeat their first row, so the
     shapes never change: one program per bucket (per bucket and frame count with frames).
     A row's answer equals that request decoded alone at its compact bucket (masked slots
     and padding are invisible).
  4. A bad request (unknown or out-of-space budget, missing or unreadable image, more frames
     than ``data.max_frames``, empty or over-long question, malformed line) becomes an error
     record naming its line and id; every other request is still answered.

Several frames (video, or several images) per request, ``"images": [...]`` (or a list under
``"image"``, as the jsonl data source reads them): every frame is one cache entry (a frame
shared by requests is encoded once), encoded and connected at the request's budget, and the
frames' tokens are concatenated in order (T*B visual tokens), as ``generation.generate`` on
(T, S, S, 3). Groups are then by bucket and frame count (see ``Server._decode``).

``grouping="budget"`` instead batches one budget at a time at its compact shape (exactly B
visual tokens, one program per distinct budget): the baseline of
``benchmarks/mixed_budget.py``.

The command line is ``python -m parcel_jax.predict --workdir=RUN --requests=FILE.jsonl
--out=ANSWERS.jsonl``; each line ``{"id", "image", "question", "budget"}``, or ``"images": [...]``
in place of ``"image"`` for frames.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import time
from typing import Callable, Sequence

import numpy as np
from absl import logging

from parcel_jax import budgets as budgets_lib
from parcel_jax import evaluation
from parcel_jax import generation
from parcel_jax import policies
from parcel_jax import router as router_lib
from parcel_jax import scores as scores_lib
from parcel_jax.data import images as images_lib
from parcel_jax.data import jsonl

AUTO = "auto"
FIELDS = ("id", "image", "question", "budget")
FRAMES_FIELD = jsonl.FRAMES_KEY       # "images": frames, in place of "image"
GROUPINGS = ("bucket", "budget")


@dataclasses.dataclass(frozen=True)
class Request:
  """One question about one image or several (frames, in order). ``line``: 1-based line in
  the requests file (or the position in a list); ``image``: a path, or a sequence of paths
  for frames; ``budget``: visual tokens, or ``"auto"`` (the server's policy)."""
  line: int
  id: object
  image: str | Sequence[str]
  question: str
  budget: int | str

  @property
  def frames(self) -> tuple[str, ...]:
    """The image paths in frame order (one for a single image)."""
    return (self.image,) if isinstance(self.image, str) else tuple(self.image)

  def name(self) -> str:
    return describe(self.line, self.id)


def describe(line: int, request_id) -> str:
  return f"request line {line} (id {request_id!r})"


class RequestError(ValueError):
  """A request that cannot be served; the message names its line and id."""

  def __init__(self, line: int, request_id, message: str):
    super().__init__(f"{describe(line, request_id)}: {message}")
    self.line, self.id, self.reason = line, request_id, message

  def record(self) -> dict:
    return {"id": self.id, "line": self.line, "error": self.reason}


def parse_request(obj, line: int, base_dir: str = "") -> Request:
  """A request from a decoded JSON object; RequestError naming ``line`` and the id.

  The image is ``"image"`` (a path, or a list of paths: frames) or ``"images"`` (a list of
  paths, or one), as the jsonl data source reads them; a one-path list is a single image.
  Only the fields' types are checked here; the budget's space, the images, the number of
  frames and the question's length are checked by the server (they depend on the model)."""
  rid = obj.get("id") if isinstance(obj, dict) else None
  if not isinstance(obj, dict):
    raise RequestError(line, rid, f"expected a JSON object with fields {list(FIELDS)}, got {type(obj).__name__}")
  missing = [k for k in FIELDS if k not in obj and not (k == "image" and FRAMES_FIELD in obj)]
  if missing:
    raise RequestError(line, rid, f"missing field(s) {missing}; a request has {list(FIELDS)}")
  unknown = sorted(set(obj) - set(FIELDS) - {FRAMES_FIELD})
  if unknown:
    raise RequestError(line, rid, f"unknown field(s) {unknown}; a request has {list(FIELDS)} "
                                  f"({FRAMES_FIELD!r} in place of 'image' for frames)")
  if "image" in obj and FRAMES_FIELD in obj:
    raise RequestError(line, rid, f"both 'image' and {FRAMES_FIELD!r}; give one (a list of paths for frames)")
  field = "image" if "image" in obj else FRAMES_FIELD
  image, question, budget = obj[field], obj["question"], obj["budget"]
  frames = image if isinstance(image, list) else [image]
  if not frames or not all(isinstance(p, str) and p for p in frames):
    raise RequestError(line, rid, f"{field!r} must be a non-empty path or a list of one or more paths "
                                  f"(frames), got {str(image)[:80]!r}")
  if not isinstance(question, str) or not question.strip():
    raise RequestError(line, rid, f"'question' is empty ({question!r})")
  if budget != AUTO and (isinstance(budget, bool) or not isinstance(budget, int)):
    raise RequestError(line, rid, f"'budget' must be an integer or {AUTO!r}, got {budget!r}")
  paths = tuple(p if os.path.isabs(p) or not base_dir else os.path.join(base_dir, p) for p in frames)
  return Request(line, rid, paths[0] if len(paths) == 1 else paths, question, budget)


def read_requests(path: str) -> list[Request | RequestError]:
  """Every non-blank line of a JSONL file as a Request, or a RequestError for a bad line
  (kept in place so that it is reported, not dropped). Relative image paths are resolved
  against the file's directory. FileNotFoundError if ``path`` does not exist."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"requests file {path} does not exist")
  base_dir = os.path.dirname(os.path.abspath(path))
  out = []
  with open(path) as f:
    for line, text in enumerate(f, 1):
      if not text.strip():
        continue
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        out.append(RequestError(line, None, f"not valid JSON ({e})"))
        continue
      try:
        out.append(parse_request(obj, line, base_dir))
      except RequestError as e:
        out.append(e)
  return out


# ---------------------------------------------------------------- budget policies

# features: the request's ViT features, (g, g, Dv) for one image, (T, g, g, Dv) for frames;
# None for a method that encodes per budget (they depend on the budget being chosen).
Policy = Callable[[Request, np.ndarray | None], int]


def smallest_budget_policy(budgets: Sequence[int]) -> Policy:
  """``"auto"`` -> the smallest of ``budgets`` (e.g. the run's trained set), whatever the image.

  A placeholder that knows nothing about the request: the cheapest answer. Use
  ``policy_from_scores`` when per-example eval scores exist, ``router_policy`` or a
  ``policies.Cascade`` to choose per request."""
  smallest = int(min(budgets))
  return lambda request, features: smallest


def policy_from_scores(scores: dict, tolerance: float = 0.01) -> Policy:
  """``"auto"`` -> the smallest budget whose overall fixed-budget exact match on held-out
  per-example scores (``scores.load``) is within ``tolerance`` of the best budget's.

  One budget for every request, chosen from measured accuracy rather than blindly; it
  does not look at the request or its features."""
  curve = scores_lib.fixed_budget_curve(scores)
  best = max(row["accuracy"]["overall"] for row in curve)
  chosen = min(row["budget"] for row in curve if row["accuracy"]["overall"] >= best - tolerance)
  logging.info("auto budget from per-example scores: B=%d (best fixed-budget exact match %.3f, "
               "tolerance %.3f)", chosen, best, tolerance)
  return lambda request, features: chosen


def router_policy(router: router_lib.Router, tokenizer, threshold: float | None = None) -> Policy:
  """``"auto"`` -> the budget a trained ``router.Router`` picks from the image's pooled
  features and the question's prompt (``threshold``: None = the router's own).

  The router is fit on one image's features; a request of several frames is refused (a
  ValueError, which the server reports as that request's error) rather than guessed at."""
  def choose(request, features):
    if features is not None and np.ndim(features) == 4:
      raise ValueError(f"the router reads one image's features (g, g, Dv); this request has "
                       f"{len(features)} frames")
    return router.choose(features, generation.prompt_tokens(request.question, tokenizer), threshold)
  return choose


# ---------------------------------------------------------------- feature cache

class FeatureCache:
  """ViT features (g, g, Dv) by image content hash (sha256 of the file bytes) and, for a
  method that encodes per budget, the encoding they are for (``key``); least recently used
  evicted beyond ``max_entries``. ``hits`` / ``misses`` count lookups."""

  def __init__(self, max_entries: int = 4096):
    if max_entries < 1:
      raise ValueError(f"max_entries must be >= 1, got {max_entries}")
    self.max_entries = max_entries
    self._entries: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    self.hits = self.misses = 0

  @staticmethod
  def key(data: bytes, encoding: budgets_lib.Bucket | None = None) -> str:
    """The entry of an image file's features; ``encoding``: ``BudgetSpec.encoding_bucket`` of
    the budget they are for (None for a method whose features serve every budget)."""
    digest = hashlib.sha256(data).hexdigest()
    return digest if encoding is None else f"{digest}@{encoding}"

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def __len__(self) -> int:
    return len(self._entries)

  def lookup(self, key: str) -> bool:
    """Counts a hit or a miss for ``key``; True on a hit."""
    hit = key in self._entries
    if hit:
      self.hits += 1
      self._entries.move_to_end(key)
    else:
      self.misses += 1
    return hit

  def get(self, key: str) -> np.ndarray:
    return self._entries[key]

  def put(self, key: str, features: np.ndarray) -> None:
    self._entries[key] = features
    self._entries.move_to_end(key)
    while len(self._entries) > self.max_entries:
      self._entries.popitem(last=False)


# ---------------------------------------------------------------- encode and decode rows

def encode_batches(run, images: Sequence[np.ndarray], batch_size: int,
                   encoding: budgets_lib.Bucket | None = None) -> list[np.ndarray]:
  """ViT features (g, g, Dv) of ``images`` (each (S, S, 3)), ``batch_size`` at a time
  (the last batch padded with zeros: one compiled encoder); ``encoding``: see
  ``evaluation.encode_images``."""
  out = []
  size = run.image_size
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    batch = np.zeros((batch_size, size, size, 3), np.float32)
    batch[:len(chunk)] = np.stack(chunk)
    features = np.asarray(evaluation.encode_images(run.graphdef, run.params, batch, encoding))
    out.extend(features[:len(chunk)])
  return out


def decode_length(run, max_new_tokens: int | None = None) -> int:
  """Decode steps a batch runs: ``max_new_tokens``, else ``data.max_text_len`` minus the
  shortest prompt ([BOS, SEP])."""
  return max_new_tokens or max(int(run.config.data.max_text_len) - 2, 1)


def decode_rows(run, features: Sequence[np.ndarray], prompts: Sequence[np.ndarray], budgets: Sequence[int],
                *, bucket: budgets_lib.Bucket, batch_size: int, max_new_tokens: int | None = None,
                keep_logits: bool = False) -> list[dict]:
  """Greedy answers of up to ``batch_size`` rows, each at its own budget in ``bucket``.

  Prompts are left-padded to ``data.max_text_len`` and the batch is filled up with its first
  row, so every call for a bucket has the same shapes (one compiled program). A row's answer
  is cut at its first EOS or at ``max_new_tokens`` (None: ``data.max_text_len`` minus its
  prompt, as ``generation.generate``).

  Args:
    features: per row (g, g, Dv), or (T, g, g, Dv) for T frames (every row the same shape);
      prompts: per row ``[BOS, ..., SEP]`` ids; budgets: per row.
  Returns: per row ``{"ids" (n,) int32 answer tokens (EOS included when emitted), "answer"
  text, "answer_prob", "min_token_prob" (product / minimum of their probabilities),
  "logits" (n, vocab) with keep_logits}``.
  """
  if not 0 < len(prompts) <= batch_size:
    raise ValueError(f"decode_rows takes 1..{batch_size} rows, got {len(prompts)}")
  shapes = sorted({np.shape(f) for f in features})
  if len(shapes) > 1:
    raise ValueError(f"decode_rows takes rows of one feature shape (one frame count), got {shapes}")
  prompt_len = int(run.config.data.max_text_len)
  fill = lambda rows: list(rows) + [rows[0]] * (batch_size - len(rows))   # fixed batch: one program
  prefix = np.zeros((batch_size, prompt_len), np.int32)
  mask = np.zeros((batch_size, prompt_len), bool)
  for i, prompt in enumerate(fill(prompts)):          # left-padded: the SEP is last
    prefix[i, prompt_len - len(prompt):] = prompt
    mask[i, prompt_len - len(prompt):] = True
  out = generation.decode_batch(run, np.stack(fill(features)), prefix, mask,
                                np.asarray(fill(budgets), np.int32), bucket=bucket,
                                max_new_tokens=decode_length(run, max_new_tokens), keep_logits=keep_logits)
  eos_id = run.tokenizer.eos_id
  rows = []
  for i, prompt in enumerate(prompts):
    limit = max_new_tokens or max(prompt_len - len(prompt), 1)
    tokens = out["tokens"][i, :limit]
    eos = np.flatnonzero(tokens == eos_id)
    n = int(eos[0]) + 1 if eos.size else limit     # answer tokens, EOS included
    logp = out["logprobs"][i, :n].astype(np.float64)
    row = {"ids": tokens[:n].copy(), "answer": run.tokenizer.decode(tokens.tolist()),
           "answer_prob": float(np.exp(logp.sum())), "min_token_prob": float(np.exp(logp.min()))}
    if keep_logits:
      row["logits"] = out["logits"][i, :n]
    rows.append(row)
  return rows


# ---------------------------------------------------------------- the server

@dataclasses.dataclass
class ServeStats:
  """What one ``serve`` call did."""
  requests: int = 0
  answered: int = 0
  errors: int = 0
  cache_hits: int = 0
  images_encoded: int = 0
  batches: int = 0
  visual_tokens: int = 0          # summed budget x frames of every decoder pass (a cascade's all count)
  decoder_passes: int = 0         # rows decoded: one per answered request, more in a cascade
  programs: set = dataclasses.field(default_factory=set)  # decode shapes (bucket, frames) used
  seconds: float = 0.0

  @property
  def requests_per_s(self) -> float:
    return self.requests / max(self.seconds, 1e-9)

  @property
  def visual_tokens_per_s(self) -> float:
    return self.visual_tokens / max(self.seconds, 1e-9)

  def line(self) -> str:
    return (f"{self.requests} requests ({self.answered} answered, {self.errors} errors) in "
            f"{self.seconds:.2f} s: {self.requests_per_s:.1f} requests/s, "
            f"{self.visual_tokens_per_s:.0f} visual tokens/s; image cache {self.cache_hits} hits, "
            f"{self.images_encoded} encoded; {self.batches} batches, {len(self.programs)} decode programs"
            + (f"; {self.decoder_passes} decoder passes (cascade)" if self.decoder_passes > self.answered else ""))


@dataclasses.dataclass
class _Item:
  """A request on its way through ``serve``."""
  pos: int
  request: Request
  prompt: np.ndarray
  data: tuple[bytes, ...]               # the image files, one per frame
  budget: int | None = None             # None: "auto", not chosen yet
  cached: bool | None = None            # its first features (every frame's) came from the cache
  feature_keys: tuple[str, ...] | None = None   # the ``FeatureCache.key`` of each frame's features
  features: np.ndarray | None = None    # (g, g, Dv), or (T, g, g, Dv) for frames; held from
                                        # lookup to the last decoder pass
  cascade: list | None = None           # under a Cascade: one entry per pass so far

  @property
  def frames(self) -> int:
    return len(self.data)


class Server:
  """Serves requests for one run (``runs.Run``); see the module docstring.

  Args:
    batch_size: rows per encoder and decoder batch (every batch is padded to it).
    max_new_tokens: answer tokens at most; None: ``data.max_text_len`` minus the prompt,
      per request (as ``generation.generate``).
    policy: ``policy(request, features) -> budget`` for ``"auto"`` requests (features
      (g, g, Dv), or (T, g, g, Dv) for frames), or a ``policies.Cascade`` (its budgets must
      be in the method's space);
      None: ``smallest_budget_policy`` of the run's trained budgets. A method that encodes
      per budget has no features before the budget is chosen: the policy gets None.
    cache: a ``FeatureCache`` (shared across calls; None: a new one).
    grouping: ``"bucket"`` (mixed budgets per batch) or ``"budget"`` (one budget per batch,
      compact shapes).
    keep_logits: also return the logits each answer token was chosen from (tests).
  """

  def __init__(self, run, *, batch_size: int = 8, max_new_tokens: int | None = None,
               policy: Policy | None = None, cache: FeatureCache | None = None,
               grouping: str = "bucket", keep_logits: bool = False):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if grouping not in GROUPINGS:
      raise ValueError(f"grouping={grouping!r} is unknown; allowed: {', '.join(GROUPINGS)}")
    if max_new_tokens is not None and max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    self.run, self.batch_size, self.grouping, self.keep_logits = run, batch_size, grouping, keep_logits
    self.space = run.method_space()
    self.policy = policy or smallest_budget_policy(run.spec.budgets)
    if isinstance(self.policy, policies.Cascade):
      bad = [b for b in self.policy.budgets if b not in self.space.budgets]
      if bad:
        raise ValueError(f"cascade budget(s) {bad} are not valid for method {run.method!r}; allowed: "
                         f"{budgets_lib._describe(self.space.budgets)}")
    self.cache = cache if cache is not None else FeatureCache()
    self.max_new_tokens = max_new_tokens
    self.prompt_len = int(run.config.data.max_text_len)
    self.max_frames = int(run.config.data.get("max_frames", 1))   # frames per request at most
    self.decode_len = decode_length(run, max_new_tokens)
    self.stats = ServeStats()
    self._images: dict[str, np.ndarray | str] = {}   # during ``serve``: see ``_image``

  # ---------------------------------------------------------------- checks

  def check_budget(self, request: Request, budget) -> int:
    """``budget`` as an int in the method's space; RequestError naming the request if not."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
      raise RequestError(request.line, request.id, f"budget {budget!r} is not an integer")
    if int(budget) not in self.space.budgets:
      raise RequestError(request.line, request.id,
                         f"budget {int(budget)} is not valid for method {self.run.method!r}; "
                         f"allowed: {budgets_lib._describe(self.space.budgets)}")
    return int(budget)

  def _read_frames(self, request: Request) -> tuple[bytes, ...]:
    """The bytes of the request's image files, in frame order; RequestError naming the request
    when there are more frames than ``data.max_frames`` (before any file is read) or a file
    is missing."""
    try:
      images_lib.check_frame_count(len(request.frames), self.max_frames)
    except images_lib.BadExample as e:
      raise RequestError(request.line, request.id, e.message) from e
    try:
      return tuple(generation.read_file(path) for path in request.frames)
    except OSError as e:                      # missing, a directory, unreadable
      raise RequestError(request.line, request.id, str(e)) from e

  def _prompt(self, request: Request) -> np.ndarray:
    prompt = generation.prompt_tokens(request.question, self.run.tokenizer)
    if len(prompt) > self.prompt_len:
      raise RequestError(request.line, request.id,
                         f"the question is {len(prompt)} tokens with BOS and SEP; at most "
                         f"data.max_text_len = {self.prompt_len}")
    return prompt

  def _bucket(self, budget: int) -> budgets_lib.Bucket:
    if self.grouping == "bucket":
      return self.space.bucket(budget)
    return self.space.compact_bucket(budget)

  # ---------------------------------------------------------------- decoding

  def _decode_group(self, bucket: budgets_lib.Bucket, items: list[_Item], results: list) -> None:
    """One decoder pass for every item (all served by ``bucket``, all of one frame count),
    ``batch_size`` rows at a time; a record per item in ``results`` (a cascade's earlier
    record is replaced)."""
    for start in range(0, len(items), self.batch_size):
      chunk = items[start:start + self.batch_size]
      rows = decode_rows(self.run, [item.features for item in chunk], [item.prompt for item in chunk],
                         [item.budget for item in chunk], bucket=bucket, batch_size=self.batch_size,
                         max_new_tokens=self.max_new_tokens, keep_logits=self.keep_logits)
      self.stats.batches += 1
      self.stats.programs.add((bucket, chunk[0].frames))
      for item, row in zip(chunk, rows):
        record = {"id": item.request.id, "line": item.request.line, "budget": item.budget,
                  "answer": row["answer"], "answer_prob": row["answer_prob"],
                  "min_token_prob": row["min_token_prob"], "bucket": str(bucket), "cached": item.cached}
        if item.frames > 1:
          record["frames"] = item.frames
        if item.cascade is not None:
          item.cascade.append({"budget": item.budget, "answer_prob": row["answer_prob"],
                               "min_token_prob": row["min_token_prob"]})
          record["cascade"] = list(item.cascade)
        if self.keep_logits:
          record["logits"] = row["logits"]
        results[item.pos] = record
        self.stats.decoder_passes += 1
        self.stats.visual_tokens += item.budget * item.frames

  def _decode(self, items: list[_Item], results: list) -> None:
    """Decodes every item at its budget, grouped by bucket and frame count; then a cascade's
    items whose answer is not confident enough go again at their next budget (same
    features, unless the method encodes per budget), until none is left.

    Frame counts are grouped, not padded to the longest clip with a frame mask (which would
    answer the same: masked slots are invisible): a request of T frames is T*slots visual
    tokens, so padding a single image to ``data.max_frames`` frames would multiply its
    prefill and every decode step's attention by up to that factor. Grouping costs at most
    one compiled program per (bucket, frame count), a few per bucket, and emptier batches
    when frame counts are spread."""
    while items:
      groups = collections.defaultdict(list)
      for item in items:
        groups[(self._bucket(item.budget), item.frames)].append(item)
      for bucket, frames in sorted(groups):
        self._decode_group(bucket, groups[(bucket, frames)], results)
      again = []
      for item in items:
        if item.cascade is not None:
          nxt = self.policy.next_budget(item.budget, results[item.pos][self.policy.confidence])
          if nxt is not None:
            item.budget = nxt
            again.append(item)
      items = self._attach_features(again, results)   # the same, unless encoded per budget

  # ---------------------------------------------------------------- serve

  def _fail(self, results: list, pos: int, error: RequestError) -> None:
    logging.warning("skipped %s", error)
    results[pos] = error.record()
    self.stats.errors += 1

  def _image(self, data: bytes, path: str) -> np.ndarray | str:
    """The decoded image of file ``path`` with bytes ``data`` (once per ``serve`` call), or
    why it is not one."""
    key = FeatureCache.key(data)
    if key not in self._images:
      try:
        self._images[key] = generation.decode_image(data, self.run.image_size, f"image {path}")
      except ValueError as e:
        self._images[key] = str(e)
    return self._images[key]

  def _attach_features(self, items: list[_Item], results: list) -> list[_Item]:
    """Gives every item the features for its budget (``BudgetSpec.encoding_bucket``; one set
    for every budget, and for an undecided one, when the method encodes once), frame by
    frame: from the cache, or decoded and encoded ``batch_size`` frames at a time (a frame
    shared by items, in this call or an earlier one, is encoded once). An item with a frame
    that cannot be decoded gets an error record and is left out of the items returned (in
    order)."""
    pending, keyed = {}, []        # feature key -> (encoding, image or why not); (item, keys, held)
    for item in items:
      encoding = None if item.budget is None else self.space.encoding_bucket(item.budget)
      keys = tuple(FeatureCache.key(data, encoding) for data in item.data)
      if keys == item.feature_keys:            # it holds them already (a later cascade pass)
        keyed.append((item, keys, None))
        continue
      # A hit: encoded by an earlier call, or for an earlier request (or frame) of this one.
      hits = [self.cache.lookup(key) or key in pending for key in keys]
      if item.cached is None:
        item.cached = all(hits)
        self.stats.cache_hits += sum(hits)
      item.feature_keys, item.features = keys, None
      held = {}                                # taken now: later puts may evict them
      for key, data, path in zip(keys, item.data, item.request.frames):
        if key in self.cache:
          held[key] = self.cache.get(key)
        elif key not in pending:
          pending[key] = (encoding, self._image(data, path))
      keyed.append((item, keys, held))
    by_encoding = collections.defaultdict(dict)
    for key, (encoding, image) in pending.items():
      if not isinstance(image, str):
        by_encoding[encoding][key] = image
    fresh = {}
    for encoding, images in by_encoding.items():
      fresh.update(zip(images, encode_batches(self.run, list(images.values()), self.batch_size, encoding)))
    for key, features in fresh.items():
      self.cache.put(key, features)
    self.stats.images_encoded += len(fresh)
    out = []
    for item, keys, held in keyed:
      if held is not None:
        bad = [key for key in keys if key not in held and key not in fresh]
        if bad:
          r = item.request
          self._fail(results, item.pos, RequestError(r.line, r.id, pending[bad[0]][1]))
          continue
        frames = [held[key] if key in held else fresh[key] for key in keys]
        item.features = frames[0] if len(frames) == 1 else np.stack(frames)   # (T, g, g, Dv)
      out.append(item)
    return out

  def serve(self, requests: Sequence[Request | RequestError]) -> list[dict]:
    """Answers every request; one record per request, in order.

    A RequestError in ``requests`` (a bad line of the file) and every request that cannot
    be served become ``{"id", "line", "error"}``; the others
    ``{"id", "line", "budget", "answer", "answer_prob", "min_token_prob", "bucket", "cached"}``
    (``answer_prob`` / ``min_token_prob``: product / minimum of the greedy answer tokens'
    probabilities, EOS included; ``cached``: features, every frame's, came from the cache);
    a request of several frames also has ``"frames"`` (their number); an ``"auto"`` request
    under a cascade also has ``"cascade"``, one ``{"budget", "answer_prob",
    "min_token_prob"}`` per pass, the last being the answer given. ``self.stats`` holds this
    call's counts and timing (images are counted per frame).
    """
    self.stats = stats = ServeStats(requests=len(requests))
    start = time.perf_counter()
    self._images = {}
    results: list = [None] * len(requests)
    items = []
    for pos, request in enumerate(requests):
      if isinstance(request, RequestError):
        self._fail(results, pos, request)
        continue
      try:
        prompt = self._prompt(request)
        budget = None if request.budget == AUTO else self.check_budget(request, request.budget)
        data = self._read_frames(request)
      except RequestError as e:
        self._fail(results, pos, e)
        continue
      items.append(_Item(pos, request, prompt, data, budget))

    # Features before any budget is chosen (a policy reads them), unless they depend on the
    # budget: then an "auto" request is encoded once its budget is.
    later = self.space.encodes_per_budget
    now = self._attach_features([i for i in items if not (later and i.budget is None)], results)
    ready = []
    for item in sorted(now + [i for i in items if later and i.budget is None], key=lambda i: i.pos):
      r = item.request
      try:
        budget = r.budget
        if budget == AUTO and isinstance(self.policy, policies.Cascade):
          budget, item.cascade = self.policy.budgets[0], []
        elif budget == AUTO:
          try:
            budget = self.policy(r, item.features)
          except RequestError:
            raise
          except (ValueError, TypeError, KeyError) as e:
            why = "" if item.features is not None else " (given no features: they depend on the budget)"
            raise RequestError(r.line, r.id, f"the budget policy failed{why}: {type(e).__name__}: {e}") from e
        item.budget = self.check_budget(r, budget)
      except RequestError as e:
        self._fail(results, item.pos, e)
        continue
      ready.append(item)
    ready = self._attach_features(ready, results)
    self._decode(ready, results)
    self._images = {}
    stats.answered = sum(1 for r in results if r is not None and "error" not in r)
    stats.seconds = time.perf_counter() - start
    return results

  def answer(self, request: Request) -> dict:
    """One request's record; RequestError (naming it) instead of an error record."""
    (record,) = self.serve([request])
    if "error" in record:
      raise RequestError(request.line, request.id, record["error"])
    return record


def write_records(path: str, records: Sequence[dict]) -> None:
  """One JSON object per line (numpy arrays such as ``logits`` are left out)."""
  with open(path, "w") as f:
    for record in records:
      f.write(json.dumps({k: v for k, v in record.items() if not isinstance(v, np.ndarray)}) + "\n")
