"""Swin Transformer V2 (arXiv 2111.09883), numerically the official microsoft/Swin-Transformer model.

Tokens are NHWC throughout. Module and parameter names mirror the official state-dict keys
(`layers_0/blocks_1/attn/cpb_mlp_0`, `layers_0/downsample/reduction`, ...) so that weight import is a
rename plus transposes (vit22b/models/convert.py). Faithfulness traps handled here: LayerNorm eps 1e-5, exact GELU,
cosine attention without 1/sqrt(d), logit scale clamped at log(100) with the gradient passing at equality,
a zero and untrainable k bias, the -100 shift mask added after the position bias, the clamped window feeding
the coordinate table, PatchMerging's x0,x1,x2,x3 order with reduction before norm, and zero-initialised block
norms (every block starts as the identity).

Swin V1 (arXiv 2103.14030; timm's `swin_*` models) is the same module with three switches, which default to V2:
norm_position='pre' (x + DP(attn(norm1(x))), block norms initialised to ones, and V1's PatchMerging order,
LayerNorm(4C) then reduction), attention='dot' (q k^T / sqrt(head_dim), a qkv bias, no logit scale) and
position_bias='table' (a learned [(2W-1)^2, heads] table indexed by the relative position). All three on V1
settings is timm's SwinTransformer, parameter for parameter (convert.py loads and exports it).

With the monitor collections mutable (vit22b/models/monitors.py), each block sows the largest attention logit,
the attention entropy and (cosine attention) the largest logit scale, and the RMS of the residual stream and of
each branch's contribution.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit22b.models import monitors
from vit22b.models.layers import REFERENCE, Dense, Norm, Ops, PatchEmbed, ops
from vit22b.models.vit import REMAT_POLICIES

Dtype = Any

# embed_dim, depths, num_heads, drop_path_rate (official configs/swinv2/*.yaml; H and G from the paper, whose
# head counts are not published: head_dim 32 is assumed as in T/S/B/L).
VARIANTS = {
    "T": (96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2),
    "S": (96, (2, 2, 18, 2), (3, 6, 12, 24), 0.3),
    "B": (128, (2, 2, 18, 2), (4, 8, 16, 32), 0.5),
    "L": (192, (2, 2, 18, 2), (6, 12, 24, 48), 0.2),
    "H": (352, (2, 2, 18, 2), (11, 22, 44, 88), 0.2),
    "G": (512, (2, 2, 42, 4), (16, 32, 64, 128), 0.3),
}
EXTRA_NORM_EVERY = {"H": 6, "G": 6}  # paper: "an additional layer normalization ... every 6 layers"
LN_EPS = 1e-5
ACT = ("batch", "height", "width", "act_embed")  # activations: batch-sharded only
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)
NORM_POSITIONS = ("post", "pre")  # V2 res-post-norm, V1 pre-norm
ATTENTIONS = ("cosine", "dot")  # V2 scaled cosine, V1 scaled dot product
POSITION_BIASES = ("log_cpb", "table")  # V2 log-spaced continuous bias (an MLP), V1 learned table

dense_init = nn.initializers.normal(0.02)  # torch trunc_normal_(std=.02) cuts at +-2 absolute: ~ untruncated


def torch_default_uniform(key, shape, dtype=jnp.float32, fan_in=None):
    """PyTorch's default Conv2d init, U(+-1/sqrt(fan_in)), which the official code leaves in place."""
    bound = 1.0 / math.sqrt(fan_in if fan_in is not None else np.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _p(init, names):
    return nn.with_logical_partitioning(init, names)


def layer_norm(name, dtype, param_dtype, ops, zero=False):
    return Norm("layernorm", eps=LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name, ops=ops,
                scale_init=nn.initializers.zeros if zero else nn.initializers.ones)


def linear(features, name, dtype, param_dtype, ops, use_bias=True, axes=("embed", "mlp")):
    return Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name, ops=ops,
                 kernel_init=_p(dense_init, axes), bias_init=_p(nn.initializers.zeros, axes[1:]),
                 precision=jax.lax.Precision.HIGHEST)


