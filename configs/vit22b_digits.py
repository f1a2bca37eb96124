"""The main job on a laptop: a small model of the ViT-22B design on scikit-learn's digits (8x8, 10 classes).

Parallel block with fused projections, QK-norm, no QKV/norm biases (RMSNorm), MAP head. Width 64, depth 4,
patch 2 (16 tokens). python -m vit22b.main --config=configs/vit22b_digits.py --workdir=/tmp/digits
"""
import ml_collections

from vit22b.config_args import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, steps=2000, batch=128, width=64, depth=4, runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 40 if a.runlocal else a.steps
    c.log_every = 10 if a.runlocal else 100
    c.eval_every = 20 if a.runlocal else 500
    c.checkpoint_every = 20 if a.runlocal else 500
    # Devices as (data, fsdp, model); see vit22b/parallel/sharding.py. ZeRO-1 with optimizer_sharding = "zero1".
    c.mesh = "data:-1"
    c.optimizer_sharding = "replicated"
    c.keep_checkpoints = 2

    c.input = ml_collections.ConfigDict()
    c.input.data = "digits"
    c.input.data_dir = ""
    c.input.split = "train"
    c.input.eval_split = "test"
    c.input.batch_size = a.batch
    c.input.eval_batch_size = 128
    c.input.image_size = 8
    # Preprocess chains (vit22b/input/preprocess.py); digits are 8x8 grey arrays in [0, 1].
    c.input.pp_train = "decode(1)|resize(8)|value_range(-1, 1)"
    c.input.pp_eval = "decode(1)|resize(8)|value_range(-1, 1)"
    c.input.on_bad_record = "skip"  # or "error"; skipped records are counted in train/bad_records
    c.input.num_workers = 0  # Grain worker processes (mp_prefetch); batches do not depend on it
    c.input.num_threads = 2
    c.input.prefetch = 8

    c.model_name = "vit"
    c.model = ml_collections.ConfigDict()
    c.model.variant = ml_collections.FieldReference(None, field_type=str)
    c.model.width = a.width
    c.model.depth = a.depth
    c.model.mlp_dim = 4 * a.width
    c.model.num_heads = 4
    c.model.patch_size = 2
    c.model.block = "parallel"
    c.model.qk_norm = True
    c.model.qkv_bias = False
    c.model.norm = "rmsnorm"
    c.model.head = "map"
    c.model.posemb = "learn"
    c.model.head_bias_init = 0.0
    c.model.scan = True
    c.model.parallel_linear = "xla"  # or "collective": ring matmuls over the mesh's model axis
    c.model.collective_ring = "bidirectional"
    c.model.remat_policy = "none"
    c.model.impl = "reference"  # "cpu": the opt-in XLA:CPU kernels (vit22b/models/cpu/)
    c.model.attention_impl = "auto"  # "xla" | "cudnn" (vit22b/models/attention.py)
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"

    c.loss = "softmax_xent"
    c.label_smoothing = 0.0
    c.optimizer = "adamw"
    c.optimizer_kw = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999))
    c.lr = 1e-3
    c.wd = 1e-4
    c.wd_mults = [(".*kernel", 1.0)]
    c.grad_clip_norm = 1.0
    c.schedule = ml_collections.ConfigDict(dict(decay_type="cosine", warmup_steps=100 if not a.runlocal else 5))
    return c
