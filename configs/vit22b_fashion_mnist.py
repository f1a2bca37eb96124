"""The ViT-22B-design demo model on Fashion-MNIST (28x28 grey, 10 classes), read from local ArrayRecord files
converted from Debian's dataset-fashion-mnist package (no network):

  apt-get install dataset-fashion-mnist
  python data/make_arrayrecord.py fashion_mnist --out ~/tensorflow_datasets/fashion_mnist
  python -m vit22b.main --config=configs/vit22b_fashion_mnist.py --workdir=/tmp/fmnist

Parallel block with fused projections, QK-norm, no QKV/norm biases (RMSNorm), MAP head; patch 7 (16 tokens),
width 64, depth 4, batch 256, 5,000 AdamW steps at lr 2e-3 (cosine). On the 2-core development machine this
reached 90.24% test accuracy in 14 min 22 s wall clock, compilation and evaluation included.
Args: steps, batch, width, depth, workers, runlocal (a few steps for the tests).
"""
import ml_collections

from vit22b.config_args import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, steps=5000, batch=256, width=64, depth=4, workers=0, runlocal=False)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 20 if a.runlocal else a.steps
    c.log_every = 10 if a.runlocal else 200
    c.eval_every = 20 if a.runlocal else 2000
    c.checkpoint_every = 20 if a.runlocal else 2000
    c.mesh = "data:-1"
    c.optimizer_sharding = "replicated"
    c.keep_checkpoints = 2

    c.input = ml_collections.ConfigDict()
    c.input.data = "fashion_mnist"
    c.input.data_dir = ""  # default: $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.input.split = "train"
    c.input.eval_split = "test"
    c.input.batch_size = 32 if a.runlocal else a.batch
    c.input.eval_batch_size = 500
    c.input.image_size = 28
    c.input.pp_train = "decode(1, (28, 28))|flip_lr|value_range(-1, 1)"
    c.input.pp_eval = "decode(1, (28, 28))|value_range(-1, 1)"
    c.input.on_bad_record = "skip"
    c.input.num_workers = a.workers
    c.input.num_threads = 2
    c.input.prefetch = 8

    c.model_name = "vit"
    c.model = ml_collections.ConfigDict()
    c.model.variant = ml_collections.FieldReference(None, field_type=str)
    c.model.width = a.width
    c.model.depth = a.depth
    c.model.mlp_dim = 4 * a.width
    c.model.num_heads = 4
    c.model.patch_size = 7
    c.model.block = "parallel"
    c.model.qk_norm = True
    c.model.qkv_bias = False
    c.model.norm = "rmsnorm"
    c.model.head = "map"
    c.model.posemb = "learn"
    c.model.head_bias_init = 0.0
    c.model.scan = True
    c.model.remat_policy = "none"
    c.model.impl = "reference"  # "cpu": the opt-in XLA:CPU kernels (vit22b/models/cpu/)
    c.model.attention_impl = "auto"  # "xla" | "cudnn" (vit22b/models/attention.py)
    c.model.parallel_linear = "xla"
    c.model.collective_ring = "bidirectional"
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"

    c.loss = "softmax_xent"
    c.label_smoothing = 0.0
    c.optimizer = "adamw"
    c.optimizer_kw = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999))
    c.lr = 2e-3
    c.wd = 1e-4
    c.wd_mults = [(".*kernel", 1.0)]
    c.grad_clip_norm = 1.0
    c.schedule = ml_collections.ConfigDict(dict(decay_type="cosine", warmup_steps=5 if a.runlocal else 200))
    return c
