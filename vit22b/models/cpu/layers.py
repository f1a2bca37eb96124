"""XLA:CPU kernels for the reference layers of vit22b/models/layers.py, with the same signatures and values:
the matmul with a bf16 fast path, biases, exact GELU and RMSNorm / LayerNorm, each with a hand-written VJP
where autodiff gave XLA:CPU slow or low-precision programs (docs/cpu_kernels.md).
"""
import functools
import jax
import jax.numpy as jnp
import numpy as np

from vit22b.models import layers as reference
from vit22b.tools import host_cpu

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
    without bf16 matmul instructions, bf16 operands are multiplied as float32 (vit22b/tools/host_cpu.py)."""
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


def normalize(x, p, kind, dtype, axis_name=None, features=None, eps=1e-6, tree=None):
    """The reference `normalize` with a custom VJP (one over a split feature axis, `axis_name`, stays the
    reference). `tree`: whether rows of up to 128 features are summed as a tree of adds (`_row_sum`); None =
    for 16-bit x."""
    if axis_name is not None:
        return reference.normalize(x, p, kind, dtype, axis_name, features, eps)
    tree = x.dtype != jnp.float32 if tree is None else bool(tree)
    return _norm(x, p["scale"], p.get("bias"), kind, eps, jnp.dtype(dtype), tree)


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
