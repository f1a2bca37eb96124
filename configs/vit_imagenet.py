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

from vit22b import config_base
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
    c = config_base.base()
    c.total_steps = 30 if a.runlocal else math.ceil(a.epochs * TRAIN_IMAGES / a.batch)
    c.log_every = 10 if a.runlocal else 50
    c.eval_every = 30 if a.runlocal else 2500
    c.checkpoint_every = 30 if a.runlocal else 1000

    c.input.data = "digits" if a.runlocal else "imagenet2012"
    if not a.runlocal:
        c.input.update(split="train[:99%]", eval_split="validation", num_workers=16, num_threads=16)
    c.input.batch_size = 32 if a.runlocal else a.batch
    c.input.eval_batch_size = 64 if a.runlocal else 1024
    size = c.input.image_size = 16 if a.runlocal else 224
    randaug = "" if magnitude is None else f"|randaug(2, {magnitude})"
    c.input.pp_train = f"decode|inception_crop({size})|flip_lr{randaug}|value_range(-1, 1)"
    c.input.pp_eval = f"decode|resize_small({size * 8 // 7})|central_crop({size})|value_range(-1, 1)"
    if mixup:
        c.input.mixup = dict(mixup_alpha=mixup, cutmix_alpha=0.0, prob=1.0)

    c.model_name = "vit"
    c.model.variant = a.variant
    if a.runlocal:
        c.model.update(width=32, depth=2, mlp_dim=128, num_heads=2, patch_size=4)
    config_base.classic_vit(c.model)
    c.model.dtype = "float32" if a.runlocal else "bfloat16"

    c.schedule = dict(decay_type="cosine", warmup_steps=3 if a.runlocal else 10_000)
    return c
