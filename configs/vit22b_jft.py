"""ViT-22B/14 on JFT, the paper recipe (arXiv 2302.05442; see shared reference vit22b.md, section 3).

Width 6144, depth 48, MLP 24576, 48 heads, patch 14, 224 px -> 256 tokens, MAP head; parallel block with fused
projections, QK-norm, no QKV or norm biases. Sigmoid cross-entropy over ~30k multi-label classes.
big_vision's Adafactor (bf16 momentum), reciprocal-sqrt schedule with 10k linear warm-up and 30k linear
cool-down, weight decay 3.0 on the head and 0.03 on the body, batch 65,536 for 177k steps (~3 epochs of 4B).

  python -m vit22b.main --config=configs/vit22b_jft.py --workdir=DIR
  python -m vit22b.main --config=configs/vit22b_jft.py:variant=B/16,batch=4096 --workdir=DIR
  python -m vit22b.main --config=configs/vit22b_jft.py:runlocal --workdir=DIR   # tiny, on bundled digits
"""
import ml_collections

from vit22b.config_args import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, variant="22B/14", batch=65_536, steps=177_000, runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 30 if a.runlocal else a.steps
    c.log_every = 10 if a.runlocal else 50
    c.eval_every = 30 if a.runlocal else 5_000
    c.checkpoint_every = 30 if a.runlocal else 1_000
    # Devices as (data, fsdp, model); see vit22b/parallel/sharding.py. ZeRO-1 with optimizer_sharding = "zero1".
    c.mesh = "fsdp:-1"  # 2-D parameter sharding; add a model axis at launch, e.g. "fsdp:-1,model:8"
    c.optimizer_sharding = "replicated"
    c.keep_checkpoints = 3

    c.input = ml_collections.ConfigDict()
    c.input.data = "digits" if a.runlocal else "jft"
    c.input.data_dir = ""  # empty: $TFDS_DATA_DIR, else ~/tensorflow_datasets
    c.input.split = "train"
    c.input.eval_split = "test" if a.runlocal else "validation"
    c.input.batch_size = 32 if a.runlocal else a.batch
    c.input.eval_batch_size = 32 if a.runlocal else 1024
    c.input.image_size = 8 if a.runlocal else 224
    c.input.num_threads = 2 if a.runlocal else 32
    c.input.num_workers = 0 if a.runlocal else 16
    c.input.prefetch = 8
    size = c.input.image_size  # big_vision's JFT pre-training chain: inception crop and flip
    c.input.pp_train = f"decode|inception_crop({size})|flip_lr|value_range(-1, 1)"
    c.input.pp_eval = f"decode|resize({size})|value_range(-1, 1)"
    c.input.on_bad_record = "skip"

    c.model_name = "vit"
    c.model = ml_collections.ConfigDict()
    c.model.variant = a.variant
    # Explicit shape keys override the variant (None = take it from the variant).
    for key in ("width", "depth", "mlp_dim", "num_heads", "patch_size"):
        c.model[key] = ml_collections.FieldReference(None, field_type=int)
    if a.runlocal:
        c.model.update(width=32, depth=2, mlp_dim=128, num_heads=2, patch_size=2)
    c.model.block = "parallel"
    c.model.qk_norm = True
    c.model.qkv_bias = False
    c.model.norm = "rmsnorm"
    c.model.head = "map"
    c.model.posemb = "learn"
    c.model.head_bias_init = -10.0  # sigmoid over ~30k classes starts near p = 0
    c.model.scan = True
    # The paper's asynchronous parallel linear ops: all-gather / reduce-scatter rings over the model axis
    # (vit22b/parallel/collective.py); "xla" leaves the collectives to XLA's partitioner.
    c.model.parallel_linear = "collective"
    c.model.collective_ring = "bidirectional"
    c.model.remat_policy = "none" if a.runlocal else "dots_no_batch"
    c.model.impl = "reference"  # "cpu": the opt-in XLA:CPU kernels (vit22b/models/cpu/)
    c.model.attention_impl = "auto"  # "xla" | "cudnn" (vit22b/models/attention.py)
    c.model.dtype = "float32" if a.runlocal else "bfloat16"
    c.model.param_dtype = "float32"

    c.loss = "sigmoid_xent"
    c.label_smoothing = 0.0
    c.optimizer = "adafactor_bv"
    c.optimizer_kw = ml_collections.ConfigDict(dict(momentum=0.9, momentum_dtype="bfloat16"))
    c.lr = 1e-3
    c.wd = 0.03  # decoupled, times the lr schedule: body 0.03, head 0.03 * 100 = 3.0
    c.wd_mults = [("head/kernel", 100.0), (".*kernel", 1.0)]
    c.grad_clip_norm = 1.0
    c.schedule = ml_collections.ConfigDict(dict(
        decay_type="rsqrt", timescale=10_000,
        warmup_steps=3 if a.runlocal else 10_000, cooldown_steps=3 if a.runlocal else 30_000))
    return c
