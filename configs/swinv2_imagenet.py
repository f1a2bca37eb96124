"""Swin Transformer V2 on ImageNet-1k, the official from-scratch recipe (microsoft/Swin-Transformer
configs/swinv2/*.yaml and config.py): AdamW (0.9, 0.999, eps 1e-8), 300 epochs with 20 of linear warm-up,
then per-step cosine to 5e-6; lr 5e-4 per 512 images, scaled linearly with the batch (1e-3 at 1024); weight
decay 0.05 except 1-D parameters, biases, cpb_mlp and logit_scale; label smoothing 0.1; gradient clipping at
5.0; drop path 0.2 / 0.3 / 0.5 for T / S / B.

  python -m vit22b.main --config=configs/swinv2_imagenet.py:variant=T --workdir=DIR   # swinv2_tiny_window8_256
  python -m vit22b.main --config=configs/swinv2_imagenet.py:variant=B,window=16 --workdir=DIR
  python -m vit22b.main --config=configs/swinv2_imagenet.py:runlocal --workdir=DIR   # tiny, on bundled digits

ImageNet is read from a TFDS ArrayRecord preparation (vit22b/input/datasets/imagenet2012.py; a missing one stops with the
command that prepares it). Augmentation as in the official recipe: random-resized crop (bicubic), flip,
RandAugment m9 (2 ops), mixup 0.8 / cutmix 1.0 (switch 0.5, always applied), ImageNet mean/std; evaluation
resizes the shorter side to img / 0.875 (bicubic) and takes the central crop. Not reproduced: timm's
random erasing (0.25) and the "mstd0.5" magnitude noise of its RandAugment.
"""
import ml_collections

from vit22b import config_base
from vit22b.config_args import parse_arg

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(arg=None):
    a = parse_arg(arg, variant="T", img=256, window=8, batch=1024, epochs=300, runlocal=False)
    c = config_base.base()
    steps_per_epoch = IMAGENET_TRAIN_IMAGES // a.batch
    c.total_steps = 300 if a.runlocal else a.epochs * steps_per_epoch
    c.log_every = 50 if a.runlocal else 100
    c.eval_every = 300 if a.runlocal else steps_per_epoch
    c.checkpoint_every = 300 if a.runlocal else 2_000
    c.keep_checkpoints = 3

    c.input.data = "digits" if a.runlocal else "imagenet2012"
    if not a.runlocal:
        c.input.update(eval_split="validation", num_workers=16, num_threads=32)
    c.input.batch_size = 64 if a.runlocal else a.batch
    c.input.eval_batch_size = 128 if a.runlocal else 1024
    size = c.input.image_size = 32 if a.runlocal else a.img
    c.input.pp_train = f"decode|inception_crop({size}, method='bicubic')|flip_lr|randaug(2, 9)|normalize"
    c.input.pp_eval = f"decode|resize_small({int(size / 0.875)}, 'bicubic')|central_crop({size})|normalize"
    if a.runlocal:  # digits: tiny, 1-channel, and few steps; resize and flip only
        c.input.pp_train = f"decode|resize({size})|flip_lr|value_range(-1, 1)"
        c.input.pp_eval = f"decode|resize({size})|value_range(-1, 1)"
    else:
        c.input.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)

    c.model_name = "swinv2"
    c.model.variant = a.variant
    c.model.window_size = 4 if a.runlocal else a.window
    c.model.pretrained_window_sizes = (0, 0, 0, 0)
    c.model.patch_size = 2 if a.runlocal else 4
    # None = the variant's official value.
    c.model.embed_dim = ml_collections.FieldReference(32 if a.runlocal else None, field_type=int)
    c.model.depths = ml_collections.FieldReference((1, 1, 2, 1) if a.runlocal else None, field_type=tuple)
    c.model.num_heads = ml_collections.FieldReference((2, 2, 4, 8) if a.runlocal else None, field_type=tuple)
    c.model.drop_path_rate = ml_collections.FieldReference(0.0 if a.runlocal else None, field_type=float)
    c.model.attn_chunks = 1  # >1: the paper's sequential self-attention in the first two stages
    c.model.dtype = "float32" if a.runlocal else "bfloat16"  # remat_policy "full": per-block checkpointing

    c.label_smoothing = 0.1
    c.optimizer_kw.eps = 1e-8
    c.lr = 2e-3 if a.runlocal else 5e-4 * a.batch / 512
    c.wd = 0.05
    # Kernels decay; 1-D parameters (biases, norms, q/v biases), logit_scale and the CPB MLP do not (nor V1's bias
    # table, with --config.model.position_bias=table: one rule that matches in either model).
    c.wd_mults = [(".*(cpb_mlp|relative_position_bias_table).*", 0.0), (".*kernel", 1.0)]
    c.grad_clip_norm = 5.0
    warmup = 20 if a.runlocal else 20 * steps_per_epoch
    c.schedule = dict(decay_type="cosine", warmup_steps=warmup, min_mult=5e-6 / 5e-4)
    c.model_init = ""  # an Orbax params checkpoint, e.g. written by `python -m vit22b.models.convert`
    return c
