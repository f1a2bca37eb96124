"""Instability monitors on logged steps: `config.monitors` lists what the logged train step measures, in one extra
forward pass without gradients on its first microbatch (before the update), logged under `monitor/...`:

- 'attention': per block the largest attention logit and the mean attention entropy in nats
  (monitor/max_attn_logit/block_03, monitor/attn_entropy/block_03; under QK-norm also qk_gain, max |gamma_q gamma_k|,
  which bounds the logits at sqrt(head_dim) times it; Swin V2 also logit_scale_max, the largest exp(logit scale)
  against its clamp at 100), and over blocks monitor/max_attn_logit, monitor/attn_entropy_min, monitor/qk_gain;
- 'residual': per block the RMS of the residual stream and of each branch's contribution
  (monitor/residual_rms/block_03, monitor/attn_branch_rms/..., monitor/mlp_branch_rms/...), and
  monitor/residual_rms_ratio, the largest over the smallest across blocks (Swin V2's Fig. 2 quantity);
- 'logits' (classifiers): log Z = logsumexp(logits) (mean, min), the mean L2 norm and the largest |logit|, and
  with config.z_loss the z-loss term itself (monitor/logits/...).

Blocks are named block_NN (ViT), stageS_blockNN (Swin) and map_head (the ViT's MAP head, which QK-norm does not
touch: the summaries over blocks leave it out). The statistics come from the model
(vit22b/models/monitors.py); non-logged steps run a program without them (tests/test_monitors.py checks the
timing claim's premise: the same compiled program).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np

from vit22b.models import monitors as model_monitors
from vit22b.train import tasks

KINDS = {"attention": model_monitors.ATTENTION, "residual": model_monitors.RESIDUAL, "logits": None}
DEFAULT = ("attention", "residual", "logits")


def kinds(config):
    value = config.get("monitors", DEFAULT)
    return tuple(value or ())


def check(config):
    """A ValueError naming config.monitors for an unknown entry."""
    value = config.get("monitors", DEFAULT)
    if value is not None and (isinstance(value, str) or not all(isinstance(k, str) for k in value)):
        raise ValueError(f"monitors: a tuple of names from {list(KINDS)}, not {value!r}")
    for k in value or ():
        if k not in KINDS:
            raise ValueError(f"monitors: unknown monitor {k!r}; known: {list(KINDS)}")


def compute(model, params, batch, config, which):
    """The monitors `which` on `batch` (traced inside the step): a tree of float32 arrays that `flatten` names."""
    cols = [KINDS[k] for k in which if KINDS[k]]
    params = jax.lax.stop_gradient(params)
    args = (batch["image"], batch["simmim_mask"]) if tasks.is_simmim(config) else (batch["image"],)
    out, tree = model.apply({"params": params}, *args, train=False, mutable=cols)
    tree = dict(tree)
    if "logits" in which and not tasks.is_simmim(config):
        w = batch["mask"].astype(jnp.float32)
        n = jnp.maximum(w.sum(), 1.0)
        log_z = jax.nn.logsumexp(out, axis=-1)
        tree["logits"] = {"log_z_mean": (log_z * w).sum() / n,
                          "log_z_min": jnp.min(jnp.where(w > 0, log_z, jnp.inf)),
                          "norm": (jnp.linalg.norm(out, axis=-1) * w).sum() / n,
                          "max_abs": jnp.max(jnp.abs(out) * w[:, None])}
        if config.get("z_loss", 0.0):
            tree["logits"]["z_loss"] = config.z_loss * (jnp.square(log_z) * w).sum() / n
    return jax.lax.stop_gradient(tree)


def _block_values(path, node, out):
    """Walk the sown tree; out[(statistic, block label)] = value. Scanned groups stack on axis 0."""
    if isinstance(node, (tuple, list)):  # sow's (value,)
        node = node[0]
    if not isinstance(node, dict):
        mods = [m for m in path[:-1] if m not in ("encoder", "attn", "attention")]
        for label, v in _labels(mods, np.asarray(node)):
            out[(path[-1], label)] = float(v)
        return
    for key, child in node.items():
        _block_values(path + (key,), child, out)


def _labels(mods, value):
    """(label, value) pairs for one sown leaf at module path `mods` (see the module docstring for the names)."""
    joined = "/".join(mods)
    if joined == "blocks":  # ViT's scanned stack: [depth]
        return [(f"block_{i:02d}", v) for i, v in enumerate(value)]
    if m := re.fullmatch(r"layers_(\d+)_blocks/blocks_(\d+)", joined):  # Swin's scanned groups: [groups]
        return [((m.group(1), int(m.group(2)), i), v) for i, v in enumerate(value)]  # resolved in flatten
    if m := re.fullmatch(r"layers_(\d+)_blocks_(\d+)", joined):
        return [(f"stage{m.group(1)}_block{int(m.group(2)):02d}", value)]
    if value.ndim:
        return [(f"{joined}_{i:02d}", v) for i, v in enumerate(value.reshape(-1))]
    return [(joined, value)]


def flatten(tree):
    """The tree `compute` made (fetched to the host) as {'monitor/...': float}, with the summaries over blocks."""
    tree = dict(tree)
    logits = tree.pop("logits", {})
    values = {}
    for collection in tree.values():
        _block_values((), collection, values)
    # Swin's scanned group entries (stage, position in group, group index) -> stage block numbers.
    group = {}
    for _, label in values:
        if isinstance(label, tuple):
            group[label[0]] = max(group.get(label[0], 0), label[1] + 1)
    named = {}
    for (stat, label), v in values.items():
        if isinstance(label, tuple):
            stage, k, i = label
            label = f"stage{stage}_block{i * group[stage] + k:02d}"
        named[(stat, label)] = v
    out = {f"monitor/{stat}/{label}": v for (stat, label), v in sorted(named.items())}

    def over_blocks(stat):
        return [v for (s, label), v in named.items() if s == stat and label != "map_head"]

    for stat, name, reduce in (("max_attn_logit", "max_attn_logit", max), ("attn_entropy", "attn_entropy_min", min),
                               ("logit_scale_max", "logit_scale_max", max), ("qk_gain", "qk_gain", max),
                               ("residual_rms", "residual_rms_max", max)):
        vs = over_blocks(stat)
        if vs:
            out[f"monitor/{name}"] = float(reduce(vs))
    rms = over_blocks("residual_rms")
    if rms:
        out["monitor/residual_rms_ratio"] = float(max(rms) / max(min(rms), 1e-30))
    out.update({f"monitor/logits/{k}": float(v) for k, v in logits.items()})
    return out
