"""Offline fixtures for the real-weights / real-data tests: a tiny sentencepiece Gemma-style
tokenizer, tiny random PaliGemma checkpoints saved with transformers (PyTorch CPU), and
image files of every flavour. Nothing is downloaded (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import io
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

WORDS = ("the a cat dog red blue green square circle what is where left right above below "
         "colour color of in image picture answer yes no one two three four describe caption "
         "how many are there shape big small").split()


def train_sentencepiece(path: str, *, loc_tokens: bool = True, seed: int = 0,
                        image_token: bool = False) -> str:
  """A small BPE sentencepiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3),
  "\\n" as one piece and (optionally) PaliGemma's <locNNNN> / <segNNN> pieces and its
  <image> piece (after them: the other pieces' ids move up by one)."""
  import sentencepiece as spm

  rng = random.Random(seed)
  sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) for _ in range(1500)]
  symbols = ["\n"]
  if loc_tokens:
    symbols += [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
  if image_token:
    symbols.append("<image>")
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=buf, vocab_size=len(symbols) + 160,
      user_defined_symbols=symbols, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
      eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
      normalization_rule_name="identity", remove_extra_whitespaces=False, model_type="bpe",
      hard_vocab_limit=False, minloglevel=2)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(buf.getvalue())
  return path


def hf_paligemma(text: str = "gemma2", *, image_size: int = 28, patch_size: int = 7,
                 vocab_size: int = 300, vision_width: int = 32, text_width: int = 48,
                 depth: int = 2, sliding_window: int = 5, seed: int = 0, std_scale: float = 1.0):
  """A tiny random PaliGemma (transformers, eager attention, float32), weights redrawn so
  every parameter matters: matrices N(0, 1/fan_in), norms and biases N(0, 0.2^2)."""
  import torch
  from transformers import (Gemma2Config, GemmaConfig, PaliGemmaConfig,
                            PaliGemmaForConditionalGeneration, SiglipVisionConfig)

  torch.manual_seed(seed)
  vision = SiglipVisionConfig(hidden_size=vision_width, intermediate_size=2 * vision_width,
                              num_hidden_layers=depth, num_attention_heads=4, image_size=image_size,
                              patch_size=patch_size, vision_use_head=False)
  if text == "gemma2":
    tc = Gemma2Config(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=2 * text_width,
                      num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, sliding_window=sliding_window, query_pre_attn_scalar=24,
                      attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
  else:  # Gemma-1 as in PaliGemma-1: multi-query attention, no soft-caps or post-norms
    tc = GemmaConfig(vocab_size=vocab_size, hidden_size=text_width, intermediate_size=2 * text_width,
                     num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=1,
                     head_dim=16)
  cfg = PaliGemmaConfig(vision_config=vision, text_config=tc, projection_dim=text_width,
                        image_token_index=vocab_size - 1, vocab_size=vocab_size)
  cfg._attn_implementation = "eager"
  model = PaliGemmaForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.normal_(0.0, 0.2 * std_scale)
      elif "embed_tokens" in name:
        p.normal_(0.0, std_scale * text_width ** -0.5)
      else:
        p.normal_(0.0, std_scale * p[0].numel() ** -0.5)
  return model


def save_hf(model, path: str, *, max_shard_size=None, tokenizer: str | None = None) -> str:
  kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(path, **kw)
  if tokenizer:
    import shutil
    shutil.copy(tokenizer, os.path.join(path, "tokenizer.model"))
  return path


# ------------------------------------------------------------------------- images

def write_image(path: str, kind: str = "rgb", size=(40, 30), seed: int = 0) -> str:
  """Writes an image file of a given flavour. ``size`` is (width, height).

  kinds: rgb (PNG), jpeg, gray (L PNG), rgba (PNG with alpha), palette (P PNG), gif,
  truncated (a JPEG cut in half), corrupt (a PNG header followed by garbage),
  notimage (text bytes), empty (0 bytes).
  """
  from PIL import Image

  rng = np.random.RandomState(seed)
  w, h = size
  rgb = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if kind == "rgb":
    Image.fromarray(rgb).save(path, "PNG")
  elif kind == "jpeg":
    Image.fromarray(rgb).save(path, "JPEG", quality=90)
  elif kind == "gray":
    Image.fromarray(rgb[..., 0]).save(path, "PNG")
  elif kind == "rgba":
    alpha = rng.randint(0, 256, (h, w, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(path, "PNG")
  elif kind == "palette":
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16).save(path, "PNG")
  elif kind == "gif":
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16).save(path, "GIF")
  elif kind == "truncated":
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    with open(path, "wb") as f:
      f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
  elif kind == "corrupt":
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[40:] = rng.randint(0, 256, len(data) - 40, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
      f.write(bytes(data))
  elif kind == "notimage":
    with open(path, "w") as f:
      f.write("this is not an image\n" * 20)
  elif kind == "empty":
    open(path, "wb").close()
  else:
    raise ValueError(kind)
  return path
