"""Fine-tuning Swin V2 on ImageNet-1k from a SimMIM pretraining (configs/simmim_swinv2_imagenet.py), the official
recipe (simmim_finetune__swinv2_base__img224_window14__800ep.yaml): 224 px, window 14 with pretrained windows
12,12,12,6 (the log-spaced position bias carries over), 100 epochs, lr 1.25e-3 per 512 images, 20 warm-up
epochs, cosine to 2.5e-7, layer-wise lr decay 0.75 (the official grouping), drop path 0.1, weight decay 0.05;
the rest as configs/swinv2_imagenet.py. `init` is the SimMIM run's checkpoint step (its encoder is taken, the mask
token and decoder dropped, the head starts fresh) or a folder written by `python -m vit22b.models.convert` (an
official SimMIM .pth).

  python -m vit22b.main --config=configs/swinv2_finetune_imagenet.py:init=PRE/checkpoints/STEP --workdir=DIR
  python -m vit22b.main --config=configs/swinv2_finetune_imagenet.py:runlocal --workdir=DIR   # tiny, digits
"""
import os

from vit22b.config_args import load_config, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, variant="B", init="", batch=2048, epochs=100, runlocal=False)
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "swinv2_imagenet.py")
    c = load_config(f"{base}:variant={a.variant},img=224,window=14,batch={a.batch},epochs={a.epochs}"
                    + (",runlocal" if a.runlocal else ""))
    c.model_init = a.init
    if not a.runlocal:
        c.model.pretrained_window_sizes = (12, 12, 12, 6)
        c.model.drop_path_rate = 0.1
        steps_per_epoch = c.total_steps // a.epochs
        c.lr = 1.25e-3 * a.batch / 512
        c.schedule = dict(decay_type="cosine", warmup_steps=20 * steps_per_epoch, min_mult=2.5e-7 / c.lr)
    c.layer_decay = 0.75
    return c
