"""The ViT family on ImageNet-1k from TFDS: big_vision's ILSVRC-2012 recipe (configs/vit_i1k.py, "How to train
your ViT", arXiv 2106.10270) -- classic ViT with a class token, batch 4096, 300 epochs on train[:99%], Adam
(0.9, 0.999) with decoupled weight decay 1e-4, lr 1e-3, 10k warm-up steps then cosine, gradient clipping 1.0,
softmax cross-entropy; inception crop 224, flip, RandAugment and mixup by variant (B/16: randaug(2, 15),
mixup 0.5); evaluation resize_small(256) + central_crop(224) on the validation split.

  python -m vit22b.main --config=configs/vit_imagenet.py:variant=B/16 --workdir=DIR
  python -m vit22b.main --config=configs/vit_imagenet.py:variant=S/16,aug=light2 --workdir=DIR
  python -m vit22b.main --config=configs/vit_imagenet.py:runlocal --workdir=DIR   # tiny, on bundled digits

Not reproduced: big_vision's pre-logits layer (`rep_size=True`) and its bfloat16 first Adam moment.
"""
import math

import ml_collections

from vit22b.config_args import parse_arg

TRAIN_IMAGES = 1_268_355  # 99% of ImageNet-1k's 1,281,167 training images (train[:99%])
# aug setting -> (RandAugment magnitude or None, mixup alpha); big_vision's table (AugReg, Fig. 4).
AUG = {"none": (None, 0.0), "light1": (0, 0.0), "light2": (10, 0.2), "medium1": (15, 0.2),
       "medium2": (15, 0.5), "strong1": (20, 0.5), "strong2": (20, 0.8)}
DEFAULT_AUG = {"Ti/16": "light1", "S/32": "light2", "S/16": "medium2", "B/32": "medium2", "B/16": "medium2",
               "L/16": "medium2"}


def get_config(arg=None):
    a = parse_arg(arg, variant="B/16", aug="", batch=4096, epochs=300, runlocal=False)
    aug = a.aug or DEFAULT_AUG.get(a.variant, "medium2")
    if aug not in AUG:
        raise ValueError(f"aug: {aug!r} is not one of {sorted(AUG)}")
    magnitude, mixup = AUG[aug]
    steps = math.ceil(a.epochs * TRAIN_IMAGES / a.batch)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 30 if a.runlocal else steps
    c.log_every = 10 if a.runlocal else 50
    c.eval_every = 30 if a.runlocal else 2500
    c.checkpoint_every = 30 if a.runlocal else 1000
    c.mesh = "data:-1"
    c.optimizer_sharding = "replicated"
    c.keep_checkpoints = 2

    c.input = ml_collections.ConfigDict()
    c.input.data = "digits" if a.runlocal else "imagenet2012"
    c.input.data_dir = ""
    c.input.split = "train" if a.runlocal else "train[:99%]"
    c.input.eval_split = "test" if a.runlocal else "validation"
    c.input.batch_size = 32 if a.runlocal else a.batch
    c.input.eval_batch_size = 64 if a.runlocal else 1024
    size = c.input.image_size = 16 if a.runlocal else 224
    randaug = "" if magnitude is None else f"|randaug(2, {magnitude})"
    c.input.pp_train = f"decode|inception_crop({size})|flip_lr{randaug}|value_range(-1, 1)"
    c.input.pp_eval = f"decode|resize_small({size * 8 // 7})|central_crop({size})|value_range(-1, 1)"
    if mixup:
        c.input.mixup = ml_collections.ConfigDict(dict(mixup_alpha=mixup, cutmix_alpha=0.0, prob=1.0))
    c.input.on_bad_record = "skip"
    c.input.num_workers = 0 if a.runlocal else 16
    c.input.num_threads = 2 if a.runlocal else 16
    c.input.prefetch = 8

    c.model_name = "vit"
    c.model = ml_collections.ConfigDict()
    c.model.variant = a.variant
    if a.runlocal:
        c.model.update(width=32, depth=2, mlp_dim=128, num_heads=2, patch_size=4)
    c.model.block = "sequential"
    c.model.qk_norm = False
    c.model.qkv_bias = True
    c.model.norm = "layernorm"
    c.model.head = "token"
    c.model.posemb = "learn"
    c.model.scan = True
    c.model.remat_policy = "none"
    c.model.impl = "reference"  # "cpu": the opt-in XLA:CPU kernels (vit22b/models/cpu/)
    c.model.attention_impl = "auto"  # "xla" | "cudnn" (vit22b/models/attention.py)
    c.model.dtype = "float32" if a.runlocal else "bfloat16"
    c.model.param_dtype = "float32"

    c.loss = "softmax_xent"
    c.label_smoothing = 0.0
    c.optimizer = "adamw"
    c.optimizer_kw = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999))
    c.lr = 1e-3
    c.wd = 1e-4
    c.wd_mults = [(".*kernel", 1.0)]
    c.grad_clip_norm = 1.0
    c.schedule = ml_collections.ConfigDict(dict(decay_type="cosine", warmup_steps=3 if a.runlocal else 10_000))
    return c
