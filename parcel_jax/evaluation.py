r"""Evaluation library: checkpoints at many budgets, each image encoded once.

The command line is ``parcel_jax.evaluate``:

    python -m parcel_jax.evaluate --workdir=RUN [--workdir=RUN2 ...] [--budgets=16,64,256] \
        [--reference=NONE_RUN] [--out=DIR] [--num_examples=N] [--batch_size=N]

It restores the latest checkpoint of every workdir, evaluates it on the eval stream at
every budget, and writes ``DIR/budgets.json`` (exact match per budget and task family,
suffix loss and token accuracy, Appendix C FLOPs per budget, and, given a reference,
retention) and ``DIR/pareto.png`` (score vs budget and vs total FLOPs, one line per run).

Budgets: ``--budgets`` is filtered to each method's space (M3: its squares; ``none``: the
full grid); budgets outside the set a run was trained on are evaluated and marked
``trained: false``. Without ``--budgets``: the run's ``eval.budgets`` that it was trained on.

Retention = 100 x score / reference score, per task family and overall; the reference is
an uncompressed run (method ``none``) on the same eval stream, at its single budget.

Exact match is computed teacher-forced: an example is correct iff the argmax at
every answer position (answer tokens and EOS) is the target. That equals greedy
decoding producing exactly the answer, because greedy decoding feeds back only
its own tokens, which are then the correct ones.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from parcel_jax import budgets as budgets_lib
from parcel_jax import config as config_lib
from parcel_jax import flops as flops_lib
from parcel_jax import losses
from parcel_jax import runs
from parcel_jax import scores as scores_lib
from parcel_jax import sharding
from parcel_jax.data import pipeline, synthetic


# Module-level jitted pieces (the graph definition is static and hashable), so repeated
# evaluations of the same architecture reuse the compiled programs.

@functools.partial(jax.jit, static_argnames=("graphdef", "bucket"))
def encode_images(graphdef, params, images, bucket=None):
  """images (b, H, W, 3) -> ViT features (b, g, g, Dv); ``bucket``: ``BudgetSpec.encoding_bucket``
  of the budget they are for (None: every budget's, for a method that encodes once)."""
  return nnx.merge(graphdef, params).encode_images(images, bucket)


@functools.partial(jax.jit, static_argnames=("graphdef", "bucket"))
def _score(graphdef, params, features, batch, budget_vec, bucket):
  """Per-example exact match (b,) bool, suffix loss sum (b,), correct/total tokens (b,) and
  the largest answer-token cross-entropy (b,) (``max_nll``: the least likely answer token)."""
  model = nnx.merge(graphdef, params)
  logits = model.text_logits(features, batch["text"], batch["text_mask"], batch["ar_mask"],
                             bucket=bucket, budgets=budget_vec, has_image=batch.get("has_image"),
                             frame_mask=batch.get("frame_mask"))
  nll = jnp.where(batch["loss_mask"], losses.token_cross_entropy(logits, batch["targets"]), 0.0)
  return {**losses.per_example_scores(logits, batch["targets"], batch["loss_mask"]),
          "max_nll": jnp.max(nll, axis=-1)}


def _eval_stream(config, mesh):
  """The eval batches for this process and the sharding of their global arrays.

  ``eval.batch_size`` is the global batch. When it splits over the processes and the
  mesh's batch shards, each process reads its own rows (``process_index::process_count``)
  and the batch is sharded; otherwise every process reads all rows and the batch is
  replicated. Either way every process runs the same number of batches (collectives
  cannot hang) and sees the same padded set of examples.
  """
  global_batch, count = config.eval.batch_size, jax.process_count()
  if global_batch % count == 0 and global_batch % sharding.batch_shards(mesh) == 0:
    dataset = pipeline.build_eval_dataset(
        config.data, batch_size=global_batch // count, process_index=jax.process_index(),
        process_count=count, num_examples=config.eval.num_examples)
    return dataset, sharding.batch_sharding(mesh)
  dataset = pipeline.build_eval_dataset(config.data, batch_size=global_batch,
                                        num_examples=config.eval.num_examples)
  return dataset, sharding.replicated(mesh)


def _to_host(tree):
  """Global arrays -> numpy on every process (gathers across processes when needed)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _row_index(num_batches: int, global_batch: int, sharded: bool) -> np.ndarray:
  """The eval-stream index of every gathered row, in evaluate's order: a sharded batch holds
  each process's rows (``process_index::process_count`` of the stream) one process after
  another; otherwise every row in stream order."""
  count = jax.process_count() if sharded else 1
  local = global_batch // count
  per_process = [np.arange(num_batches * global_batch)[p::count].reshape(num_batches, local)
                 for p in range(count)]
  return np.concatenate(per_process, axis=1).reshape(-1)


def evaluate(graphdef, params, config, spec: budgets_lib.BudgetSpec, budgets, mesh,
             *, progress: bool = True, encode_once: bool = True, per_example: bool = False) -> dict:
  """Exact match per budget and task family on the eval stream.

  Each image batch is encoded once; its vision features are reused for every
  budget, which runs at its compact shape (exactly B visual tokens). A method that encodes
  per budget (``BudgetSpec.encoding_bucket``) encodes the batch once per budget.
  ``encode_once=False`` re-encodes the images for every budget (same numbers,
  slower: a baseline for ``benchmarks/encode_once.py``).

  Args:
    graphdef, params: ``nnx.split`` of a ``VLM`` (params a pure dict).
    config: the run's ConfigDict (``data`` and ``eval.batch_size``/``eval.num_examples``).
    spec: budgets of the connector; every budget in ``budgets`` must be in ``spec.budgets``.
    budgets: the budgets to evaluate.
    mesh: batches are sharded over its data axes when the batch size allows. With several
      processes each reads its share of every (global) batch; all return the same result.
    per_example: also return every example's scores at every budget (``"per_example"``).

  Returns:
    ``{"method", "num_examples", "budgets": {str(B): {"overall": em, family: em, ...}},
    "token_metrics": {str(B): {"loss", "token_accuracy"}}}``; exact match in [0, 1],
    loss the mean suffix cross-entropy per token; real data adds ``"data"``, the eval
    stream's bad-data counts (``pipeline.data_metrics``). With ``per_example`` also
    ``"per_example": {"budgets" (k,), "index" (n,) eval-stream index, "family" (n,),
    "correct" (n, k) bool exact match, "answer_prob" (n, k) the product and
    "min_token_prob" (n, k) the minimum of the answer tokens' probabilities (EOS included)
    under teacher forcing}`` as numpy (``parcel_jax.scores`` saves and reads them).
  """
  budgets = tuple(int(b) for b in budgets)
  buckets = {b: spec.compact_bucket(b) for b in budgets}
  dataset, batch_spec = _eval_stream(config, mesh)
  sums = {b: {k: [] for k in ("em", "loss", "correct", "tokens", "max_nll")} for b in budgets}
  families, valid = [], []
  start, num_batches = time.perf_counter(), len(dataset)
  for i, batch in enumerate(dataset):
    # Global arrays (this process's rows, or all rows replicated).
    device_batch = {k: jax.make_array_from_process_local_data(batch_spec, np.asarray(v))
                    for k, v in batch.items()}
    images = device_batch.pop("image")
    # family/valid stay with the batch so that the gathers below keep rows aligned.
    host_rows = _to_host({k: device_batch.pop(k) for k in ("family", "valid")})
    encoded = {}   # encoding bucket -> features: one entry unless the method encodes per budget
    for b in budgets:
      key = spec.encoding_bucket(b)
      if key not in encoded or not encode_once:
        encoded[key] = encode_images(graphdef, params, images, key)
      f = encoded[key]
      budget_vec = jax.make_array_from_process_local_data(
          batch_spec, np.full((len(batch["image"]),), b, np.int32))
      out = _score(graphdef, params, f, device_batch, budget_vec, bucket=buckets[b])
      for k, v in _to_host(out).items():
        sums[b][k].append(v)
    families.append(host_rows["family"])
    valid.append(np.asarray(host_rows["valid"], bool))  # eval batches are padded to full size
    if progress and jax.process_index() == 0:
      elapsed = time.perf_counter() - start
      eta = elapsed / (i + 1) * (num_batches - i - 1)
      logging.info("eval batch %d/%d x %d budgets (%s): %.1fs elapsed, ETA %.0fs",
                   i + 1, num_batches, len(budgets), ",".join(map(str, budgets)), elapsed, eta)
  valid = np.concatenate(valid)
  families = np.concatenate(families)[valid]
  results, token_metrics = {}, {}
  for b in budgets:
    cat = {k: np.concatenate(v)[valid].astype(np.float64) for k, v in sums[b].items()}
    h = cat["em"]
    row = {"overall": float(h.mean())}
    for f, name in enumerate(synthetic.FAMILIES):
      sel = families == f
      if sel.any():
        row[name] = float(h[sel].mean())
    results[str(b)] = row
    tokens = max(cat["tokens"].sum(), 1.0)
    token_metrics[str(b)] = {"loss": float(cat["loss"].sum() / tokens),
                             "token_accuracy": float(cat["correct"].sum() / tokens)}
  out = {"method": spec.method, "num_examples": int(families.size), "budgets": results,
         "token_metrics": token_metrics}
  counts = pipeline.data_metrics(dataset)  # real data: bad examples skipped per kind
  if counts:
    if jax.process_count() > 1 and not batch_spec.is_fully_replicated:  # each read its share
      counts = dict(zip(counts, multihost_utils.process_allgather(
          np.asarray(list(counts.values()), np.int64)).sum(0).tolist()))
    out["data"] = counts
  if per_example:
    column = lambda key: np.stack([np.concatenate(sums[b][key])[valid] for b in budgets], axis=1)
    index = _row_index(num_batches, valid.size // max(num_batches, 1), not batch_spec.is_fully_replicated)
    out["per_example"] = {
        "budgets": np.asarray(budgets, np.int32), "index": index[valid].astype(np.int64),
        "family": families.astype(np.int32), "correct": column("em").astype(bool),
        "answer_prob": np.exp(-column("loss").astype(np.float64)),
        "min_token_prob": np.exp(-column("max_nll").astype(np.float64))}
  return out


def format_table(result: dict) -> str:
  names = ["overall"] + [f for f in synthetic.FAMILIES if any(f in r for r in result["budgets"].values())]
  lines = [f"{'budget':>7} " + " ".join(f"{n:>10}" for n in names)]
  for b, row in result["budgets"].items():
    lines.append(f"{b:>7} " + " ".join(f"{100 * row.get(n, float('nan')):>9.1f}%" for n in names))
  return "\n".join(lines)


# ------------------------------------------------------------------ many runs

def run_budgets(run, requested=None) -> tuple[budgets_lib.BudgetSpec, tuple[int, ...]]:
  """The spec to evaluate ``run`` with and its budgets.

  ``requested`` None: the run's ``eval.budgets`` that it was trained on (as train.py).
  Otherwise the requested budgets in the method's whole space, sorted; the others skipped.
  """

  if requested is None:
    return run.spec, config_lib.eval_budgets(run.config, run.spec)
  space = run.method_space()
  chosen = tuple(sorted({int(b) for b in requested if int(b) in space.budgets}))
  skipped = sorted({int(b) for b in requested} - set(chosen))
  if skipped:
    logging.info("%s: skipping budgets %s (not in the method's space %s)", run.label(), skipped,
                 budgets_lib._describe(space.budgets))
  return space, chosen


# Data fields that do not change which examples the eval stream holds.
_NOT_EVAL_STREAM = ("num_threads", "train_size", "eval_size", "train_path", "train_split",
                    "family_weights")


def eval_stream_key(config) -> str:
  """The data config minus fields that leave the eval stream unchanged, as JSON: runs with
  equal keys see the same examples (retention is only meaningful then)."""
  data = {k: v for k, v in config.data.to_dict().items() if k not in _NOT_EVAL_STREAM}
  return json.dumps(data, sort_keys=True, default=str)


def _percent_of(value: float, reference: float) -> float | None:
  return 100.0 * value / reference if reference > 0 else None


def retention(score: dict, reference: dict) -> dict:
  """100 x score / reference per key present in both; None where the reference is 0."""
  return {k: _percent_of(v, reference[k]) for k, v in score.items() if k in reference}


def _with_eval(config, num_examples: int, batch_size: int | None):
  """A copy of ``config`` with the eval stream size (and batch size) overridden."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.eval.num_examples = num_examples
    if batch_size:
      config.eval.batch_size = batch_size
  return config


def evaluate_run(run, budgets, *, num_examples: int, batch_size: int | None = None,
                 reference: dict | None = None, progress: bool = True,
                 per_example: bool = False) -> dict:
  """One run at ``budgets`` (see ``run_budgets``): scores, token metrics, FLOPs, and with a
  ``reference`` (the report's reference entry: ``score`` and ``token_accuracy``) retention.
  ``per_example``: also ``"per_example"``, evaluate's arrays plus ``"flops"`` (k,) total
  FLOPs per budget (what ``scores.save`` writes)."""
  spec, budgets = run_budgets(run, budgets)
  if not budgets:
    raise ValueError(f"{run.label()}: none of the requested budgets is in the space of method "
                     f"{run.method!r}: {budgets_lib._describe(run.method_space().budgets)}")
  config = _with_eval(run.config, num_examples, batch_size)
  logging.info("evaluating %s (step %s) at budgets %s on %d examples", run.label(), run.step,
               list(budgets), num_examples)
  result = evaluate(run.graphdef, run.params, config, spec, budgets, run.mesh, progress=progress,
                    **({"per_example": True} if per_example else {}))
  rows = {}
  for b in budgets:
    score, tokens = result["budgets"][str(b)], result["token_metrics"][str(b)]
    rows[str(b)] = {
        "score": score, **tokens, "flops": flops_lib.cost(run.config, b),
        "trained": b in run.spec.budgets,
        "retention": retention(score, reference["score"]) if reference else None,
        # A smoother proxy for small or under-trained models: the same ratio on token accuracy.
        "token_accuracy_retention": (_percent_of(tokens["token_accuracy"], reference["token_accuracy"])
                                     if reference else None)}
  out = {"workdir": run.workdir, "step": run.step, "method": run.method, "label": run.label(),
         "num_examples": result["num_examples"], "trained_budgets": list(run.spec.budgets),
         "budgets": rows}
  if per_example:
    out["per_example"] = {**result["per_example"],
                          "flops": np.asarray([rows[str(b)]["flops"]["total"] for b in budgets], np.float64)}
  return out


def plot_pareto(report: dict, path: str) -> None:
  """Overall exact match vs budget and vs total FLOPs, one line per run (PNG)."""
  import matplotlib
  matplotlib.use("Agg")  # headless
  import matplotlib.pyplot as plt
  import matplotlib.ticker  # noqa: F401

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for run in report["runs"]:
    budgets = sorted(int(b) for b in run["budgets"])
    score = [100 * run["budgets"][str(b)]["score"]["overall"] for b in budgets]
    gflops = [run["budgets"][str(b)]["flops"]["total"] / 1e9 for b in budgets]
    axes[0].plot(budgets, score, marker="o", label=run["label"])
    axes[1].plot(gflops, score, marker="o", label=run["label"])
  ref = report.get("reference")
  if ref:
    y = 100 * ref["score"]["overall"]
    for ax, x in zip(axes, (ref["budget"], ref["flops"]["total"] / 1e9)):
      ax.axhline(y, color="k", ls=":", lw=1)
      ax.plot([x], [y], "k*", ms=10, label=f"reference: {ref['label']}")
  top = max([100 * r["budgets"][b]["score"]["overall"] for r in report["runs"] for b in r["budgets"]]
            + [100 * ref["score"]["overall"] if ref else 0.0])
  for ax, xlabel in zip(axes, ("visual tokens B", "total inference GFLOPs (Appendix C)")):
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, max(1.0, 1.05 * top))
    ax.grid(alpha=0.3, which="both")
  budgets = sorted({int(b) for r in report["runs"] for b in r["budgets"]} | ({ref["budget"]} if ref else set()))
  axes[0].set_xticks(budgets, [str(b) for b in budgets])
  axes[0].minorticks_off()
  axes[1].xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
  axes[1].xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
  axes[0].legend(fontsize=8)
  fig.suptitle(f"Score vs cost on {report['num_examples']} eval examples")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def evaluate_workdirs(workdirs, *, budgets=None, reference: str | None = None,
                      out: str, num_examples: int | None = None, batch_size: int | None = None,
                      progress: bool = True, per_example: bool = False) -> dict:
  """The CLI's work: evaluates every workdir, writes ``out``/budgets.json and pareto.png.
  ``per_example``: also ``out``/per_example_<i>.npz for the i-th run (``scores.save``; its
  run entry names it under ``"per_example_file"``)."""

  loaded = [runs.load_run(w) for w in workdirs]
  ref_run = runs.load_run(reference) if reference else None
  num_examples = num_examples or loaded[0].config.eval.num_examples
  key = eval_stream_key(loaded[0].config)
  for r in loaded + ([ref_run] if ref_run else []):
    if eval_stream_key(r.config) != key:
      raise ValueError(f"{r.workdir} has a different eval stream (data config {eval_stream_key(r.config)}) "
                       f"than {loaded[0].workdir} ({key}): scores would not be comparable")

  report = {"num_examples": num_examples, "reference": None, "runs": []}
  if ref_run:
    if ref_run.method != "none" or len(ref_run.spec.budgets) != 1:
      raise ValueError(f"--reference={reference} must be an uncompressed run (method 'none', one "
                       f"budget); it is method {ref_run.method!r} with budgets {ref_run.spec.budgets}")
    (b,) = ref_run.spec.budgets
    result = evaluate(ref_run.graphdef, ref_run.params,
                      _with_eval(ref_run.config, num_examples, batch_size), ref_run.spec, (b,),
                      ref_run.mesh, progress=progress)
    report["reference"] = {"workdir": ref_run.workdir, "step": ref_run.step, "label": ref_run.label(),
                           "budget": b, "score": result["budgets"][str(b)], **result["token_metrics"][str(b)],
                           "flops": flops_lib.cost(ref_run.config, b)}
  for i, run in enumerate(loaded):
    logging.info("run %d/%d: %s", i + 1, len(loaded), run.workdir)
    report["runs"].append(evaluate_run(run, budgets, num_examples=num_examples, batch_size=batch_size,
                                       reference=report["reference"], progress=progress,
                                       per_example=per_example))
  os.makedirs(out, exist_ok=True)
  for i, entry in enumerate(report["runs"]):
    if "per_example" in entry:
      entry["per_example_file"] = f"per_example_{i}.npz"
      scores_lib.save(os.path.join(out, entry["per_example_file"]), entry.pop("per_example"),
                      method=entry["method"], label=entry["label"], workdir=entry["workdir"],
                      step=entry["step"], answers="teacher_forced")
  with open(os.path.join(out, "budgets.json"), "w") as f:
    json.dump(report, f, indent=2)
  plot_pareto(report, os.path.join(out, "pareto.png"))
  return report


def format_report(report: dict) -> str:
  """Overall exact match, retention and GFLOPs per run and budget."""
  lines = []
  ref = report.get("reference")
  if ref:
    lines.append(f"reference {ref['label']}: B={ref['budget']} exact match "
                 f"{100 * ref['score']['overall']:.1f}%, {ref['flops']['total'] / 1e9:.3f} GFLOPs")
  lines.append(f"{'run':<28} {'B':>5} {'EM %':>7} {'ret %':>7} {'loss':>7} {'GFLOPs':>9}")
  for run in report["runs"]:
    for b, row in run["budgets"].items():
      ret = (row["retention"] or {}).get("overall")
      lines.append(f"{run['label'][:28]:<28} {b:>5} {100 * row['score']['overall']:>7.1f} "
                   f"{'-' if ret is None else f'{ret:.1f}':>7} {row['loss']:>7.3f} "
                   f"{row['flops']['total'] / 1e9:>9.3f}" + ("" if row["trained"] else "  (untrained budget)"))
  return "\n".join(lines)
