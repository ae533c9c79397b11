"""The paper's PaliGemma-2 3B recipe (stage 2: connector added, everything trained), shared
by ``configs/paligemma2/{parcel,m3,mqt,none}_224.py`` and ``parcel_448.py``.

    python -m parcel_jax.train --config=configs/paligemma2/parcel_224.py --workdir=DIR \\
        --config.init.hf_checkpoint=/ckpt/paligemma2-3b-pt-224 \\
        --config.data.train_path=/data/llava_v1_5_mix665k.json --config.data.image_root=/data/images \\
        --config.data.eval_path=/data/eval.json

Built on ``configs/base.py``'s schema; only what differs from it is set here:
  model      SigLIP So400m/14 + Gemma-2 2B, the size presets ``so400m_14`` and ``gemma2_2b``
             (``init.dims_from_checkpoint`` replaces both with the checkpoint's config.json, so a
             tiny checkpoint gives a tiny model); scanned layers
             with full rematerialisation; bfloat16 compute, float32 parameters.
  connector  12 heads and one 4304-wide MLP at the vision width (paper, section "The connector").
  init       init.hf_checkpoint (a Hugging Face PaliGemma-2 directory) or init.big_vision_npz;
             '' = random initialisation. The connector is always freshly initialised.
  optimiser  Adam (default betas 0.9 / 0.999), weight decay 0, peak LR 2e-5 x 0.5, cosine after a
             linear warm-up, gradient clipping at 1. Nothing is frozen. The connector shares the
             projection's schedule: one per-module group ``^(connector|projection)/`` whose
             multiplier (1.0) scales both together.
  soft-cap   ``model.decoder.final_softcap``: 30.0 = Gemma-2 logit soft-capping (pretraining, as
             the paper's stage 2), 0 = off (the paper's transfer runs). ``init.keep`` keeps this
             switch when dimensions come from the checkpoint.
  budgets    each method's whole space at this resolution (PARCEL even 16..256 at 224 px,
             16..1024 at 448 px; M3 {4, 16, 64, 256}; MQT even 2..256), uniform, one per batch.
  data       LLaVA-format JSON + image folder (``data.name`` jsonl / tfds also work); the Gemma
             tokenizer of the checkpoint; bad examples skipped (at most 1%), long text truncated.
  mesh       FSDP over all devices: (data, fsdp, tensor) = (1, -1, 1). Where the fsdp size does
             not divide SigLIP's width 1152 (256 chips, say), the ViT stays whole on every chip (a
             warning says so); ``--config.mesh.shape=-1,64,1`` then shards it (docs/SCALING.md).
  train      global batch 8192 (the paper's; 256 TPUv4 chips); 100M samples = 12,207 steps; the
             loss in chunks of 32 text positions (``train.loss_chunk``: full logits never held).
"""

import ml_collections

from configs import base

PEAK_LR = 2e-5 * 0.5


