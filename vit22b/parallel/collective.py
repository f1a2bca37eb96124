"""ViT-22B's "asynchronous parallel linear operations": collective matmuls over a ring of `ppermute`s.

Call these inside `jax.shard_map`, with activations split on their feature dimension over `axis` (k devices).
Each ring step multiplies the chunk a device already holds while the next chunk is in flight, so XLA can
overlap every transfer with a matmul; an all-gather or reduce-scatter followed by one big matmul cannot.

- `allgather_matmul`: y = x @ w with x split on its features and w split on its output columns (the fused
  input projection, d -> 3d + m: gathering x moves d floats per token, less than scattering 3d + m).
- `matmul_reducescatter`: y = x @ w with x split on its features and w on its input rows; the partial sums
  travel the ring and each device ends with its feature chunk of y (the fused output projection, d + m -> d).

`bidirectional=True` splits each chunk in halves that go round the ring in opposite directions, using both
directions of every link (TPU ICI, NVLink) and halving each step's transfer. Matmuls accumulate in float32.

The backward pass needs only the chunks received on the way (and the weights), never the per-step partial
products, so each ring is a `jax.checkpoint` that keeps exactly those chunks: a remat policy that saves dots
(vit22b/models/vit.py REMAT_POLICIES) would otherwise store all k partial products of every layer. The rings'
outputs are named OUTPUT_NAME so that such policies save them as they save a plain matmul's output.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

OUTPUT_NAME = "parallel_linear"
_CHUNK = "ring_chunk"


def _ring(fn):
    @functools.wraps(fn)
    def wrapped(x, w, axis, *, bidirectional=True, dtype=jnp.float32):
        body = functools.partial(fn, axis=axis, bidirectional=bidirectional, dtype=dtype)
        policy = jax.checkpoint_policies.save_only_these_names(_CHUNK)
        return checkpoint_name(jax.checkpoint(body, policy=policy)(x, w), OUTPUT_NAME)
    return wrapped


def _mm(x, w, dtype):
    return jnp.einsum("...c,cf->...f", x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def _shift(x, axis, k, step):
    """Send to the neighbour `step` (+1 or -1) places along the ring."""
    return checkpoint_name(lax.ppermute(x, axis, [(j, (j + step) % k) for j in range(k)]), _CHUNK)


@_ring
def allgather_matmul(x, w, axis, *, bidirectional=True, dtype=jnp.float32):
    """x: [..., c] (this device's feature chunk), w: [k * c, f] -> x_full @ w, [..., f] in float32."""
    k = lax.axis_size(axis)
    i = lax.axis_index(axis)
    c = x.shape[-1]
    if w.shape[0] != k * c:
        raise ValueError(f"allgather_matmul: weight has {w.shape[0]} rows, expected {k} x {c}")

    def rows(chunk, start, size):
        return lax.dynamic_slice_in_dim(w, chunk * c + start, size, axis=0)

    acc = _mm(x, rows(i, 0, c), dtype)
    if k == 1:
        return acc
    if not bidirectional:
        chunk = x
        for s in range(1, k):
            chunk = _shift(chunk, axis, k, +1)  # now holds device (i - s)'s features
            acc = acc + _mm(chunk, rows((i - s) % k, 0, c), dtype)
        return acc
    h = c // 2
    lo, hi = x[..., :h], x[..., h:]
    for s in range(1, k):
        lo = _shift(lo, axis, k, +1)  # first half of device (i - s)'s chunk
        hi = _shift(hi, axis, k, -1)  # second half of device (i + s)'s chunk
        acc = acc + _mm(lo, rows((i - s) % k, 0, h), dtype) + _mm(hi, rows((i + s) % k, h, c - h), dtype)
    return acc


@_ring
def matmul_reducescatter(x, w, axis, *, bidirectional=True, dtype=jnp.float32):
    """x: [..., r] (this device's input rows), w: [r, k * c] -> this device's chunk of sum_devices x @ w,
    [..., c] in float32."""
    k = lax.axis_size(axis)
    i = lax.axis_index(axis)
    c = w.shape[1] // k
    if w.shape[1] != k * c:
        raise ValueError(f"matmul_reducescatter: weight has {w.shape[1]} columns, not divisible by {k}")

    def part(chunk, start, size):
        return _mm(x, lax.dynamic_slice_in_dim(w, chunk * c + start, size, axis=1), dtype)

    if k == 1:
        return part(0, 0, c)
    if not bidirectional:
        # The sum for chunk j starts on device j + 1 and travels +1 until it reaches device j.
        acc = part((i - 1) % k, 0, c)
        for s in range(1, k):
            acc = _shift(acc, axis, k, +1) + part((i - 1 - s) % k, 0, c)
        return acc
    h = c // 2
    lo = part((i - 1) % k, 0, h)  # first halves travel +1
    hi = part((i + 1) % k, h, c - h)  # second halves travel -1
    for s in range(1, k):
        lo = _shift(lo, axis, k, +1) + part((i - 1 - s) % k, 0, h)
        hi = _shift(hi, axis, k, -1) + part((i + 1 + s) % k, h, c - h)
    return jnp.concatenate([lo, hi], axis=-1)
