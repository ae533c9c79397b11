"""The embedded default, and the schema every config follows.

    python -m parcel_jax.train --config=configs/base.py --workdir=/tmp/parcel

trains a tiny PaliGemma-style model (64 px images, patch 4 -> the paper's 16x16
feature grid, so PARCEL's routing applies unchanged) on the synthetic visual-QA
task on CPU in minutes. Baselines and ablations are overrides, not copies:

    --config.model.connector.method=m3            # or mqt, none
    --config.model.connector.routing=fixed4x4     # PARCEL fixed-routing ablations
    --config.model.connector.conditioning=none    # ViT-only cross-attention ablation
    --config.model.connector.method=m3 --config.model.connector.budgets=16,   # pooling specialist

Every field is read somewhere; `parcel_jax.config.validate_config` checks them
before anything is compiled. 0 means "off"/"automatic" where a comment says so
(ml_collections cannot override fields that default to None).

Model sizes are named presets: `model.vision.variant` (models/vit.py PRESETS) and
`model.decoder.variant` (models/gemma.py PRESETS) fill the size fields left at 0; a size set
here or on the command line wins over the preset (`--config.model.vision.variant=so400m_14
--config.model.vision.image_size=448`), and variant "" means no preset. The sizes read back
once `validate_config` (or `models.vlm.apply_presets(config.model)`) has filled them. Where
this file departs from SigLIP / Gemma-2 as the paper uses them (the schema's defaults), it is
for the from-scratch CPU task, and the comment says so.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg`` optionally names a connector method: ``--config=configs/base.py:m3``."""
  c = ml_collections.ConfigDict()
  c.seed = 0                      # parameters, data order and budget sampling all derive from it

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.dtype = "float32"       # compute dtype: float32 | bfloat16 (parameters stay float32)
  c.model.frame_posemb = "none"   # frames (data.max_frames > 1): none (PaliGemma) | sincos: a fixed
                                  # code of each frame's rank on its visual tokens (models/vlm.py)

  c.model.visual_positions = "packed"  # decoder positions: packed (text right after the budget's
                                       # tokens, PaliGemma) | reserved (text at the largest budget
                                       # whatever the budget) | spatial (each token at the grid
                                       # cell it stands for; models/vlm.py)

  c.model.vision = ml_collections.ConfigDict()      # SigLIP-style ViT (models/vit.py)
  c.model.vision.variant = "tiny"  # size preset (models/vit.py PRESETS: tiny | so400m_14): fills the
                                   # six size fields below that are 0; a non-zero one overrides it;
                                   # "" = no preset (set all six). tiny: 64 px, patch 4, width 64,
                                   # 1 block, mlp 256, 2 heads (its reasons are in PRESETS)
  c.model.vision.image_size = 0    # pixels; image_size / patch_size = feature grid (tiny: 16)
  c.model.vision.patch_size = 0
  c.model.vision.width = 0
  c.model.vision.depth = 0
  c.model.vision.mlp_dim = 0
  c.model.vision.num_heads = 0
  c.model.vision.posemb = "sincos2d"  # learn | sincos2d (fixed codes: position is readable from step 0)
  c.model.vision.center_input = True  # not SigLIP (default off): subtract each image's mean colour (a
                                   # from-scratch ViT otherwise spends hundreds of steps learning to
                                   # ignore the background cast)
  c.model.vision.attn_window = 0   # > 0: blocks attend only within windows of this many patches
                                   # per side (local attention); 0 = global. 2 lets the mixed family
                                   # leave its prior when trained alone but slows the others
  c.model.vision.global_blocks = 0  # with attn_window: the last this-many blocks attend globally
  c.model.vision.scan = False      # scan over layers (one compiled layer)
  c.model.vision.remat = "none"    # none | full | dots: rematerialisation policy

  c.model.connector = ml_collections.ConfigDict()   # models/connectors/ (one file per method)
  c.model.connector.method = arg or "parcel"  # parcel | m3 | mqt | none | random_subset (a file each)
  c.model.connector.routing = "piecewise"     # parcel: piecewise | fixed4x4 | fixed2x2
  c.model.connector.conditioning = "self_attn"  # parcel: self_attn | none (ViT-only) | dual_cross
  c.model.connector.extra_self_attn = False   # m3/mqt: add a self-attention block (ablation)
  c.model.connector.key_mode = "content+pos"  # content+pos (Qwen-VL) | pos_only (official MQT code)
  c.model.connector.key_pos = "sincos2d"      # position code on cross-attention keys: sincos2d | learned | none
  c.model.connector.anchor_pos = "sincos2d"   # position code on anchors inside self-attention: sincos2d | none
  c.model.connector.output_norm = True        # LayerNorm on emitted queries (scale of the ViT features)
  c.model.connector.num_heads = 2             # paper: 12 at width 1152; the width is the ViT width
  c.model.connector.mlp_dim = 256             # paper: 4304; one MLP on the query tokens
  c.model.connector.bank_size = 0             # 0: what the budget space needs (parcel 192, mqt 256)
  c.model.connector.query_init_std = 0.02
  c.model.connector.query_prior = "none"      # parcel/mqt: none | local (home cell + locality term per query)
  c.model.connector.query_prior_sigma = 1.0   # local: initial width of the locality term, patches
  c.model.connector.fetch_init = False        # parcel/mqt: queries start as copies of what they attend to
  c.model.connector.budgets = ()              # () = the method's whole space; a subset trains a specialist
  c.model.connector.query_bucket = 64         # query slots per compiled bucket (fewer programs vs padding)

  c.model.decoder = ml_collections.ConfigDict()     # Gemma-style prefix-LM (models/gemma.py)
  c.model.decoder.variant = "tiny"  # size preset (models/gemma.py PRESETS: tiny | gemma2_2b): fills the
                                   # seven size fields below that are 0; a non-zero one overrides it;
                                   # "" = no preset. tiny: width 64, 2 layers, mlp 256, 2 heads, 1 KV
                                   # head, head_dim 32, no vocabulary
  c.model.decoder.vocab_size = 0   # 0: the preset's, else the data's tokenizer decides
  c.model.decoder.width = 0
  c.model.decoder.depth = 0
  c.model.decoder.mlp_dim = 0
  c.model.decoder.num_heads = 0
  c.model.decoder.num_kv_heads = 0  # grouped-query attention (num_heads / num_kv_heads query heads per KV head)
  c.model.decoder.head_dim = 0
  c.model.decoder.post_norms = True     # Gemma-2 post-attention / post-MLP norms
  c.model.decoder.attn_softcap = 50.0   # Gemma-2 attention-logit soft-cap; 0 = off
  c.model.decoder.final_softcap = 30.0  # Gemma-2 final-logit soft-cap; 0 = off
  c.model.decoder.sliding_window = 0    # local layers' window in tokens; 0 = off (all global)
  c.model.decoder.local_global = False  # alternate local / global layers (needs sliding_window)
  c.model.decoder.query_scale = 0.0     # 0: head_dim ** -0.5
  c.model.decoder.rope_base = 10_000.0
  c.model.decoder.prefix_token_shift = 3  # not Gemma (default 0 = off): each prompt token's embedding
                                   # also gets a learned mix of the 3 before it, so "red" in "is the
                                   # red" differs from "to the red" (relation's subject vs reference)
  c.model.decoder.scan = False
  c.model.decoder.remat = "none"

  # -------------------------------------------------------------- budgets
  c.budget = ml_collections.ConfigDict()            # parcel_jax/budgets.py
  c.budget.sampling = "per_batch"   # per_batch | per_example (bucket per batch, budget per example)
                                    # | all_scales (the loss averaged over every budget each step:
                                    # M3's original objective; one step costs all scales together)
  c.budget.distribution = "log_uniform"  # uniform | log_uniform over the method's budget space;
                                    # log-uniform draws half its steps at B <= 64 (a third of
                                    # B = 256's cost): more steps in the same time
  c.budget.ramp_fraction = 0.5      # CPU task (the paper, and unset: 0 = every budget from step 0):
                                    # over this fraction of train.num_steps the largest open budget
                                    # rises geometrically from the smallest to the largest. Few tokens
                                    # first: the decoder learns to find objects among 16-64 tokens far
                                    # sooner than among 256

  # ----------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()              # parcel_jax/data/
  c.data.name = "synthetic"
  c.data.image_size = c.model.vision.get_ref("image_size")
  c.data.train_size = 1_000_000      # distinct procedurally generated training examples
  c.data.eval_size = 1024            # eval examples (a separate stream)
  c.data.families = ()               # () = the default mixture (synthetic.DEFAULT_FAMILIES); the
                                     # fine families by name, e.g. synthetic.FINE_FAMILIES
  # Training mixture over data.families (unnamed families weigh 1; all equal, or unset = uniform,
  # the default): for the CPU task more of the slow spatial families, less of detail (learned
  # first). The eval stream stays uniform.
  c.data.family_weights = ml_collections.ConfigDict(
      dict(grounding=3.0, relation=2.0, detail=1.0, counting=2.0, mixed=2.0,
           fine_grounding=3.0, fine_detail=1.0, reading=1.0))
  c.data.max_text_len = 16           # prefix + suffix tokens, padded
  c.data.max_frames = 1              # frames (video, or images) per example: 1 = one image,
                                     # (b, S, S, 3); T > 1: (b, T, S, S, 3) + frame_mask (b, T),
                                     # every frame at the example's budget (T*B visual tokens)
  c.data.num_threads = 2             # Grain prefetch threads; 0 = synchronous

  # -------------------------------------------------------------- optimiser
  c.optim = ml_collections.ConfigDict()             # parcel_jax/optim.py
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"        # cosine | constant (after warm-up)
  c.optim.end_lr_fraction = 0.05     # cosine floor, as a fraction of lr
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.weight_decay = 1e-4        # decoupled (AdamW); not applied to norms and biases
  c.optim.clip_norm = 1.0            # global gradient-norm clip; 0 = off
  c.optim.lr_multipliers = ()        # ((regex, multiplier), ...) on parameter paths, e.g. (("connector", 1.0),)
  c.optim.freeze = ""                # regex of parameter paths kept frozen ("" = none), e.g. "vision"
  c.optim.grad_accum_steps = 1       # micro-batches per update

  # ---------------------------------------------------------------- train
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32            # global batch
  c.train.num_steps = 5800          # the CPU task's length: README command 1 in 759-1917 s on
                                    # 2-core CPUs, pip included (the host decides)
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 2
  c.train.loss_chunk = 0             # > 0: the loss over this many text positions at a time, so the
                                     # (batch, text, vocab) logits are never held at once; 0 = at once
  c.train.stage1_steps = 0           # > 0: first train the backbone uncompressed (method none) for
                                     # this many steps in WORKDIR/stage1, then this config from it
                                     # (the paper's two-stage recipe; parcel_jax/stages.py)
  c.train.on_nonfinite = "skip"      # skip (no update, counted) | stop
  c.train.stop_at = 0                # end this process after this step (checkpointed; the
                                     # schedule still spans num_steps); 0 = run to num_steps
  c.train.host_malloc = "auto"       # CPU task: auto | reuse | system (host_memory's default): "reuse"
                                     # keeps XLA:CPU's per-step buffers mapped between steps (0.61-0.68x
                                     # the CPU step time; parcel_jax/host_memory.py); auto = reuse when
                                     # JAX runs on CPU only
  c.train.compilation_cache_dir = ""  # JAX persistent compilation cache directory (reused across
                                     # runs and restarts); "" = off

  # ----------------------------------------------------------------- init
  c.init = ml_collections.ConfigDict()              # parcel_jax/weights/, parcel_jax/stages.py
  c.init.hf_checkpoint = ""          # a Hugging Face PaliGemma(-2) directory ('' = random init)
  c.init.big_vision_npz = ""         # or a big_vision-layout .npz
  c.init.connector_safetensors = ""  # with either: a connector exported by parcel_jax.export
  c.init.stage1_workdir = ""         # or a stage-1 run (method none): its backbone, a fresh connector
  c.init.stage1_step = 0             # that run's checkpoint step; 0 = its latest

  # ----------------------------------------------------------------- eval
  c.eval = ml_collections.ConfigDict()
  c.eval.budgets = (4, 16, 32, 64, 128, 256)   # those the method supports are evaluated
  c.eval.batch_size = 128
  c.eval.num_examples = 1024         # <= data.eval_size

  # ----------------------------------------------------------------- mesh
  c.mesh = ml_collections.ConfigDict()              # parcel_jax/sharding.py
  c.mesh.shape = (-1, 1, 1)          # (data, fsdp, tensor); -1 = the remaining devices
  c.mesh.rules = ()                  # ((logical_name, mesh_axis), ...) replacing entries of
                                     # sharding.DEFAULT_RULES; mesh_axis: "data" | "fsdp" | "tensor",
                                     # a tuple of them, or "" = replicated; () = the defaults
  return c
