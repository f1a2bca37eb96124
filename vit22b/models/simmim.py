"""SimMIM masked-image modelling (arXiv 2111.09886), as the official Swin code computes it (shared reference
swinv2_simmim.md, section 4): the encoder sees its patch tokens with the masked ones replaced by a learned mask
token (Swin V2: after the patch norm; ViT: before the position embedding), a 1x1 convolution maps its last feature
map to stride^2 * 3 values per position, a pixel shuffle lays them out as an image, and the loss is the L1 error
on the masked pixels (optionally against targets normalised by their 47x47 neighbourhood).

    model = SimMIM(encoder=models.build("swinv2", cfg, 0, 192), stride=32)
    reconstruction = model.apply(variables, images, token_mask)      # token_mask: [B, H/p, W/p], 1 = masked
    loss = simmim_loss(images, reconstruction, pixel_mask(token_mask, p), norm_kernel=47)
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit22b.models import swinv2


def pixel_shuffle(x, r):
    """[B, h, w, C * r * r] -> [B, h * r, w * r, C], channels read as torch.nn.PixelShuffle reads them (C, r, r)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c // (r * r))


def pixel_mask(token_mask, patch_size):
    """A token mask [B, H/p, W/p] as a pixel mask [B, H, W]."""
    return jnp.repeat(jnp.repeat(token_mask, patch_size, axis=1), patch_size, axis=2)


def _local_stats(images, kernel):
    """Mean and unbiased variance of each pixel's kernel x kernel neighbourhood, clipped at the image border
    (avg_pool2d without the padding, as the official `norm_targets`)."""
    if kernel % 2 == 0:
        raise ValueError(f"norm_targets: the neighbourhood must be odd-sized, not {kernel}")
    pad = [(0, 0), (kernel // 2, kernel // 2), (kernel // 2, kernel // 2), (0, 0)]

    def window_sum(t):
        return jax.lax.reduce_window(t, 0.0, jax.lax.add, (1, kernel, kernel, 1), (1, 1, 1, 1), pad)

    x = jnp.asarray(images, jnp.float32)
    count = window_sum(jnp.ones_like(x[..., :1]))
    mean, mean_sq = window_sum(x) / count, window_sum(x * x) / count
    return mean, jnp.maximum((mean_sq - mean * mean) * count / (count - 1), 0.0)


def norm_targets(images, kernel=47):
    """Each pixel (and channel) normalised by the mean and unbiased variance of its neighbourhood."""
    mean, var = _local_stats(images, kernel)
    return (jnp.asarray(images, jnp.float32) - mean) / jnp.sqrt(var + 1e-6)


def denormalise(images, normalised, kernel=47):
    """The inverse of norm_targets with the statistics of `images` (to show a prediction of normalised targets)."""
    mean, var = _local_stats(images, kernel)
    return normalised * jnp.sqrt(var + 1e-6) + mean


def simmim_loss(images, reconstruction, mask, norm_kernel=0):
    """Mean absolute error over the masked pixels (mask [B, H, W], 1 = masked) and channels, against the images or,
    with norm_kernel, their locally normalised values: sum |t - r| * m / (sum m + 1e-5) / channels."""
    target = norm_targets(images, norm_kernel) if norm_kernel else images.astype(jnp.float32)
    m = mask.astype(jnp.float32)[..., None]
    error = jnp.abs(target - reconstruction.astype(jnp.float32)) * m
    return error.sum() / (m.sum() + 1e-5) / images.shape[-1]


def avg_dist(input_size=192, mask_patch_size=32, mask_ratio=0.6, samples=64, seed=0):
    """SimMIM's AvgDist of a mask configuration: the mean Euclidean distance (in pixels) from a masked pixel to
    the nearest visible one, averaged over `samples` masks drawn as the preprocessing op draws them."""
    from scipy import ndimage

    from vit22b.input import preprocess
    draw = preprocess.simmim_mask(input_size, mask_patch_size, 1, mask_ratio)
    rng = np.random.default_rng(seed)
    dists = []
    for _ in range(samples):
        m = draw({}, rng)["simmim_mask"].astype(bool)
        dists.append(ndimage.distance_transform_edt(m)[m].mean())
    return float(np.mean(dists))


class SimMIM(nn.Module):
    """An encoder (Swin V2 or a ViT, built with num_classes=0) with the SimMIM decoder. `stride`: the encoder's
    total downsampling (Swin V2: patch * 2^(stages - 1); ViT: its patch size). The decoder predicts as many
    channels as the images have."""
    encoder: nn.Module
    stride: int

    @nn.compact
    def __call__(self, images, token_mask=None, *, train=False):
        """Reconstructed images [B, H, W, C] (C: the images'); no token_mask: nothing masked (init)."""
        if token_mask is None:
            p = self.encoder.patch_size
            token_mask = jnp.zeros((images.shape[0], images.shape[1] // p, images.shape[2] // p), jnp.float32)
        features = self.encoder(images, train=train, mask=token_mask, return_map=True)
        fan_in = features.shape[-1]  # PyTorch's default Conv2d init, which the official decoder keeps
        init = lambda key, shape, dtype=jnp.float32: swinv2.torch_default_uniform(key, shape, dtype, fan_in)  # noqa: E731
        y = nn.Dense(self.stride * self.stride * images.shape[-1], kernel_init=init, bias_init=init, dtype=jnp.float32,
                     name="decoder")(features)  # the 1x1 convolution
        return pixel_shuffle(y, self.stride)
