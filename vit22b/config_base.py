"""What the configs in configs/ share, so that each states only what differs.

`base()` is a complete config minus the dataset, the model family and the schedule; `vit22b_design(c.model)` and
`classic_vit(c.model)` set the ViT family's block switches for the two designs. The base lives in the package
(not beside the configs) so that a config file loads from any path, also with vit22b installed non-editable.
"""
import ml_collections


def base():
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Devices as (data, fsdp, model); see vit22b/parallel/sharding.py. ZeRO-1 with optimizer_sharding = "zero1".
    c.mesh = "data:-1"
    c.optimizer_sharding = "replicated"
    c.keep_checkpoints = 2
    # Keys whose change on resume is deliberate, comma-separated (vit22b/train/resume.py lists those always allowed).
    c.allow_config_change = ""

    c.input = ml_collections.ConfigDict()
    c.input.data_dir = ""  # empty: $TFDS_DATA_DIR, else ~/tensorflow_datasets
    c.input.split = "train"
    c.input.eval_split = "test"
    c.input.on_bad_record = "skip"  # or "error"; skipped records are counted in train/bad_records
    c.input.num_workers = 0  # Grain worker processes (mp_prefetch); batches do not depend on it
    c.input.num_threads = 2
    c.input.prefetch = 8

    c.model = ml_collections.ConfigDict()
    c.model.scan = True
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
    # >1: each step's gradient summed over this many microbatches of input.batch_size / grad_accum_steps (the same
    # update as the whole batch, in less activation memory).
    c.grad_accum_steps = 1
    # Instability monitors measured on logged steps (vit22b/train/monitors.py); --config.monitors="()" for none.
    c.monitors = ("attention", "residual", "logits")
    c.z_loss = 0.0  # z_loss * logsumexp(logits)^2 added to softmax_xent (1e-4 in arXiv 2309.14322)
    return c


def vit22b_design(model):
    """ViT-22B's changes: parallel block with fused projections, QK-norm, no QKV or norm biases, MAP head."""
    model.update(block="parallel", qk_norm=True, qkv_bias=False, norm="rmsnorm", head="map", posemb="learn",
                 head_bias_init=0.0)
    # "collective": the paper's asynchronous parallel linear ops as rings over the mesh's model axis
    # (vit22b/parallel/collective.py); "xla" leaves the collectives to XLA's partitioner.
    model.parallel_linear = "xla"
    model.collective_ring = "bidirectional"


def classic_vit(model):
    """The original ViT: sequential pre-norm block, LayerNorm, QKV biases, class-token head."""
    model.update(block="sequential", qk_norm=False, qkv_bias=True, norm="layernorm", head="token", posemb="learn")


def small_vit(model, width, depth, patch_size, num_heads=4):
    """A ViT shape given by its keys instead of a named variant (MLP 4x the width)."""
    model.variant = ml_collections.FieldReference(None, field_type=str)
    model.update(width=width, depth=depth, mlp_dim=4 * width, num_heads=num_heads, patch_size=patch_size)
