"""The main job on a laptop: a small model of the ViT-22B design on scikit-learn's digits (8x8, 10 classes).

Parallel block with fused projections, QK-norm, no QKV/norm biases (RMSNorm), MAP head. Width 64, depth 4,
patch 2 (16 tokens). python -m vit22b.main --config=configs/vit22b_digits.py --workdir=/tmp/digits
"""
from vit22b import config_base
from vit22b.config_args import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, steps=2000, batch=128, width=64, depth=4, runlocal=False)
    c = config_base.base()
    c.total_steps = 40 if a.runlocal else a.steps
    c.log_every = 10 if a.runlocal else 100
    c.eval_every = 20 if a.runlocal else 500
    c.checkpoint_every = 20 if a.runlocal else 500

    c.input.data = "digits"
    c.input.batch_size = a.batch
    c.input.eval_batch_size = 128
    c.input.image_size = 8
    # Preprocess chains (vit22b/input/preprocess.py); digits are 8x8 grey arrays in [0, 1].
    c.input.pp_train = c.input.pp_eval = "decode(1)|resize(8)|value_range(-1, 1)"

    c.model_name = "vit"
    config_base.small_vit(c.model, a.width, a.depth, patch_size=2)
    config_base.vit22b_design(c.model)

    c.schedule = dict(decay_type="cosine", warmup_steps=5 if a.runlocal else 100)
    return c
