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

from vit22b import config_base
from vit22b.config_args import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, variant="22B/14", batch=65_536, steps=177_000, runlocal=False)
    c = config_base.base()
    c.total_steps = 30 if a.runlocal else a.steps
    c.log_every = 10 if a.runlocal else 50
    c.eval_every = 30 if a.runlocal else 5_000
    c.checkpoint_every = 30 if a.runlocal else 1_000
    c.mesh = "fsdp:-1"  # 2-D parameter sharding; add a model axis at launch, e.g. "fsdp:-1,model:8"
    c.keep_checkpoints = 3

    c.input.data = "digits" if a.runlocal else "jft"
    if not a.runlocal:
        c.input.update(eval_split="validation", num_workers=16, num_threads=32)
    c.input.batch_size = 32 if a.runlocal else a.batch
    c.input.eval_batch_size = 32 if a.runlocal else 1024
    size = c.input.image_size = 8 if a.runlocal else 224
    # big_vision's JFT pre-training chain: inception crop and flip
    c.input.pp_train = f"decode|inception_crop({size})|flip_lr|value_range(-1, 1)"
    c.input.pp_eval = f"decode|resize({size})|value_range(-1, 1)"

    c.model_name = "vit"
    c.model.variant = a.variant
    # Explicit shape keys override the variant (None = take it from the variant).
    for key in ("width", "depth", "mlp_dim", "num_heads", "patch_size"):
        c.model[key] = ml_collections.FieldReference(None, field_type=int)
    if a.runlocal:
        c.model.update(width=32, depth=2, mlp_dim=128, num_heads=2, patch_size=2)
    config_base.vit22b_design(c.model)
    c.model.head_bias_init = -10.0  # sigmoid over ~30k classes starts near p = 0
    c.model.parallel_linear = "collective"  # the paper's asynchronous parallel linear ops
    c.model.remat_policy = "none" if a.runlocal else "dots_no_batch"
    c.model.dtype = "float32" if a.runlocal else "bfloat16"

    c.loss = "sigmoid_xent"
    c.optimizer = "adafactor_bv"
    c.optimizer_kw = dict(momentum=0.9, momentum_dtype="bfloat16")
    c.wd = 0.03  # decoupled, times the lr schedule: body 0.03, head 0.03 * 100 = 3.0
    c.wd_mults = [("head/kernel", 100.0), (".*kernel", 1.0)]
    c.schedule = dict(decay_type="rsqrt", timescale=10_000, warmup_steps=3 if a.runlocal else 10_000,
                      cooldown_steps=3 if a.runlocal else 30_000)
    return c
