"""Layers the model families share, written for speed on every backend and for the CPU in particular: the
matmul with a bf16 fast path, biases, exact GELU, RMSNorm / LayerNorm and softmax attention, each with a
hand-written VJP where autodiff gave XLA:CPU slow or low-precision programs (README, Performance).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit22b import host_cpu

Dtype = Any


def _p(init, names):
    return nn.with_logical_partitioning(init, names)


def _pack(x):
    """A residual for the backward pass, bf16 stored as its uint16 bits. Under a scan, XLA:CPU writes stacked
    bf16 residuals by converting the whole stack to float32 and back on every iteration (measured: a 12-step
    scan's backward pass 2x slower, the scanned ViT-B/16 bf16 step 46% slower than unrolled); integer stacks are
    written in place. The bitcast costs nothing on any backend. None (an absent bias) passes through."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x is not None and x.dtype == jnp.bfloat16 else x


def _unpack(r):
    return jax.lax.bitcast_convert_type(r, jnp.bfloat16) if r is not None and r.dtype == jnp.uint16 else r


def dense(x, kernel, dtype, precision=None):
    """x @ kernel in `dtype`, accumulated in float32 (the fast bf16 path on CPU, exact on TPU/GPU). On a CPU
    without bf16 matmul instructions, bf16 operands are multiplied as float32 (vit22b/host_cpu.py)."""
    if jnp.dtype(dtype) == jnp.float32:
        return _f32_dense(x.astype(dtype), kernel.astype(dtype), precision)
    return _low_precision_dense(x.astype(dtype), kernel, _upcast_low_precision())


def _upcast_low_precision():
    return host_cpu.bf16_dots_mode(jax.default_backend()) == "float32"


def low_precision_einsum(spec, a, b, upcast):
    """einsum of 16-bit operands with a float32 result: the dot's own float32 accumulation, or with `upcast` a
    float32 product of the converted operands, the same to float32 rounding (a bf16 x bf16 product is exact in
    float32) and faster where the CPU has no bf16 matmul instructions."""
    if upcast:
        return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _kernel_grad(x, g, einsum):
    # The kernel gradient contracts the tokens of x [tokens, d] and of g [tokens, f], and XLA:CPU copies one of
    # them into a transposed [features, tokens] layout: g in autodiff's formulation, which for a widening layer
    # is the wide one (the ViT-22B block's fused [768, 5376] projection: 8.4M elements per block and step where
    # x has 1.2M), and the first operand in the einsums below. In float32 the narrower of the two goes first.
    if g.shape[-1] >= x.shape[-1]:
        return einsum("...d,...f->df", x, g)
    dw_t = einsum("...f,...d->fd", g, x)
    if x.size // x.shape[-1] >= x.shape[-1] and jax.default_backend() == "cpu":
        # Left free, XLA:CPU folds the final transpose into the product, which then contracts x's leading axis:
        # a dot it leaves to Eigen, 55 GFLOP/s for SwinV2-T's first-stage fc2 on a Zen 3 (about 110 when it
        # stays [f, d]). The transpose itself then costs a few ns per element, paid where the optimizer reads
        # the gradient, so only where it is no larger than the copy of g: not for ViT-B/16's fc2 (1,576 tokens
        # for a [3072, 768] kernel), whose Eigen product ran at 128 GFLOP/s against 147.
        dw_t = jax.lax.optimization_barrier(dw_t)
    return dw_t.T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _f32_dense(x, kernel, precision):
    return jnp.einsum("...d,df->...f", x, kernel, precision=precision)


def _f32_dense_fwd(x, kernel, precision):
    return _f32_dense(x, kernel, precision), (x, kernel)


def _f32_dense_bwd(precision, res, g):
    x, kernel = res
    dx = jnp.einsum("...f,df->...d", g, kernel, precision=precision)
    dw = _kernel_grad(x, g, functools.partial(jnp.einsum, precision=precision))
    return dx, _sum_over_replicas(dw, g, kernel)


_f32_dense.defvjp(_f32_dense_fwd, _f32_dense_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _low_precision_dense(x, kernel, upcast):
    return _low_precision_dense_fwd(x, kernel, upcast)[0]


def _low_precision_dense_fwd(x, kernel, upcast):
    w = kernel.astype(x.dtype)
    # The kernel's dtype rides along as a scalar: keeping the kernel itself would make a scan stack a copy of it.
    return low_precision_einsum("...d,df->...f", x, w, upcast).astype(x.dtype), \
        (_pack(x), _pack(w), jnp.zeros((), kernel.dtype))


def _low_precision_dense_bwd(upcast, res, g):
    # Autodiff would multiply the float32 cotangent by the bf16 operands: a mixed-precision dot that XLA runs at
    # float32 speed. Rounding the cotangent to bf16 first (as torch.autocast does) keeps the backward's two dots
    # on the fast path, accumulated in float32; the kernel gradient stays float32 (autocast rounds it to bf16).
    x, w, kernel_dtype = _unpack(res[0]), _unpack(res[1]), res[2]
    g = g.astype(x.dtype)
    einsum = functools.partial(low_precision_einsum, upcast=upcast)
    dx = einsum("...f,df->...d", g, w).astype(x.dtype)
    if upcast:  # float32 dots: the narrower operand first, as in _f32_dense
        dw = _kernel_grad(x, g, einsum)
    else:  # x first: with g first XLA:CPU hands the bf16 dot to Eigen, which has no bf16 x bf16 -> f32 kernel
        dw = einsum("...d,...f->df", x, g)
    return dx, _sum_over_replicas(dw.astype(kernel_dtype.dtype), g, w)


_low_precision_dense.defvjp(_low_precision_dense_fwd, _low_precision_dense_bwd)


def _bits_concatenate(xs, axis):
    return _unpack(jnp.concatenate([_pack(x) for x in xs], axis))


# XLA may skip roundings (xla_allow_excess_precision, on by default): around a concatenation of bf16 values
# computed in float32 it drops the f32 -> bf16 -> f32 round trip and concatenates in float32, moving twice the
# bytes, then converts. Concatenating the uint16 bits leaves it nothing to skip. In the ViT-22B block's fused
# layout this halved the concatenations' traffic: ViT-22B-design B/16 bf16 steps 2-4% faster on the CPU, the
# float32 concatenations' thread time 149 -> 5 ms. Float32 arrays pass through unchanged.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def concatenate(xs, axis):
    """jnp.concatenate(xs, axis), done on the uint16 bits of bf16 arrays; the gradient is plain slices."""
    return _bits_concatenate(xs, axis)


def _concatenate_fwd(xs, axis):
    return concatenate(xs, axis), tuple(x.shape[axis] for x in xs)


def _concatenate_bwd(axis, sizes, g):
    return (tuple(jnp.split(g, np.cumsum(sizes)[:-1], axis)),)


concatenate.defvjp(_concatenate_fwd, _concatenate_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def split(x, indices, axis):
    """tuple(jnp.split(x, indices, axis)) whose gradient is assembled on the uint16 bits (see `concatenate`)."""
    return tuple(jnp.split(x, indices, axis))


def _split_fwd(x, indices, axis):
    return split(x, indices, axis), None


def _split_bwd(indices, axis, _, gs):
    return (_bits_concatenate(gs, axis),)


split.defvjp(_split_fwd, _split_bwd)


_TREE_ROWS = 64


@jax.custom_vjp
def add_bias(x, b):
    """x + b, b broadcast over x's leading axes. Autodiff would sum b's gradient in x's dtype; in bf16 XLA:CPU
    turns that sum into a slow windowed reduction (about 10 ms for one [8, 197, 3072] bias, a quarter of the
    ViT-B/16 bf16 backward) that also accumulates in bf16. Here it is summed in float32."""
    return x + b.astype(x.dtype)


def _add_bias_fwd(x, b):
    return add_bias(x, b), b


def _add_bias_bwd(b, g):
    g32 = g.astype(jnp.float32)
    if g.size // max(b.size, 1) <= _TREE_ROWS:  # few rows of a large bias (a position embedding): see _sum_rows
        db = _sum_rows(g32, b.shape)
    else:  # many rows of a small bias: XLA's reduction is the faster one (0.5 vs 2.5 ms for ViT-B/16's MLP)
        db = g32.sum(tuple(range(g.ndim - b.ndim)))
    return g, _sum_over_replicas(db, g, b).astype(b.dtype)


def _sum_over_replicas(grad, cotangent, param):
    """Inside jax.shard_map a parameter may be replicated over mesh axes that the activations vary on (a
    data-parallel batch): the adjoint of that implicit broadcast is a sum over those devices, which autodiff
    would insert and a custom VJP must add itself."""
    varying = lambda t: frozenset(getattr(getattr(jax.typeof(t), "manual_axis_type", None), "varying", ()))
    extra = varying(cotangent) - varying(param)
    return jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def gelu(x):
    """Exact GELU, x * Phi(x), evaluated in float32 through erf: jax.nn.gelu(approximate=False) goes through
    erfc, whose two-branch expansion XLA:CPU computes several times slower (the two agree within 1e-6). The
    custom VJP keeps x in its own dtype for the backward pass; autodiff would store the float32 copy."""
    x32 = x.astype(jnp.float32)
    return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * np.float32(1 / np.sqrt(2))))).astype(x.dtype)


