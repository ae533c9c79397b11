"""The tokenizer and image processor of an exported Hugging Face PaliGemma directory.

``export_processor`` writes, beside ``config.json`` and the safetensors, what
``transformers.AutoTokenizer`` / ``AutoProcessor.from_pretrained(DIR)`` read, from the run's
Gemma tokenizer (``data.tokenizer``: a checkpoint directory, or a tokenizer.model /
tokenizer.json file; local or a cloud URI)::

  tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json,
  added_tokens.json        from a directory: those it holds, copied; a file is copied as
                           tokenizer.model (sentencepiece) or tokenizer.json (.json: the
                           ``tokenizers`` library), the name transformers looks for
  tokenizer_config.json    written when the source has none: transformers' GemmaTokenizer,
                           with the special pieces our tokenizer found
  preprocessor_config.json PaliGemmaProcessor's SiglipImageProcessor for the exported model:
                           ``size`` = vision.image_size, ``image_seq_length`` = the backbone's
                           visual tokens (config.json's num_image_tokens), and our pipeline's
                           preprocessing (``images.decode_image``: RGB, bilinear resize to
                           S x S, x / 255 normalised with mean = std = 0.5, i.e. x / 127.5 - 1),
                           so its pixel_values are the images the model was trained on. A
                           source's own preprocessor_config.json keeps its other keys.

The synthetic word-list tokenizer is not a Gemma vocabulary: transformers has no tokenizer
for it, and nothing is written (``weights.export`` with no tokenizer).
"""

from __future__ import annotations

import json
import os

from parcel_jax import paths
from parcel_jax.data import gemma_tokenizer
from parcel_jax.weights import common

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
TOKENIZER_CONFIG = "tokenizer_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
IMAGE_TOKEN = "<image>"   # PaliGemmaProcessor's image placeholder
PIL_BILINEAR = 2          # PIL.Image.BILINEAR, the resize of images.decode_image


def preprocessor_config(image_size: int, image_seq_length: int) -> dict:
  """The keys SiglipImageProcessor / PaliGemmaProcessor read, for our pipeline's images."""
  return dict(image_processor_type="SiglipImageProcessor", processor_class="PaliGemmaProcessor",
              image_seq_length=int(image_seq_length),
              size={"height": int(image_size), "width": int(image_size)},
              do_convert_rgb=True, do_resize=True, resample=PIL_BILINEAR,
              do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def tokenizer_config(tokenizer: gemma_tokenizer.GemmaTokenizer) -> dict:
  """A ``tokenizer_config.json`` for a lone tokenizer file: transformers' GemmaTokenizer (it
  adds BOS, not EOS, as PaliGemma's prompt starts) with the vocabulary's special pieces."""
  pieces = {f"{name}_token": piece for name, piece in tokenizer.special_pieces.items()}
  return dict(tokenizer_class="GemmaTokenizer", processor_class="PaliGemmaProcessor",
              add_bos_token=True, add_eos_token=False, **pieces)


def open_tokenizer(tokenizer_path: str, vocab_size: int) -> gemma_tokenizer.GemmaTokenizer:
  """The Gemma tokenizer of ``tokenizer_path`` (FileNotFoundError when it holds none), checked
  against the model: a vocabulary larger than ``vocab_size`` is not the run's (ValueError)."""
  tokenizer = gemma_tokenizer.GemmaTokenizer(tokenizer_path)
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f"data.tokenizer={tokenizer_path} has {tokenizer.vocab_size} tokens, more than "
                     f"the model's decoder.vocab_size={vocab_size}: not the run's tokenizer")
  return tokenizer


def _source_files(tokenizer_path: str) -> dict[str, str]:
  """{file name in the export: source path} of a tokenizer directory or file."""
  if paths.isdir(tokenizer_path):
    return {name: paths.join(tokenizer_path, name) for name in TOKENIZER_FILES
            if paths.exists(paths.join(tokenizer_path, name))}
  name = "tokenizer.json" if tokenizer_path.endswith(".json") else "tokenizer.model"
  return {name: tokenizer_path}


def export_processor(tokenizer_path: str, out_dir: str, *, image_size: int, image_seq_length: int,
                     tokenizer: gemma_tokenizer.GemmaTokenizer | None = None) -> list[common.Written]:
  """Writes the tokenizer of ``tokenizer_path`` (``tokenizer``: it, already opened) and a
  preprocessor_config.json into ``out_dir`` (module docstring). Returns the files written."""
  tokenizer = tokenizer or gemma_tokenizer.GemmaTokenizer(tokenizer_path)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  sources = _source_files(tokenizer_path)
  for name, src in sources.items():
    dst = os.path.join(out_dir, name)
    paths.copy_file(src, dst)
    written.append(common.Written(dst, 0, os.path.getsize(dst)))
  if TOKENIZER_CONFIG not in sources:
    written.append(common.write_json(os.path.join(out_dir, TOKENIZER_CONFIG), tokenizer_config(tokenizer)))
  processor = {}
  if paths.isdir(tokenizer_path) and paths.exists(paths.join(tokenizer_path, PREPROCESSOR_CONFIG)):
    processor = json.loads(paths.read_text(paths.join(tokenizer_path, PREPROCESSOR_CONFIG)))
  processor.update(preprocessor_config(image_size, image_seq_length))
  written.append(common.write_json(os.path.join(out_dir, PREPROCESSOR_CONFIG), processor))
  return written
