"""What a run learns: classification (labels, cross-entropy, top-1 accuracy), or SimMIM masked-image modelling
when `config.simmim` is set (vit22b/models/simmim.py: the images alone, the L1 reconstruction of masked pixels).

Both reduce a batch the same way: each example gives a loss sum and a weight (classification: its loss and 1;
SimMIM: its absolute errors over masked pixels and channels / channels, and its masked-pixel count), records the
pipeline could not decode give 0 and 0, and the batch loss is sum(losses) / normaliser(sum(weights)). Gradient
accumulation (vit22b/train/loop.py) sums microbatches of these with the whole batch's normaliser.
"""
import jax
import jax.numpy as jnp
import numpy as np

from vit22b import models
from vit22b.models import simmim
from vit22b.train import losses

SIMMIM_KEYS = ("mask_patch_size", "mask_ratio", "norm_target_kernel")


def is_simmim(config):
    return bool(config.get("simmim"))


def encoder_stride(encoder):
    """The total downsampling of an encoder's last feature map (SimMIM's decoder stride)."""
    if hasattr(encoder, "depths"):
        return encoder.patch_size * 2 ** (len(encoder.depths) - 1)
    return encoder.patch_size


def build_model(config, num_classes):
    name = config.get("model_name", "vit")
    if not is_simmim(config):
        return models.build(name, config.model, num_classes, config.input.image_size)
    encoder = models.build(name, config.model, 0, config.input.image_size)
    return simmim.SimMIM(encoder, stride=encoder_stride(encoder))


def model_patch(config):
    """The model's patch size, which SimMIM's token mask is laid over."""
    return build_model(config, 0).encoder.patch_size


def mask_op(config):
    """The preprocessing op that draws each example's SimMIM mask (appended to pp_train and pp_eval)."""
    s = config.simmim
    return (f"simmim_mask({config.input.image_size}, {s.get('mask_patch_size', 32)}, {model_patch(config)}, "
            f"{s.get('mask_ratio', 0.6)})")


def check(config):
    """ValueErrors naming config.simmim's fields, before anything compiles."""
    s, size = config.simmim, config.input.image_size
    for key in s:
        if key not in SIMMIM_KEYS:
            raise ValueError(f"simmim.{key}: unknown key; known: {list(SIMMIM_KEYS)}")
    patch, mask_patch = model_patch(config), s.get("mask_patch_size", 32)
    if size % mask_patch or mask_patch % patch:
        raise ValueError(f"simmim.mask_patch_size: {mask_patch} must divide input.image_size {size} and be a "
                         f"multiple of the model's patch size {patch}")
    if not 0.0 < s.get("mask_ratio", 0.6) < 1.0:
        raise ValueError(f"simmim.mask_ratio: must be in (0, 1), got {s.get('mask_ratio')}")
    kernel = s.get("norm_target_kernel", 0)
    if kernel and kernel % 2 == 0:
        raise ValueError(f"simmim.norm_target_kernel: an odd neighbourhood size or 0 (off), not {kernel}")


def input_keys(config):
    return ("image", "simmim_mask", "mask") if is_simmim(config) else ("image", "label", "mask")


def example_losses(model, params, batch, config, *, train, rng=None, smoothing=0.0):
    """(per-example loss sums, per-example weights, model output) for a batch; see the module docstring."""
    rngs = {"dropout": rng} if rng is not None else None
    if is_simmim(config):
        token_mask = batch["simmim_mask"]
        rec = model.apply({"params": params}, batch["image"], token_mask, train=train, rngs=rngs)
        pixels = simmim.pixel_mask(token_mask, model.encoder.patch_size).astype(jnp.float32)
        kernel = config.simmim.get("norm_target_kernel", 0)
        target = simmim.norm_targets(batch["image"], kernel) if kernel else batch["image"].astype(jnp.float32)
        error = jnp.abs(target - rec) * pixels[..., None]
        sums = error.sum(axis=(1, 2, 3)) / batch["image"].shape[-1]
        return sums * batch["mask"], pixels.sum(axis=(1, 2)) * batch["mask"], rec
    logits = model.apply({"params": params}, batch["image"], train=train, rngs=rngs)
    per_example = losses.per_example_loss(config.loss, logits, batch["label"], smoothing,
                                          z_loss=config.get("z_loss", 0.0) if train else 0.0)
    return per_example * batch["mask"], batch["mask"], logits


def batch_weight(model, batch, config):
    """The sum of the batch's example weights (as example_losses gives them), without running the model."""
    if is_simmim(config):
        pixels = simmim.pixel_mask(batch["simmim_mask"], model.encoder.patch_size).astype(jnp.float32)
        return (pixels.sum(axis=(1, 2)) * batch["mask"]).sum()
    return batch["mask"].sum()


def normaliser(config, weights):
    """The batch loss's denominator: SimMIM's official sum(mask) + 1e-5, else the number of examples (>= 1)."""
    return weights + 1e-5 if is_simmim(config) else jnp.maximum(weights, 1.0)


def eval_sums(model, params, batch, config):
    """Sums over an evaluation batch that `eval_metrics` turns into the logged values."""
    sums, weights, out = example_losses(model, params, batch, config, train=False)
    totals = {"loss": sums.sum(), "weight": weights.sum(), "count": batch["mask"].sum()}
    if not is_simmim(config):
        totals["correct"] = (losses.top1_correct(out, batch["label"]) * batch["mask"]).sum()
    return totals


def eval_metrics(config, totals):
    out = {"eval/loss": totals["loss"] / float(normaliser(config, np.float32(totals["weight"])))}
    if not is_simmim(config):
        out["eval/accuracy"] = totals["correct"] / max(totals["count"], 1)
        out["eval/loss"] = totals["loss"] / max(totals["count"], 1)
    return out


def reconstruction_picture(model, params, batch, config, rows=8):
    """SimMIM's picture for a few evaluation images: original, masked input, reconstruction (the masked pixels
    predicted, the visible ones kept), side by side, as uint8 [rows * H, 3 * W, 3] (small images enlarged by whole
    pixels). With normalised targets the prediction is mapped back through each pixel's neighbourhood statistics
    of the original."""
    images = np.asarray(batch["image"][:rows], np.float32)
    token_mask = np.asarray(batch["simmim_mask"][:rows])
    rec = np.asarray(jax.jit(model.apply)({"params": params}, images, token_mask), np.float32)
    kernel = config.simmim.get("norm_target_kernel", 0)
    if kernel:
        rec = np.asarray(simmim.denormalise(images, rec, kernel))
    m = np.asarray(simmim.pixel_mask(token_mask, model.encoder.patch_size), np.float32)[..., None]
    lo, hi = images.min(), images.max()

    def to_uint8(x):
        x = (np.clip(x, lo, hi) - lo) / max(hi - lo, 1e-6)
        x = np.repeat(x, 3, -1) if x.shape[-1] == 1 else x[..., :3]
        return (x * 255).round().astype(np.uint8)

    masked = images * (1 - m) + lo * m
    filled = images * (1 - m) + rec * m
    grid = np.concatenate([np.concatenate([to_uint8(a), to_uint8(b), to_uint8(c)], axis=1)
                           for a, b, c in zip(images, masked, filled)], axis=0)
    zoom = max(1, 96 // images.shape[1])  # small images drawn with whole-pixel blocks, at least 96 px each
    return np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