def _gelu_fwd(x):
    return gelu(x), _pack(x)


def _gelu_bwd(x, g):
    x = _unpack(x)
    x32 = x.astype(jnp.float32)
    phi = jnp.exp(-0.5 * x32 * x32) * np.float32(1 / np.sqrt(2 * np.pi))
    grad = 0.5 * (1.0 + jax.lax.erf(x32 * np.float32(1 / np.sqrt(2)))) + x32 * phi
    return ((g.astype(jnp.float32) * grad).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def attend(q, k, v, dtype, scale=None, precision=None, batch_chunks=None):
    """Softmax attention over [batch, length, heads, head_dim]: softmax(scale * q k^T) v, the logits and softmax
    in float32 and the four matmuls in `dtype` accumulated in float32. `scale` defaults to 1/sqrt(head_dim).

    `batch_chunks` splits the batch into that many independent attentions (None: `cpu_batch_chunks`)."""
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    scale = float(1.0 / np.sqrt(q.shape[-1]) if scale is None else scale)
    scores = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]
    return _in_slices(lambda q, k, v: _attention(q, k, v, scale, precision), 1, scores, batch_chunks, q, k, v)


def cosine_attention(t, scale, bias, num_heads, precision=None, batch_chunks=None):
    """Swin V2's scaled cosine attention, softmax(scale_h * cos(q_i, k_j) + bias) v, over the fused projection
    t = [q | k | v] of shape [batch, length, 3C] (heads contiguous within each third), returning [batch, length,
    C] in t's dtype. `scale` [heads] multiplies head h's cosines; `bias` [G, heads, length, length] is added to
    the logits of batch element i from bias[i % G] (the relative-position bias plus the shift mask of window
    i % G). Normalisation and softmax run in float32, the matmuls in t's dtype accumulated in float32.

    One custom VJP covers the normalisation as well as the attention: autodiff of the float32 normalisation
    kept float32 copies of q and k and assembled the qkv gradient in float32 before rounding it (SwinV2-T steps
    were 6% slower in bf16 and 10% in float32 that way). `batch_chunks` as in `attend`."""
    n, length, c3 = t.shape
    if c3 % (3 * num_heads):
        raise ValueError(f"cosine_attention: last axis {c3} is not 3 x heads ({num_heads}) x head_dim")
    scores = n * num_heads * length * length

    def one(t):
        return _cosine_attention(t, scale.astype(jnp.float32), bias.astype(jnp.float32), num_heads, precision)

    return _in_slices(one, bias.shape[0], scores, batch_chunks, t)


