"""Per-example scores of the greedy answers at every budget, and the router's inputs, on a split.

What a budget policy needs to be simulated and trained, from one checkpoint:

  the scores of ``parcel_jax.scores`` (budgets, flops, index, family, correct, answer_prob,
  min_token_prob; n examples x k budgets) for the answer serving returns: greedy decoding
  with the KV cache (``serving.decode_rows``, the serving code itself), so ``answer_prob`` /
  ``min_token_prob`` are the confidences an online cascade sees (``answers = "greedy"``), and
  ``correct`` is the greedy answer (up to its EOS) being the target answer. That equals
  ``evaluate``'s teacher-forced exact match on single-answer examples; a multi-turn real
  example is scored on its first answer.
  vit_flops   ()             the ViT's FLOPs per image (a cascade pays them once)
  anchors     (n, 16, Dv)    ViT features mean-pooled to 4x4 (``router.pool_anchors``)
  prompt      (n, L) int32   the prompt's token ids ``[BOS, ..., SEP]``, -1 padded
  split       str            "train" or "eval"

``scores.save`` writes the table as one .npz and ``scores.load`` reads it back.

Each image is encoded once and decoded at every budget at its compact shape. Both splits are
read by ``pipeline.build_eval_dataset`` (one layout, frame padding and bad-data policy): the
eval split is ``evaluate``'s stream (the same examples and ``index``); the train split is the
first ``num_examples`` examples of the training source in index order (the router's labels).
Text-only examples (no image) and examples the data marks bad (``data.on_error=skip``; under
``raise`` the first one is an error naming it) are left out and counted (``skipped``);
``data.long_text=reject`` makes an example that does not fit ``data.max_text_len`` a bad one,
while under ``truncate`` one whose first answer is cut is scored against the cut answer (no
EOS: never correct). One process.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np
from absl import logging

from parcel_jax import flops as flops_lib
from parcel_jax import policies
from parcel_jax import router as router_lib
from parcel_jax import serving
from parcel_jax.data import pipeline

SPLITS = ("train", "eval")


def prompt_and_answer(text: np.ndarray, text_mask: np.ndarray, ar_mask: np.ndarray,
                      eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """From one laid-out example (``tokenizer.layout_example``'s (L,) arrays): its prompt
  ``[BOS, ..., SEP]`` (the bidirectional prefix) and its first answer with EOS."""
  text, text_mask, ar_mask = np.asarray(text), np.asarray(text_mask, bool), np.asarray(ar_mask, bool)
  prompt = text[text_mask & ~ar_mask].astype(np.int32)
  suffix = text[ar_mask].astype(np.int32)
  eos = np.flatnonzero(suffix == eos_id)
  return prompt, (suffix[:eos[0] + 1] if eos.size else suffix)


def examples(data_cfg, split: str, num_examples: int, tokenizer, *, batch_size: int = 32,
             skipped: list | None = None) -> Iterator[dict]:
  """``{"index", "image" (S, S, 3), "prompt", "answer", "family"}`` for the first
  ``num_examples`` examples of ``split``, in order (``pipeline.build_eval_dataset`` of that
  split: both are laid out alike); ``skipped`` (a list) collects ``(index, reason)`` of the
  examples left out."""
  skipped = [] if skipped is None else skipped
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  eos = tokenizer.eos_id
  dataset = pipeline.build_eval_dataset(data_cfg, batch_size=batch_size, num_examples=num_examples,
                                        split=split)
  for b, batch in enumerate(dataset):
    for i in range(len(batch["valid"])):
      index = b * batch_size + i
      if not batch["valid"][i]:
        if index < num_examples:
          skipped.append((index, "bad example"))
        continue
      if "has_image" in batch and not batch["has_image"][i]:
        skipped.append((index, "no image"))
        continue
      prompt, answer = prompt_and_answer(batch["text"][i], batch["text_mask"][i], batch["ar_mask"][i], eos)
      yield {"index": index, "image": batch["image"][i], "prompt": prompt, "answer": answer,
             "family": int(batch["family"][i])}


def collect(run, budgets, *, split: str, num_examples: int, batch_size: int = 32,
            anchor_grid: int = router_lib.ANCHOR_GRID, progress: bool = True) -> dict:
  """The module docstring's arrays for the first ``num_examples`` of ``split`` at ``budgets``
  (ascending, each in the method's space), as numpy; ``"skipped"``: examples left out."""
  budgets = tuple(int(b) for b in budgets)
  if list(budgets) != sorted(set(budgets)) or not budgets:
    raise ValueError(f"budgets must be non-empty and strictly ascending, got {list(budgets)}")
  space = run.method_space()
  bad = [b for b in budgets if b not in space.budgets]
  if bad:
    raise ValueError(f"budget(s) {bad} are not valid for method {run.method!r}")
  buckets = {b: space.compact_bucket(b) for b in budgets}
  cols = {k: [] for k in ("index", "family", "correct", "answer_prob", "min_token_prob", "anchors", "prompt")}
  skipped: list = []
  stream = examples(run.config.data, split, num_examples, run.tokenizer, batch_size=batch_size, skipped=skipped)
  start, done = time.perf_counter(), 0

  def score(chunk):
    features = serving.encode_batches(run, [e["image"] for e in chunk], batch_size)   # once
    prompts = [e["prompt"] for e in chunk]
    correct, answer_prob, min_prob = (np.zeros((len(chunk), len(budgets)), t) for t in (bool, float, float))
    for j, b in enumerate(budgets):
      rows = serving.decode_rows(run, features, prompts, [b] * len(chunk), bucket=buckets[b],
                                 batch_size=batch_size)
      for i, (example, row) in enumerate(zip(chunk, rows)):
        correct[i, j] = np.array_equal(row["ids"], example["answer"])
        answer_prob[i, j], min_prob[i, j] = row["answer_prob"], row["min_token_prob"]
    cols["index"].append([e["index"] for e in chunk])
    cols["family"].append([e["family"] for e in chunk])
    cols["correct"].append(correct)
    cols["answer_prob"].append(answer_prob)
    cols["min_token_prob"].append(min_prob)
    cols["anchors"].append(router_lib.pool_anchors(np.stack(features), anchor_grid))
    cols["prompt"].append(router_lib.pad_prompts(prompts, int(run.config.data.max_text_len)))

  chunk = []
  for example in stream:
    chunk.append(example)
    if len(chunk) == batch_size:
      score(chunk)
      done += len(chunk)
      chunk = []
      if progress:
        logging.info("%s split: %d/%d examples scored at %d budgets, %.1fs", split, done, num_examples,
                     len(budgets), time.perf_counter() - start)
  if chunk:
    score(chunk)
  if not cols["index"]:
    raise ValueError(f"none of the first {num_examples} {split} examples could be scored "
                     f"({len(skipped)} left out; first: {skipped[:1]})")
  if skipped:
    logging.warning("%s split: %d of %d examples left out (first: %s)", split, len(skipped), num_examples,
                    skipped[0])
  cost = [flops_lib.cost(run.config, b) for b in budgets]
  return {"budgets": np.asarray(budgets, np.int32),
          "flops": np.asarray([c["total"] for c in cost], np.float64),
          "vit_flops": np.float64(cost[0]["vit"]),
          "index": np.concatenate(cols["index"]).astype(np.int64),
          "family": np.concatenate(cols["family"]).astype(np.int32),
          **{k: np.concatenate(cols[k]) for k in ("correct", "answer_prob", "min_token_prob", "anchors", "prompt")},
          "split": split, "answers": policies.GREEDY, "skipped": np.int64(len(skipped))}

