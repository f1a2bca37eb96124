"""SimMIM on Fashion-MNIST, the demonstration in docs/simmim.md: a small ViT of the ViT-22B design pretrained on
the 60,000 training images without their labels, then fine-tuned on the first 10% of the labelled training set
(train[:10%], 6,000 images), against the same model trained from scratch on those 6,000 for the same number of
steps. Images 28 px resized to 32, patch 4 (64 tokens), width 96, depth 4; 8-px masks at ratio 0.6.

  python -m vit22b.main --config=configs/simmim_fashion_mnist.py:stage=pretrain --workdir=/tmp/fm_pre
  python -m vit22b.main --config=configs/simmim_fashion_mnist.py:stage=finetune,init=/tmp/fm_pre/checkpoints/1000 \
      --workdir=/tmp/fm_finetune
  python -m vit22b.main --config=configs/simmim_fashion_mnist.py:stage=scratch --workdir=/tmp/fm_scratch
"""
import ml_collections

from vit22b import config_base
from vit22b.config_args import parse_arg

STAGES = ("pretrain", "finetune", "scratch")


def get_config(arg=None):
    a = parse_arg(arg, stage="pretrain", init="", steps=0, batch=128, runlocal=False)
    if a.stage not in STAGES:
        raise ValueError(f"config arg stage: {a.stage!r} is not one of {STAGES}")
    pretrain = a.stage == "pretrain"
    c = config_base.base()
    c.total_steps = 6 if a.runlocal else a.steps or (1000 if pretrain else 400)
    c.log_every = 2 if a.runlocal else 100
    c.eval_every = c.checkpoint_every = 6 if a.runlocal else c.total_steps

    c.input.data = "fashion_mnist"
    c.input.split = "train" if pretrain else "train[:10%]"
    c.input.batch_size = 16 if a.runlocal else a.batch
    c.input.eval_batch_size = 500
    c.input.image_size = 32
    c.input.pp_train = "decode(1, (28, 28))|resize(32)|flip_lr|value_range(-1, 1)"
    c.input.pp_eval = "decode(1, (28, 28))|resize(32)|value_range(-1, 1)"
    if pretrain:
        c.simmim = ml_collections.ConfigDict(dict(mask_patch_size=8, mask_ratio=0.6, norm_target_kernel=0))

    c.model_name = "vit"
    config_base.small_vit(c.model, width=96, depth=4, patch_size=4)
    config_base.vit22b_design(c.model)
    c.model_init = a.init if a.stage == "finetune" else ""

    c.optimizer_kw.eps = 1e-8
    c.lr = 2e-3 if pretrain else 1e-3
    c.wd = 0.05
    c.wd_mults = [(".*kernel", 1.0)]
    c.grad_clip_norm = 5.0
    c.label_smoothing = 0.0 if pretrain else 0.1
    if a.stage == "finetune":
        c.layer_decay = 0.75
    c.schedule = dict(decay_type="cosine", warmup_steps=2 if a.runlocal else (100 if pretrain else 40))
    return c