def _in_slices(fn, groups, scores, batch_chunks, *arrays):
    """fn over `batch_chunks` (None: `cpu_batch_chunks`) independent slices of the batch, concatenated."""
    batch = arrays[0].shape[0]
    chunks = cpu_batch_chunks(batch, groups, scores) if batch_chunks is None else batch_chunks
    if batch % chunks or (batch // chunks) % groups:
        raise ValueError(f"attention: batch_chunks={chunks} must split the batch of {batch} into whole "
                         f"multiples of the bias's {groups} groups")
    if chunks == 1:
        return fn(*arrays)
    return jnp.concatenate([fn(*t) for t in zip(*(jnp.split(a, chunks) for a in arrays))])


MIN_SLICE_SCORES = 1 << 18  # score-matrix elements per slice (1 MiB in float32): below, slicing costs more than it saves


def cpu_batch_chunks(batch, groups, scores):
    """How many independent slices of the batch the attention functions compute on this backend: on the CPU,
    the largest of 8, 4, 2 that splits the batch into whole multiples of `groups` and leaves each slice at least
    MIN_SLICE_SCORES of the `scores` score-matrix elements (small problems stay whole: every slice adds to
    the compiled program); elsewhere, and under a multi-device mesh (where slicing a sharded batch would move
    data), 1.

    Measured on 2 CPU cores: one batched matmul takes as long on one core as on two, and a whole batch's score
    matrices do not stay in cache. Slices run side by side, each in cache: ViT-B/16 attention forward + backward
    (batch 8) takes 17 instead of 27 ms in bf16 and 26 instead of 31 ms in float32; SwinV2-T's first stage (512
    windows) 28 instead of 48 ms in bf16 and 44 instead of 69 ms in float32."""
    if jax.default_backend() != "cpu":
        return 1
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return 1
    for c in (8, 4, 2):
        if batch % c == 0 and (batch // c) % groups == 0 and scores // c >= MIN_SLICE_SCORES:
            return c
    return 1


_F32 = dict(preferred_element_type=jnp.float32)


# A transpose alone only changes an array's layout tag, which a dot then inherits; XLA:CPU sends dots with
# permuted operand layouts to a slow path and, in bf16, first converts their operands to f32. Folding the heads
# into the batch with a reshape that is not a bitcast forces a real row-major copy, so attention works on
# [batch * heads, length, head_dim]: every bf16 matmul stays bf16.
def _split_heads(x):
    b, l, h, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * h, l, d)


def _merge_heads(x, b):
    n, l, d = x.shape
    return x.reshape(b, n // b, l, d).transpose(0, 2, 1, 3)


def _transpose_qk(x, b):
    """[b * h, q, k] -> [b * h, k, q] as a row-major copy (see `_split_heads`)."""
    n, q, k = x.shape
    return x.reshape(b, n // b, q, k).transpose(0, 1, 3, 2).reshape(n, k, q)


def _add_logit_bias(logits, bias):
    """logits [b * h, q, k] + bias [G, h, q, k], batch element i taking bias[i % G]."""
    g, h = bias.shape[:2]
    return (logits.reshape(-1, g * h, *logits.shape[1:]) + bias.reshape(g * h, *bias.shape[2:])).reshape(logits.shape)


def _sum_rows(x, shape):
    """x as [rows, *shape] summed over the rows by a halving tree of adds. XLA:CPU runs a reduction over a
    leading axis that keeps a large `shape` at about 1 GB/s: 9 ms for one SwinV2-T stage-3 attention-bias
    gradient (1.7 ms as adds), 6.7 ms for ViT-B/16's position-embedding gradient at batch 8 (0.07 ms)."""
    return _halving(jnp.add, x.reshape(-1, *shape), 0)[0]


def _halving(op, x, axis):
    """x reduced by `op` over `axis` (kept, of size 1) as a halving tree, which XLA fuses into one pass."""
    while x.shape[axis] > 1:
        n = x.shape[axis]
        half = n // 2
        s = op(jax.lax.slice_in_dim(x, 0, half, axis=axis), jax.lax.slice_in_dim(x, half, 2 * half, axis=axis))
        if n % 2:
            first = op(jax.lax.slice_in_dim(s, 0, 1, axis=axis), jax.lax.slice_in_dim(x, n - 1, n, axis=axis))
            s = jnp.concatenate([first, jax.lax.slice_in_dim(s, 1, half, axis=axis)], axis)
        x = s
    return x


_TREE_COLS = 128


def _row_sum(x, tree):
    """x summed over the last axis (kept). With `tree`, short rows (qk-norm's and Swin's head_dim, Swin's first
    stage) as a halving tree of adds: XLA:CPU hands such a reduction to YNNPACK, and that fusion wrote its
    per-row result out broadcast to x's full float32 shape. The ViT-22B design's qk-norms took about 12 ms of
    each bf16 block's forward and backward that way, 0-5 ms as adds. Callers ask for it for 16-bit data and
    for the ViT qk-norms; for other float32 data XLA's own reduction was as fast or faster (SwinV2-T float32
    steps: 3-7% slower with trees; Swin's 64-key softmax rows: no gain in either dtype)."""
    if tree and x.shape[-1] <= _TREE_COLS:
        return _halving(jnp.add, x, x.ndim - 1)
    return x.sum(-1, keepdims=True)


def _core_fwd(qs, ks, vs, bias, scale, precision):
    """Attention on head-split [b * h, len, d] operands in their dtype: (output, softmax weights), both in it."""
    logits = jnp.einsum("nqd,nkd->nqk", qs, ks, precision=precision, **_F32) * scale
    if bias is not None:
        logits = _add_logit_bias(logits, bias)
    e = jnp.exp(logits - logits.max(-1, keepdims=True))
    weights = (e / e.sum(-1, keepdims=True)).astype(qs.dtype)
    return jnp.einsum("nqk,nkd->nqd", weights, vs, precision=precision, **_F32).astype(qs.dtype), weights


def _core_bwd(qs, ks, vs, weights, gs, scale, precision, b):
    """Float32 gradients of `_core_fwd` for q, k, v, and the logits' gradient (for a bias), given the head-split
    output cotangent gs. Autodiff of the forward would differentiate the reshapes and transposes back into the
    permuted layouts; here every matmul takes row-major operands."""
    dtype = qs.dtype
    dweights = jnp.einsum("nqd,nkd->nqk", gs, vs, precision=precision, **_F32)
    w32 = weights.astype(jnp.float32)
    dlogits = w32 * (dweights - (dweights * w32).sum(-1, keepdims=True))
    draw = (dlogits * scale).astype(dtype)
    dq = jnp.einsum("nqk,nkd->nqd", draw, ks, precision=precision, **_F32)
    if dtype == jnp.float32:  # XLA:CPU contracts the leading query axis directly, fast in float32 ...
        dk = jnp.einsum("nqk,nqd->nkd", draw, qs, precision=precision, **_F32)
        dv = jnp.einsum("nqk,nqd->nkd", weights, gs, precision=precision, **_F32)
    else:  # ... but in bf16 only after converting to f32, so there the [q, k] matrices are transposed first
        dk = jnp.einsum("nkq,nqd->nkd", _transpose_qk(draw, b), qs, precision=precision, **_F32)
        dv = jnp.einsum("nkq,nqd->nkd", _transpose_qk(weights, b), gs, precision=precision, **_F32)
    return dq, dk, dv, dlogits


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(q, k, v, scale, precision):
    return _attention_fwd(q, k, v, scale, precision)[0]


def _attention_fwd(q, k, v, scale, precision):
    qs, ks, vs = _split_heads(q), _split_heads(k), _split_heads(v)
    out, weights = _core_fwd(qs, ks, vs, None, scale, precision)
    return _merge_heads(out, q.shape[0]), tuple(_pack(t) for t in (qs, ks, vs, weights))


def _attention_bwd(scale, precision, res, g):
    qs, ks, vs, weights = (_unpack(t) for t in res)
    b = g.shape[0]
    dq, dk, dv, _ = _core_bwd(qs, ks, vs, weights, _split_heads(g.astype(qs.dtype)), scale, precision, b)
    return tuple(_merge_heads(t.astype(qs.dtype), b) for t in (dq, dk, dv))


_attention.defvjp(_attention_fwd, _attention_bwd)


_NORM_EPS = 1e-12  # torch.nn.functional.normalize's default


def _unit_rows(x):
    """Float32 x / max(|x|, eps) over the last axis, and |x|."""
    tree = x.dtype != jnp.float32  # see _row_sum
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(_row_sum(x * x, tree))
    return x / jnp.maximum(norm, _NORM_EPS), norm


def _unit_rows_bwd(u, norm, du, tree):
    """Gradient of x / max(|x|, eps) given u = that, |x| and the cotangent du (the eps branch is constant)."""
    proj = jnp.where(norm > _NORM_EPS, _row_sum(u * du, tree), 0.0)
    return (du - u * proj) / jnp.maximum(norm, _NORM_EPS)


def _cosine_operands(t, scale, h):
    """Head-split q, k, v [n * h, len, hd] in t's dtype (q, k as scaled and plain unit vectors), and the float32
    unit vectors and norms of q and k."""
    n, length, c3 = t.shape
    hd = c3 // (3 * h)
    q, k, v = (_split_heads(u.reshape(n, length, h, hd)) for u in jnp.split(t, 3, axis=-1))
    uq, nq = _unit_rows(q)
    uk, nk = _unit_rows(k)
    return (_scale_heads(uq, scale).astype(t.dtype), uk.astype(t.dtype), v), (uq, nq, uk, nk)


def _scale_heads(x, scale):
    """Head-split x [n * h, len, d] times scale[h] of each row's head."""
    h = scale.shape[0]
    return (x.reshape(-1, h, *x.shape[1:]) * scale.reshape(1, h, 1, 1)).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _cosine_attention(t, scale, bias, h, precision):
    return _cosine_attention_fwd(t, scale, bias, h, precision)[0]


def _cosine_attention_fwd(t, scale, bias, h, precision):
    (qs, ks, vs), _ = _cosine_operands(t, scale, h)
    out, weights = _core_fwd(qs, ks, vs, bias, 1.0, precision)
    n, length = t.shape[:2]
    # Residuals: t itself (the unit vectors are recomputed in float32 from it) and the softmax weights.
    return _merge_heads(out, n).reshape(n, length, -1), (_pack(t), scale, _pack(weights), jnp.zeros(bias.shape + (0,)))


def _cosine_attention_bwd(h, precision, res, g):
    t, scale, weights, bias_carrier = res
    t, weights = _unpack(t), _unpack(weights)
    n, length, c3 = t.shape
    (qs, ks, vs), (uq, nq, uk, nk) = _cosine_operands(t, scale, h)
    gs = _split_heads(g.astype(t.dtype).reshape(n, length, h, c3 // (3 * h)))
    dqs, dks, dv, dlogits = _core_bwd(qs, ks, vs, weights, gs, 1.0, precision, n)
    # q_scaled = scale_h * uq: the scale's gradient sums dqs . uq over its head; uq's gradient is scale_h * dqs.
    dscale = (dqs * uq).reshape(n, h, -1).sum((0, 2))
    tree = t.dtype != jnp.float32
    dq = _unit_rows_bwd(uq, nq, _scale_heads(dqs, scale), tree)
    dk = _unit_rows_bwd(uk, nk, dks, tree)
    dt = jnp.concatenate([_merge_heads(d.astype(t.dtype), n).reshape(n, length, -1) for d in (dq, dk, dv)], -1)
    return dt, dscale, _sum_rows(dlogits, bias_carrier.shape[:-1])  # bias groups


_cosine_attention.defvjp(_cosine_attention_fwd, _cosine_attention_bwd)


class Dense(nn.Module):
    """nn.Dense's parameters (kernel [in, out], bias) computed through `dense` and `add_bias`: the fast bf16
    path and float32 bias gradients."""
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        y = dense(x, kernel, self.dtype, self.precision)
        if self.use_bias:
            y = add_bias(y, self.param("bias", self.bias_init, (self.features,), self.param_dtype))
        return y


class PatchEmbed(Dense):
    """nn.Conv(features, (p, p), strides=(p, p), padding='VALID')'s parameters (kernel [p, p, channels,
    features], bias) computed as non-overlapping patches times the flattened kernel, through `dense` and
    `add_bias`. XLA:CPU ran the strided convolution's weight gradient slowly: forward + backward took 22 ms
    instead of 6 for SwinV2-T's patches in bf16 and 26 instead of 11 for ViT-B/16's."""
    patch: int = 16

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        p, f = self.patch, self.features
        kernel = self.param("kernel", self.kernel_init, (p, p, c, f), self.param_dtype)
        h, w = h // p, w // p  # VALID: a remainder of rows or columns is dropped
        x = x[:, :h * p, :w * p].reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, p * p * c)
        y = dense(x, kernel.reshape(p * p * c, f), self.dtype, self.precision)
        return add_bias(y, self.param("bias", self.bias_init, (f,), self.param_dtype)) if self.use_bias else y


def _norm_params(module, kind, features, axes, param_dtype, scale_init):
    scale = module.param("scale", _p(scale_init, axes), (features,), param_dtype)
    if kind == "rmsnorm":
        return {"scale": scale}
    return {"scale": scale, "bias": module.param("bias", _p(nn.initializers.zeros, axes), (features,), param_dtype)}


class NormParams(nn.Module):
    """The parameters of `Norm(kind, ...)` under the same names (scale, and bias for layernorm), for code
    that normalises with `normalize` itself, e.g. over a feature dimension split across devices."""
    kind: str
    axes: tuple = ("embed",)
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features):
        return _norm_params(self, self.kind, features, self.axes, self.param_dtype, nn.initializers.ones)


class Norm(nn.Module):
    """RMSNorm / LayerNorm over the last axis through `normalize` (float32 statistics, custom VJP)."""
    kind: str
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axes: tuple = ("embed",)
    scale_init: Any = nn.initializers.ones
    tree: Any = None

    @nn.compact
    def __call__(self, x):
        p = _norm_params(self, self.kind, x.shape[-1], self.axes, self.param_dtype, self.scale_init)
        return normalize(x, p, self.kind, self.dtype, eps=self.eps, tree=self.tree)


def normalize(x, p, kind, dtype, axis_name=None, features=None, eps=1e-6, tree=None):
    """RMSNorm / LayerNorm over the last axis in float32, as flax.linen computes them. With `axis_name`, the
    last axis is this device's chunk of `features` and the statistics are summed over the devices (one psum).
    `tree`: whether rows of up to 128 features are summed as a tree of adds (`_row_sum`); None = for 16-bit x.
    The ViT blocks' per-head qk-norms ask for it in float32 too (ViT-22B design B/16 float32 steps 5% faster)."""
    if axis_name is None:
        tree = x.dtype != jnp.float32 if tree is None else bool(tree)
        return _norm(x, p["scale"], p.get("bias"), kind, eps, jnp.dtype(dtype), tree)
    x32 = x.astype(jnp.float32)
    total = lambda t: jax.lax.psum(t, axis_name)
    n = features or x.shape[-1]
    if kind == "layernorm":
        mean = total(x32.sum(-1, keepdims=True)) / n
        x32 = x32 - mean
    var = total(jnp.square(x32).sum(-1, keepdims=True)) / n
    y = x32 * jax.lax.rsqrt(var + eps) * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _norm(x, scale, bias, kind, eps, dtype, tree):
    return _norm_fwd(x, scale, bias, kind, eps, dtype, tree)[0]


def _norm_fwd(x, scale, bias, kind, eps, dtype, tree):
    # The custom VJP keeps x in its own dtype plus two float32 statistics per row for the backward pass, and
    # computes it in a few fused passes; autodiff of the float32 arithmetic kept float32 copies and took about
    # twice as long on the CPU.
    x32 = x.astype(jnp.float32)
    n = x.shape[-1]
    mean = _row_sum(x32, tree) / n if kind == "layernorm" else None
    xc = x32 - mean if mean is not None else x32
    rstd = jax.lax.rsqrt(_row_sum(jnp.square(xc), tree) / n + eps)
    y = xc * rstd * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype), (_pack(x), mean, rstd, _pack(scale), _pack(bias))


def _norm_bwd(kind, eps, dtype, tree, res, g):
    x, mean, rstd, scale, bias = res
    x, scale, bias = _unpack(x), _unpack(scale), _unpack(bias)
    x32 = x.astype(jnp.float32)
    xhat = (x32 - mean if mean is not None else x32) * rstd
    g32 = g.astype(jnp.float32)
    dy = g32 * scale.astype(jnp.float32)
    n = x.shape[-1]
    dx = dy - xhat * (_row_sum(dy * xhat, tree) / n)
    if mean is not None:
        dx = dx - _row_sum(dy, tree) / n
    rows = tuple(range(x.ndim - 1))
    dscale = _sum_over_replicas((g32 * xhat).sum(rows), g, scale).astype(scale.dtype)
    dbias = None if bias is None else _sum_over_replicas(g32.sum(rows), g, bias).astype(bias.dtype)
    return (dx * rstd).astype(x.dtype), dscale, dbias


_norm.defvjp(_norm_fwd, _norm_bwd)