def unit_vectors(x):
    """x / max(|x|, 1e-12) over the last axis in float32 (torch's F.normalize), with a finite gradient at 0."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-24))


def relative_coords_table(window, pretrained_window=0):
    """(2W-1, 2W-1, 2) log-spaced coordinates, normalised by the pretrained window when one is given."""
    r = np.arange(-(window - 1), window, dtype=np.float32)
    table = np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1)
    norm = (pretrained_window if pretrained_window > 0 else window) - 1
    table = table / max(norm, 1) * 8.0
    return (np.sign(table) * np.log2(np.abs(table) + 1.0) / np.log2(8.0)).astype(np.float32)


def relative_position_index(window):
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def window_partition(x, window):
    """[B, H, W, C] -> [B, nW, window*window, C], windows in row-major (nWh, nWw) order."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(windows, window, h, w):
    b, c = windows.shape[0], windows.shape[-1]
    x = windows.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def shift_mask(h, w, window, shift):
    """(nW, N, N) additive mask: -100 between tokens that came from different regions before the roll."""
    img = np.zeros((1, h, w, 1), np.float32)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    mw = np.asarray(window_partition(img, window))[0, :, :, 0]  # (nW, N)
    diff = mw[:, None, :] - mw[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def clamp_logit_scale(s):
    # torch.clamp passes the gradient at equality; jnp.minimum would split it.
    return jnp.where(s > LOGIT_SCALE_MAX, LOGIT_SCALE_MAX, s)


class WindowAttention(nn.Module):
    """Scaled cosine attention with log-spaced continuous position bias, over [B, nW, N, C] windows; V1's scaled
    dot product (attention='dot') and learned bias table (position_bias='table') as switches."""
    dim: int
    num_heads: int
    window: int
    pretrained_window: int = 0
    attn_chunks: int = 1  # >1: "sequential self-attention", windows processed in this many chunks
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ops: Ops = REFERENCE
    attention: str = "cosine"  # or "dot" (V1)
    position_bias: str = "log_cpb"  # or "table" (V1)

    @nn.compact
    def __call__(self, x, mask=None):
        c, h, ops = self.dim, self.num_heads, self.ops
        n = self.window * self.window
        index = relative_position_index(self.window).reshape(-1)
        if self.position_bias == "table":  # V1: one learned logit bias per relative position and head
            bias_table = self.param("relative_position_bias_table", _p(dense_init, (None, "heads")),
                                    ((2 * self.window - 1) ** 2, h), self.param_dtype).astype(jnp.float32)
            rpb = bias_table[index].reshape(n, n, h).transpose(2, 0, 1)  # (nH, N, N)
        else:
            table = jnp.asarray(relative_coords_table(self.window, self.pretrained_window))
            hidden = nn.relu(linear(512, "cpb_mlp_0", jnp.float32, self.param_dtype, ops, axes=(None, "mlp"))(table))
            bias_table = linear(h, "cpb_mlp_2", jnp.float32, self.param_dtype, ops, use_bias=False,
                                axes=("mlp", "heads"))(hidden).reshape(-1, h)
            rpb = 16.0 * jax.nn.sigmoid(bias_table[index].reshape(n, n, h).transpose(2, 0, 1))  # (nH, N, N)
        if self.attention == "dot":  # V1: an ordinary qkv bias (k's included)
            t = linear(3 * c, "qkv", self.dtype, self.param_dtype, ops, axes=("embed", "fused"))(x)
        else:
            qkv = linear(3 * c, "qkv", self.dtype, self.param_dtype, ops, use_bias=False, axes=("embed", "fused"))
            q_bias = self.param("q_bias", _p(nn.initializers.zeros, ("embed",)), (c,), self.param_dtype)
            v_bias = self.param("v_bias", _p(nn.initializers.zeros, ("embed",)), (c,), self.param_dtype)
            logit_scale = self.param("logit_scale",
                                     _p(nn.initializers.constant(math.log(10.0)), ("heads", None, None)),
                                     (h, 1, 1), self.param_dtype)
            scale = jnp.exp(clamp_logit_scale(logit_scale.astype(jnp.float32))).reshape(h, 1)
            bias_qkv = jnp.concatenate([q_bias, jnp.zeros_like(v_bias), v_bias])
            t = ops.add_bias(qkv(x), bias_qkv)
        b, nw = t.shape[:2]
        t = t.reshape(b * nw, n, 3, h, c // h)  # the windows of all images form the batch
        # Logit bias [G, nH, N, N] for window i % G: the relative-position bias, plus the shift mask per window.
        bias = rpb[None] if mask is None else rpb[None] + mask[:, None]

        def query_key(t):  # (q, k, scale of q k^T)
            if self.attention == "dot":
                return t[:, :, 0], t[:, :, 1], (c // h) ** -0.5
            # Cosine similarity times the head's scale: unit q and k, no 1/sqrt(head_dim).
            return unit_vectors(t[:, :, 0]) * scale, unit_vectors(t[:, :, 1]), 1.0

        if monitors.wanted(self, monitors.ATTENTION):  # the whole stage at once, whatever attn_chunks says
            q, k, s = query_key(t)
            monitors.record_attention(self, q, k, scale=s, bias=rpb[None], mask=mask)
            if self.attention == "cosine":
                monitors.record(self, monitors.ATTENTION, "logit_scale_max", jnp.max(scale))

        def core(t, bias):
            q, k, s = query_key(t)
            return ops.attention(q.astype(t.dtype), k.astype(t.dtype), t[:, :, 2], bias=bias, scale=s,
                                 precision=jax.lax.Precision.HIGHEST)

        chunks = self.attn_chunks
        if chunks <= 1:
            out = core(t, bias)
        else:
            if nw % chunks:
                raise ValueError(f"model.attn_chunks: {chunks} does not divide the {nw} windows of a stage")
            # Sequential self-attention: one chunk of windows at a time, each rematerialised in the backward
            # pass, so a single chunk's attention matrix is live instead of the whole stage's.
            def split(a):  # [B * nW, ...] -> [chunks, B * nW / chunks, ...]
                a = a.reshape(b, chunks, nw // chunks, *a.shape[1:])
                return jnp.moveaxis(a, 1, 0).reshape(chunks, b * (nw // chunks), *a.shape[3:])

            biases = (jnp.broadcast_to(bias, (chunks,) + bias.shape) if mask is None
                      else bias.reshape(chunks, nw // chunks, *bias.shape[1:]))
            out = jax.lax.map(jax.checkpoint(lambda a: core(*a)), (split(t), biases))
            out = jnp.moveaxis(out.reshape(chunks, b, nw // chunks, *out.shape[2:]), 0, 1)
        out = out.reshape(b, nw, n, c).astype(self.dtype)
        return linear(c, "proj", self.dtype, self.param_dtype, ops, axes=("heads", "embed"))(out)


class Mlp(nn.Module):
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ops: Ops = REFERENCE

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = linear(self.hidden, "fc1", self.dtype, self.param_dtype, self.ops, axes=("embed", "mlp"))(x)
        return linear(d, "fc2", self.dtype, self.param_dtype, self.ops, axes=("mlp", "embed"))(self.ops.gelu(x))


def drop_path(x, rate, deterministic, rng):
    """Per-sample stochastic depth; `rate` may be traced (scanned blocks carry their own rates)."""
    if deterministic or (isinstance(rate, float) and rate == 0.0):
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


def effective_window(resolution, window, shift):
    """Official clamp: a stage no larger than the window uses one window and no shift."""
    if min(resolution) <= window:
        return min(resolution), 0
    return window, shift


class SwinBlock(nn.Module):
    """Res-post-norm block (V2): x + DP(norm1(attn(x))), then + DP(norm2(mlp(x))), block norms zero-initialised;
    norm_position='pre' (V1): x + DP(attn(norm1(x))), then + DP(mlp(norm2(x))), block norms initialised to ones."""
    num_heads: int
    window: int
    shift: int
    pretrained_window: int = 0
    mlp_ratio: float = 4.0
    extra_norm: bool = False
    attn_chunks: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ops: Ops = REFERENCE
    norm_position: str = "post"  # or "pre" (V1)
    attention: str = "cosine"
    position_bias: str = "log_cpb"

    @nn.compact
    def __call__(self, x, drop_rate=0.0, deterministic=True):
        x = nn.with_logical_constraint(x, ACT)
        b, hh, ww, c = x.shape
        window, shift = effective_window((hh, ww), self.window, self.shift)
        pre = self.norm_position == "pre"
        norm1, norm2 = (layer_norm(name, self.dtype, self.param_dtype, self.ops, zero=not pre)
                        for name in ("norm1", "norm2"))
        shortcut = x
        if pre:
            x = norm1(x)
        if shift:
            x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
        mask = jnp.asarray(shift_mask(hh, ww, window, shift)) if shift else None
        attn = WindowAttention(c, self.num_heads, window, self.pretrained_window, self.attn_chunks, self.dtype,
                               self.param_dtype, self.ops, attention=self.attention,
                               position_bias=self.position_bias, name="attn")
        a = window_reverse(attn(window_partition(x, window), mask), window, hh, ww)
        if shift:
            a = jnp.roll(a, (shift, shift), axis=(1, 2))
        def dp(y):
            return drop_path(y, drop_rate, deterministic, None if deterministic else self.make_rng("dropout"))

        mlp = Mlp(int(c * self.mlp_ratio), self.dtype, self.param_dtype, self.ops, name="mlp")
        if not pre:
            a = norm1(a)
        x = shortcut + dp(a)
        y = mlp(norm2(x)) if pre else norm2(mlp(x))
        x = x + dp(y)
        if self.extra_norm:
            x = layer_norm("norm3", self.dtype, self.param_dtype, self.ops)(x)
        if monitors.wanted(self, monitors.RESIDUAL):  # what each branch adds, before drop-path, and the output
            monitors.record(self, monitors.RESIDUAL, "residual_rms", monitors.rms(x))
            monitors.record(self, monitors.RESIDUAL, "attn_branch_rms", monitors.rms(a))
            monitors.record(self, monitors.RESIDUAL, "mlp_branch_rms", monitors.rms(y))
        return nn.with_logical_constraint(x, ACT)


class SwinBlockGroup(nn.Module):
    """`size` consecutive blocks (shift off, on, off, ...), the unit that nn.scan repeats over a stage.
    With `extra_last`, the last block carries the H/G extra main-branch norm."""
    size: int
    block_kw: Any
    extra_last: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, rates):
        kw = dict(self.block_kw)
        shift = kw.pop("shift")
        for k in range(self.size):
            x = SwinBlock(shift=0 if k % 2 == 0 else shift, extra_norm=self.extra_last and k == self.size - 1,
                          **kw, name=f"blocks_{k}")(x, rates[k], self.deterministic)
        return x, None


class PatchMerging(nn.Module):
    """V2 merge: concat the 2x2 neighbours (x0, x1, x2, x3), reduce 4C -> 2C, then LayerNorm(2C). The order follows
    norm_position: 'pre' is V1's LayerNorm(4C) then reduction (same parameter names, a norm of 4C)."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ops: Ops = REFERENCE
    norm_position: str = "post"

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        # [x0 | x1 | x2 | x3] = x[2i + r, 2j + s] for (r, s) = (0, 0), (1, 0), (0, 1), (1, 1): slot 2s + r. One
        # transpose, whose gradient is one transpose; four strided slices differentiate into four padded copies.
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        norm = layer_norm("norm", self.dtype, self.param_dtype, self.ops)
        reduction = linear(2 * c, "reduction", self.dtype, self.param_dtype, self.ops, use_bias=False)
        return reduction(norm(x)) if self.norm_position == "pre" else norm(reduction(x))


class SwinTransformerV2(nn.Module):
    """Input: NHWC images (normalised as the user's data requires). Output: float32 logits [B, classes],
    or pooled features [B, 8E] when num_classes == 0."""
    num_classes: int
    img_size: int = 256
    patch_size: int = 4
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 8
    pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0)
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.2
    extra_norm_every: int = 0  # SwinV2-H/G: a LayerNorm on the main branch after every 6th block of a stage
    attn_chunks: int = 1
    attn_chunk_stages: int = 2  # the paper applies sequential attention to the first two stages
    scan: bool = True  # nn.scan over groups of blocks: compile time and (with remat) memory stay flat in depth
    remat_policy: str = "none"
    impl: str = "reference"  # or "cpu": the XLA:CPU kernels of vit22b/models/cpu/
    attention_impl: str = "auto"  # vit22b/models/attention.py
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # Swin V1 as switches (module docstring); the PatchMerging order follows norm_position.
    norm_position: str = "post"  # or "pre"
    attention: str = "cosine"  # or "dot"
    position_bias: str = "log_cpb"  # or "table"

    def group_size(self, depth):
        """Blocks per scanned group for a stage of `depth` blocks, or None to unroll the stage."""
        if not self.scan:
            return None
        e = self.extra_norm_every
        if e and depth >= e:
            return e if depth % e == 0 and e % 2 == 0 else None
        return 2 if depth % 2 == 0 else None

    def stage_resolutions(self):
        r = self.img_size // self.patch_size
        return [r // 2 ** i for i in range(len(self.depths))]

    @nn.compact
    def __call__(self, images, *, train=False, return_features=False, mask=None, return_map=False):
        """mask: [B, H/p, W/p], 1 where SimMIM's mask token replaces the patch token (vit22b/models/simmim.py);
        return_map: the final normed feature map [B, H/32, W/32, 8E] instead of pooled logits."""
        if images.shape[1] != self.img_size or images.shape[2] != self.img_size:
            raise ValueError(f"SwinTransformerV2 built for {self.img_size} px, got images {images.shape[1:3]}")
        p, layer_ops = self.patch_size, ops(self.impl, self.attention_impl)
        fan_in = p * p * images.shape[-1]
        x = PatchEmbed(self.embed_dim, patch=p, dtype=self.dtype, param_dtype=self.param_dtype, ops=layer_ops,
                       name="patch_embed_proj", precision=jax.lax.Precision.HIGHEST,
                       kernel_init=_p(lambda k, s, d=jnp.float32: torch_default_uniform(k, s, d, fan_in),
                                      (None, None, None, "embed")),
                       bias_init=_p(lambda k, s, d=jnp.float32: torch_default_uniform(k, s, d, fan_in), ("embed",)),
                       )(images.astype(self.dtype))
        x = layer_norm("patch_embed_norm", self.dtype, self.param_dtype, layer_ops)(x)
        if mask is not None:  # after the patch norm, as the official SwinTransformerV2ForSimMIM
            token = self.param("mask_token", _p(dense_init, (None, None, None, "embed")), (1, 1, 1, self.embed_dim),
                               self.param_dtype)
            w = mask.astype(x.dtype)[..., None]
            x = x * (1 - w) + token.astype(x.dtype) * w

        total = sum(self.depths)
        rates = np.linspace(0.0, self.drop_path_rate, total) if total else np.zeros(0)
        policy = REMAT_POLICIES[self.remat_policy]
        features = []
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            kw = dict(num_heads=heads, window=self.window_size, shift=self.window_size // 2,
                      pretrained_window=self.pretrained_window_sizes[i], mlp_ratio=self.mlp_ratio,
                      attn_chunks=self.attn_chunks if i < self.attn_chunk_stages else 1,
                      dtype=self.dtype, param_dtype=self.param_dtype, ops=layer_ops,
                      norm_position=self.norm_position, attention=self.attention, position_bias=self.position_bias)
            stage_rates = rates[sum(self.depths[:i]):sum(self.depths[:i + 1])]
            g = self.group_size(depth)
            if g:
                group = SwinBlockGroup
                if policy is not None:
                    group = nn.remat(SwinBlockGroup, policy=policy, prevent_cse=False)
                stack = nn.scan(group, variable_axes=monitors.SCAN_AXES, split_rngs={"params": True, "dropout": True},
                                length=depth // g, metadata_params={nn.PARTITION_NAME: "layers"})
                extra = bool(self.extra_norm_every) and g == self.extra_norm_every
                x, _ = stack(g, kw, extra, not train, name=f"layers_{i}_blocks")(
                    x, jnp.asarray(stage_rates.reshape(depth // g, g), jnp.float32))
            else:
                block = SwinBlock if policy is None else nn.remat(SwinBlock, policy=policy, static_argnums=(3,))
                for j in range(depth):
                    extra = bool(self.extra_norm_every) and (j + 1) % self.extra_norm_every == 0
                    x = block(**dict(kw, shift=0 if j % 2 == 0 else kw["shift"]), extra_norm=extra,
                              name=f"layers_{i}_blocks_{j}")(x, float(stage_rates[j]), not train)
            features.append(x)
            if i < len(self.depths) - 1:
                x = PatchMerging(self.dtype, self.param_dtype, layer_ops, self.norm_position,
                                 name=f"layers_{i}_downsample")(x)
        x = layer_norm("norm", self.dtype, self.param_dtype, layer_ops)(x)
        if return_features:  # per-stage maps (strides 4, 8, 16, 32) for dense prediction, plus the final norm
            return features[:-1] + [x]
        if return_map:
            return x
        x = x.mean(axis=(1, 2))
        if self.num_classes:
            x = linear(self.num_classes, "head", self.dtype, self.param_dtype, layer_ops,
                       axes=("embed", "classes"))(x)
        return x.astype(jnp.float32)