def make_config(method: str, image_size: int = 224) -> ml_collections.ConfigDict:
  c = base.get_config(method)

  # ---------------------------------------------------------------- model
  c.model.dtype = "bfloat16"
  v = c.model.vision
  v.variant = "so400m_14"            # SigLIP So400m/14 (models/vit.py PRESETS): width 1152, 27 blocks
  v.image_size = image_size          # over the preset's 224: 224 -> 16 x 16 grid, 448 -> 32 x 32
  v.posemb = "learn"
  v.center_input = False             # SigLIP was pretrained on raw [-1, 1] pixels
  v.scan = True
  v.remat = "full"

  con = c.model.connector
  con.num_heads = 12                 # paper: 12 heads at width 1152
  con.mlp_dim = 4304                 # paper: one MLP (hidden 4304) on the query tokens
  con.bank_size = 0                  # what the budget space needs (PARCEL 192 / 768, MQT 256)

  d = c.model.decoder
  d.variant = "gemma2_2b"            # Gemma-2 2B (models/gemma.py PRESETS): width 2304, 26 layers,
                                     # vocabulary 257,152; below, its architecture switches
  d.post_norms = True
  d.attn_softcap = 50.0
  d.final_softcap = 30.0             # logit soft-capping switch: 30.0 = on (pretraining), 0 = off (transfer)
  d.sliding_window = 4096
  d.local_global = True
  d.query_scale = 256 ** -0.5        # Gemma-2 2B: query_pre_attn_scalar = 256
  d.rope_base = 10_000.0
  d.prefix_token_shift = 0           # Gemma 2 has none (its checkpoints hold no such weights)
  d.window_prefix = "window"         # window | full: local layers and the prefix (equal below 4096 tokens)
  d.scan = True
  d.remat = "full"

  # ----------------------------------------------------------------- init
  c.init.hf_checkpoint = ""          # HF PaliGemma-2 checkpoint directory ('' = random init)
  c.init.big_vision_npz = ""         # or a big_vision-layout .npz (parcel_jax/weights/big_vision.py)
  c.init.dims_from_checkpoint = True  # model.vision / model.decoder dims from the checkpoint's config.json
  c.init.keep = ("decoder.final_softcap",)  # fields the config keeps even then

  # ---------------------------------------------------------------- budgets
  c.budget.sampling = "per_batch"
  c.budget.distribution = "uniform"
  c.budget.ramp_fraction = 0.0       # the paper samples every budget from the first step

  # ----------------------------------------------------------------- data
  c.data.name = "llava"              # llava | jsonl | tfds (synthetic works too)
  c.data.train_path = ""             # LLaVA JSON (or .jsonl) of the training mix
  c.data.eval_path = ""              # the eval file (same format)
  c.data.image_root = ""             # '' = the data file's folder
  c.data.tfds_name = ""              # data.name=tfds: a dataset prepared as ArrayRecord
  c.data.tfds_data_dir = ""
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_key = "image"         # jsonl / tfds field names
  c.data.prefix_key = "prefix"
  c.data.suffix_key = "suffix"
  c.data.tokenizer = c.init.get_ref("hf_checkpoint")  # Gemma tokenizer: the checkpoint's by default
  c.data.on_error = "skip"           # raise | skip (counted per kind, logged as data/skipped_*)
  c.data.max_skip_fraction = 0.01
  c.data.long_text = "truncate"      # truncate | reject
  c.data.conversation = "multi_turn"  # llava: multi_turn (a record = one example) | single_exchange
  c.data.max_text_len = 128          # BOS + prefix + "\n" + suffix + EOS
  c.data.eval_size = 1 << 30         # real data: the eval file's length bounds eval.num_examples
  c.data.num_threads = 16

  # -------------------------------------------------------------- optimiser
  c.optim.lr = PEAK_LR
  c.optim.warmup_steps = 600         # ~5% of the schedule
  c.optim.schedule = "cosine"
  c.optim.end_lr_fraction = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999                 # Adam's default betas
  c.optim.weight_decay = 0.0         # Adam, not AdamW
  c.optim.clip_norm = 1.0
  c.optim.lr_multipliers = (("^(connector|projection)/", 1.0),)  # the connector follows the projection's schedule
  c.optim.freeze = ""                # everything trainable

  # ---------------------------------------------------------------- train
  c.train.batch_size = 8192
  c.train.num_steps = 12_207         # 100M samples
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.loss_chunk = 32            # 4 chunks of the 128 text positions: a 257k-vocabulary head's
                                     # logits and their gradient, 1/4 at a time

  # ----------------------------------------------------------------- eval
  c.eval.budgets = (64, 256, 1024) if image_size == 448 else (16, 64, 256)
  c.eval.batch_size = 256
  c.eval.num_examples = 10_000

  # ----------------------------------------------------------------- mesh
  c.mesh.shape = (1, -1, 1)          # FSDP over every device (GSPMD)
  return c
