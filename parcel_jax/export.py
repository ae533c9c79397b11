r"""Command line: write a trained run's weights in a format other tools read.

    python -m parcel_jax.export --workdir=RUN --format=hf|big_vision --out=DIR [--step=N] \
        [--image_token_index=I] [--allow=decoder.window_prefix] [--max_shard_mb=M]

``hf``: a PaliGemma / PaliGemma-2 directory (config.json, model.safetensors) that
``transformers.PaliGemmaForConditionalGeneration.from_pretrained(DIR)`` loads, plus for
parcel / m3 / mqt ``connector.safetensors`` and ``connector.json``, and for a run on real
data the Gemma tokenizer of ``data.tokenizer`` with a preprocessor_config.json
(``AutoProcessor.from_pretrained(DIR)``; synthetic data has no Gemma tokenizer, which the
command says); ``big_vision``: ``DIR/params.npz``. Prints each file written with its size
(tensor files: their tensor count) (``parcel_jax.weights.export``).
"""

from __future__ import annotations

from absl import app, flags

from parcel_jax import cli, runs, weights
from parcel_jax.data import pipeline

TENSOR_FILES = (".safetensors", ".npz")


def main(argv, flag_values: flags.FlagValues | None = None) -> None:
  """absl main; ``flag_values`` (default ``flags.FLAGS``) lets tests pass parsed flags."""
  del argv
  cli.quiet_library_logs()
  f = flag_values or flags.FLAGS
  try:
    if f.format not in weights.FORMATS:
      raise ValueError(f"--format={f.format!r} is unknown; allowed: {', '.join(weights.FORMATS)}")
    run = runs.load_run(f.workdir, f.step)
    tokenizer = pipeline.gemma_tokenizer_path(run.config.data) if f.format == "hf" else ""
    written = weights.export(run.params, run.model_cfg, f.format, f.out,
                             run_connector_config=run.config.model.connector.to_dict(),
                             image_token_index=f.image_token_index, allow=f.allow or (),
                             max_shard_bytes=int(f.max_shard_mb * 2 ** 20), tokenizer=tokenizer)
  except (FileNotFoundError, ValueError) as e:  # WeightsError is a ValueError
    raise SystemExit(f"error: {e}") from e
  print(f"exported {run.label()} step {run.step} as {f.format} to {f.out}:", flush=True)
  for w in written:
    what = f"{w.tensors} tensors, " if w.path.endswith(TENSOR_FILES) else ""
    print(f"  {w.path}  {what}{w.bytes:,} bytes", flush=True)
  tensors = sum(w.tensors for w in written)
  print(f"{len(written)} files, {tensors} tensors, {sum(w.bytes for w in written):,} bytes", flush=True)
  if f.format == "hf" and not tokenizer:
    print(f"no tokenizer written: data.name={run.config.data.name!r} lays text out with the "
          "synthetic word list, which is not a Gemma vocabulary (AutoTokenizer / AutoProcessor "
          "cannot read it; the weights load alone)", flush=True)


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=fv)
  flags.DEFINE_string("format", None, f"Output format: {' | '.join(weights.FORMATS)}.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output directory (created if missing).", flag_values=fv)
  flags.DEFINE_integer("image_token_index", None, "hf: the <image> token id (default: the "
                       "run's Gemma tokenizer's <image> when it has one, else 257152 when the "
                       "vocabulary holds it, else vocab_size: no text token's id).",
                       flag_values=fv)
  flags.DEFINE_list("allow", [], "hf: inexact fields to export anyway: decoder.window_prefix.",
                    flag_values=fv)
  flags.DEFINE_float("max_shard_mb", 0, "hf: shard model.safetensors into files of at most "
                     "this many MiB (0: one file).", flag_values=fv)
  flags.mark_flags_as_required(["workdir", "format", "out"], flag_values=fv)


if __name__ == "__main__":
  define_flags()
  app.run(main)
