"""The layers both model families are built from, in plain JAX and Flax: dense layers as einsums, exact GELU,
RMSNorm / LayerNorm, patch embedding as a strided convolution, all differentiated by autodiff.

The models reach these functions through `ops(impl, attention_impl)`: with impl="reference" (the default, on
every backend) they are the ones defined here; with impl="cpu" the XLA:CPU kernels of vit22b/models/cpu/ take
the place of some of them (same parameters, same values, hand-written gradients that are faster on a CPU).
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit22b.models import attention as attention_lib

Dtype = Any


def _p(init, names):
    return nn.with_logical_partitioning(init, names)


def dense(x, kernel, dtype, precision=None):
    """x @ kernel over the last axis, computed in `dtype` as flax.linen.Dense computes it: bf16 products are
    accumulated in float32 (TPU, GPU and XLA:CPU alike) and rounded to bf16, so the backward pass's matmuls take
    bf16 operands too (a float32 result would make them mixed-precision dots, run at float32 speed)."""
    return jnp.einsum("...d,df->...f", x.astype(dtype), kernel.astype(dtype), precision=precision)


def add_bias(x, b):
    """x + b, b broadcast over x's leading axes."""
    return x + b.astype(x.dtype)


def gelu(x):
    """Exact GELU, as timm and the official Swin code use it."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x):
    """GELU's tanh approximation (flax.linen.gelu), as big_vision and vision_transformer use it."""
    return jax.nn.gelu(x, approximate=True)


def normalize(x, p, kind, dtype, axis_name=None, features=None, eps=1e-6):
    """RMSNorm (kind='rmsnorm': scale only, no centering) or LayerNorm over the last axis, statistics in float32,
    as flax.linen's RMSNorm / LayerNorm(use_fast_variance=False) compute them; p holds scale (and bias). With
    `axis_name` the last axis is this device's chunk of `features`, and the statistics are summed over the
    devices of that mesh axis (inside `jax.shard_map`)."""
    x32 = x.astype(jnp.float32)
    total = (lambda t: t) if axis_name is None else (lambda t: jax.lax.psum(t, axis_name))
    n = features or x.shape[-1]
    if kind == "layernorm":
        x32 = x32 - total(x32.sum(-1, keepdims=True)) / n
    var = total(jnp.square(x32).sum(-1, keepdims=True)) / n
    y = x32 * jax.lax.rsqrt(var + eps) * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(dtype)


def patch_embed(x, kernel, dtype, precision=None):
    """Non-overlapping p x p patches of NHWC images times kernel [p, p, channels, features]: nn.Conv with stride p
    and VALID padding (a remainder of rows or columns is dropped)."""
    p = kernel.shape[0]
    return jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (p, p), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


def concatenate(xs, axis):
    return jnp.concatenate(xs, axis)


def split(x, indices, axis):
    return tuple(jnp.split(x, indices, axis))


@dataclasses.dataclass(frozen=True)
class Ops:
    """The functions a model computes with; `ops(...)` fills it in. Frozen and hashable: modules keep it as a
    field."""
    dense: Callable = dense
    add_bias: Callable = add_bias
    gelu: Callable = gelu
    normalize: Callable = normalize
    patch_embed: Callable = patch_embed
    concatenate: Callable = concatenate
    split: Callable = split
    attention: Callable = attention_lib.attention


IMPLS = ("reference", "cpu")


GELUS = {"exact": gelu, "tanh": gelu_tanh}


@functools.lru_cache(maxsize=None)
def ops(impl="reference", attention_impl="auto", gelu="exact"):
    """The Ops of `impl`: 'reference', or 'cpu' for all the XLA:CPU kernels of vit22b/models/cpu/ ('cpu:a,b' for
    only those named: measurements). Attention goes through `attention.attention` with `attention_impl`; the
    CPU attention kernel, where chosen, is used when attention_impl is 'auto'. `gelu`: a key of GELUS."""
    if impl == "reference":
        return Ops(attention=functools.partial(attention_lib.attention, impl=attention_impl), gelu=GELUS[gelu])
    from vit22b.models import cpu  # only on request: nothing under cpu/ is traced by the reference program
    overrides = cpu.kernels(impl)
    if gelu != "exact" and "gelu" in overrides:
        raise ValueError(f"model.gelu: {gelu!r} has no XLA:CPU kernel; use model.impl='reference' or leave the "
                         f"gelu kernel out (e.g. 'cpu:-gelu')")
    overrides.setdefault("gelu", GELUS[gelu])
    if "attention" in overrides and attention_impl == "auto":
        attention_impl = "cpu"
    overrides.pop("attention", None)
    return Ops(attention=functools.partial(attention_lib.attention, impl=attention_impl), **overrides)


REFERENCE = ops()


class Dense(nn.Module):
    """nn.Dense's parameters (kernel [in, out], bias) and math, through `ops`."""
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    precision: Any = None
    ops: Ops = REFERENCE

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        y = self.ops.dense(x, kernel, self.dtype, self.precision)
        if self.use_bias:
            y = self.ops.add_bias(y, self.param("bias", self.bias_init, (self.features,), self.param_dtype))
        return y


class PatchEmbed(Dense):
    """nn.Conv(features, (p, p), strides=(p, p), padding='VALID')'s parameters (kernel [p, p, channels, features],
    bias) and math, through `ops`."""
    patch: int = 16

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (self.patch, self.patch, x.shape[-1], self.features),
                            self.param_dtype)
        y = self.ops.patch_embed(x, kernel, self.dtype, self.precision)
        if self.use_bias:
            y = self.ops.add_bias(y, self.param("bias", self.bias_init, (self.features,), self.param_dtype))
        return y


def _norm_params(module, kind, features, axes, param_dtype, scale_init):
    scale = module.param("scale", _p(scale_init, axes), (features,), param_dtype)
    if kind == "rmsnorm":
        return {"scale": scale}
    return {"scale": scale, "bias": module.param("bias", _p(nn.initializers.zeros, axes), (features,), param_dtype)}


class NormParams(nn.Module):
    """The parameters of `Norm(kind, ...)` under the same names (scale, and bias for layernorm), for code that
    normalises with `normalize` itself, e.g. over a feature dimension split across devices."""
    kind: str
    axes: tuple = ("embed",)
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features):
        return _norm_params(self, self.kind, features, self.axes, self.param_dtype, nn.initializers.ones)


class Norm(nn.Module):
    """RMSNorm / LayerNorm over the last axis (flax.linen's parameter names and initialisation), via `normalize`."""
    kind: str
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axes: tuple = ("embed",)
    scale_init: Any = nn.initializers.ones
    ops: Ops = REFERENCE

    @nn.compact
    def __call__(self, x):
        p = _norm_params(self, self.kind, x.shape[-1], self.axes, self.param_dtype, self.scale_init)
        return self.ops.normalize(x, p, self.kind, self.dtype, eps=self.eps)
