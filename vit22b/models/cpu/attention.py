"""The XLA:CPU attention kernel behind `attention(..., impl='cpu')` (vit22b/models/attention.py): hand-written
VJPs that keep XLA:CPU's matmuls on row-major operands, computed in independent batch slices on the CPU
(docs/cpu_kernels.md)."""
import functools

import jax
import jax.numpy as jnp

from vit22b.models.cpu.layers import _pack, _sum_rows, _unpack


def attend(q, k, v, bias, scale, precision=None, batch_chunks=None):
    """The entry point's attention, of the same arguments (bias [G, heads, q_len, kv_len] or None; `scale` a
    number), the logits and softmax in float32 and the four matmuls in q's dtype accumulated in float32.
    `batch_chunks` splits the batch into that many independent attentions (None: `cpu_batch_chunks`)."""
    scores = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]
    if bias is None:
        return _in_slices(lambda q, k, v: _attention(q, k, v, scale, precision), 1, scores, batch_chunks, q, k, v)
    bias = bias.astype(jnp.float32)
    return _in_slices(lambda q, k, v: _biased_attention(q, k, v, bias, scale, precision), bias.shape[0], scores,
                      batch_chunks, q, k, v)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _biased_attention(q, k, v, bias, scale, precision):
    return _biased_attention_fwd(q, k, v, bias, scale, precision)[0]


def _biased_attention_fwd(q, k, v, bias, scale, precision):
    qs, ks, vs = _split_heads(q), _split_heads(k), _split_heads(v)
    out, weights = _core_fwd(qs, ks, vs, bias, scale, precision)
    # The bias rides along as an empty array of its shape plus one axis: its values are not needed backwards.
    return _merge_heads(out, q.shape[0]), (tuple(_pack(t) for t in (qs, ks, vs, weights)), jnp.zeros(bias.shape + (0,)))


def _biased_attention_bwd(scale, precision, res, g):
    (qs, ks, vs, weights), bias_carrier = tuple(_unpack(t) for t in res[0]), res[1]
    b = g.shape[0]
    dq, dk, dv, dlogits = _core_bwd(qs, ks, vs, weights, _split_heads(g.astype(qs.dtype)), scale, precision, b)
    dq, dk, dv = (_merge_heads(t.astype(qs.dtype), b) for t in (dq, dk, dv))
    return dq, dk, dv, _sum_rows(dlogits, bias_carrier.shape[:-1])  # summed over the batch elements of each group


_biased_attention.defvjp(_biased_attention_fwd, _biased_attention_bwd)
