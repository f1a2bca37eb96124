"""Softmax attention (ViT) and Swin V2's scaled cosine attention, with hand-written VJPs that keep XLA:CPU's
matmuls on row-major operands, computed in independent batch slices on the CPU (README, Performance)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vit22b.models.layers import _pack, _row_sum, _sum_rows, _unpack


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
    if dtype == jnp.float32:
        # XLA:CPU contracts the leading query axis in Eigen: slower alone than the transposed forms (about 40
        # against 50 GFLOP/s on a Zen 3), but both ways of reaching those (copying the [q, k] matrices, or the
        # [q, d] operands for dK^T and dV^T) cost more than they save in the step (README, "Tried, not kept").
        dk = jnp.einsum("nqk,nqd->nkd", draw, qs, precision=precision, **_F32)
        dv = jnp.einsum("nqk,nqd->nkd", weights, gs, precision=precision, **_F32)
    else:  # in bf16 Eigen would first convert to f32, so there the [q, k] matrices are transposed first
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
