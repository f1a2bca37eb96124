"""The one attention entry point: ViT self-attention, the MAP head's pooling and Swin V2's window attention all
call `attention`, whose kernel `config.model.attention_impl` picks:

- 'xla': `jax.nn.dot_product_attention` in plain XLA (logits and softmax in float32), differentiated by autodiff.
- 'cudnn': cuDNN's fused flash attention on NVIDIA GPUs (bf16 / fp16, head_dim a multiple of 8 up to 128, or
  256 from Hopper on; with a bias, even sequence lengths).
- 'auto' (default): 'cudnn' where it can run this call, else 'xla'.
- 'cpu': the XLA:CPU kernel of vit22b/models/cpu/attention.py, chosen by config.model.impl='cpu'.

An explicit 'cudnn' that cannot run is a config error naming model.attention_impl (`check`, before tracing).
"""
import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "cudnn")


def _nvidia_gpu():
    device = jax.devices()[0]
    return device.platform == "gpu" and "cuda" in device.client.platform_version.lower()


def cudnn_unsupported(dtype, head_dim, q_len, kv_len, has_bias):
    """Why cuDNN's fused attention cannot compute this attention here (a sentence), or None if it can."""
    if not _nvidia_gpu():
        return f"cuDNN attention needs an NVIDIA GPU; the backend here is {jax.default_backend()}"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN attention needs bfloat16 or float16 activations (model.dtype), not {jnp.dtype(dtype).name}"
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    limit = 256 if float(capability) >= 9.0 else 128
    if head_dim % 8 or head_dim > limit:
        return f"cuDNN attention needs head_dim a multiple of 8 up to {limit} on this GPU, not {head_dim}"
    if has_bias and (q_len % 2 or kv_len % 2):
        return f"cuDNN attention with a bias needs even sequence lengths, not {q_len} x {kv_len}"
    return None


def check(impl, dtype, head_dim, q_len, kv_len, has_bias):
    """ValueError naming model.attention_impl where `impl` cannot compute such an attention here."""
    if impl not in IMPLS + ("cpu",):
        raise ValueError(f"model.attention_impl: {impl!r} is not one of {IMPLS}")
    if impl == "cudnn":
        reason = cudnn_unsupported(dtype, head_dim, q_len, kv_len, has_bias)
        if reason:
            raise ValueError(f"model.attention_impl: 'cudnn' cannot run here: {reason} (use 'auto' or 'xla')")


def kernel_for(impl, dtype, head_dim, q_len, kv_len, has_bias):
    """The kernel `attention` runs: 'auto' resolved to 'cudnn' or 'xla'; an explicit choice after `check`."""
    if impl == "auto":
        return "xla" if cudnn_unsupported(dtype, head_dim, q_len, kv_len, has_bias) else "cudnn"
    check(impl, dtype, head_dim, q_len, kv_len, has_bias)
    return impl


def attention(q, k, v, *, bias=None, scale=None, impl="auto", precision=None):
    """softmax(scale * q k^T + bias) v over q [batch, q_len, heads, head_dim] and k, v [batch, kv_len, heads,
    head_dim], in q's dtype with float32 logits and softmax; returns [batch, q_len, heads, head_dim].

    scale: defaults to 1 / sqrt(head_dim). bias: None or [G, heads, q_len, kv_len], added to the logits of batch
    element i from bias[i % G], G dividing the batch (Swin V2: the position bias plus the shift mask of window
    i % G; G = 1 for one bias shared by all). precision: the XLA matmuls' precision (Swin's float32 parity
    asks for HIGHEST on TPU and GPU, whose default float32 matmuls round to bf16 or TF32)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    groups = 1 if bias is None else bias.shape[0]
    if bias is not None and (batch % groups or bias.shape[1:] != (heads, q_len, kv_len)):
        raise ValueError(f"attention: bias {bias.shape} is not [G, heads, q_len, kv_len] = [G, {heads}, {q_len}, "
                         f"{kv_len}] with G dividing the batch of {batch}")
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    scale = float(head_dim ** -0.5 if scale is None else scale)
    kernel = kernel_for(impl, q.dtype, head_dim, q_len, kv_len, bias is not None)
    if kernel == "cpu":
        from vit22b.models.cpu import attention as cpu_attention
        return cpu_attention.attend(q, k, v, bias, scale, precision)
    if kernel == "cudnn":
        return fused_grouped_bias(q, k, v, bias, scale, "cudnn")
    if bias is not None:  # every batch element's bias; XLA fuses the broadcast into the logits
        bias = jnp.tile(bias.astype(jnp.float32), (batch // groups, 1, 1, 1))
    with jax.default_matmul_precision(None if precision is None else str(jax.lax.Precision(precision)).lower()):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="xla")


def fused_grouped_bias(q, k, v, bias, scale, implementation):
    """jax.nn.dot_product_attention with `implementation` for a bias of `attention`'s form. cuDNN takes a bias
    shared by the batch or one per element, never one per group: the G groups of a grouped bias become heads
    ([batch / G, len, G * heads, head_dim] against bias [1, G * heads, ...]), which is exact and keeps the bias at
    its own size."""
    groups = 1 if bias is None else bias.shape[0]
    if groups > 1:
        fold = lambda t: _groups_to_heads(t, groups)  # noqa: E731
        out = jax.nn.dot_product_attention(fold(q), fold(k), fold(v), scale=scale, implementation=implementation,
                                           bias=bias.reshape(1, -1, *bias.shape[2:]).astype(q.dtype))
        return _heads_to_groups(out, groups)
    bias = None if bias is None else bias.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=implementation)


def _groups_to_heads(t, groups):
    """[B, L, H, D] with batch element i in group i % G -> [B / G, L, G * H, D]."""
    b, length, h, d = t.shape
    return t.reshape(b // groups, groups, length, h, d).transpose(0, 2, 1, 3, 4).reshape(b // groups, length, -1, d)


def _heads_to_groups(t, groups):
    b, length, gh, d = t.shape
    return t.reshape(b, length, groups, gh // groups, d).transpose(0, 2, 1, 3, 4).reshape(b * groups, length, -1, d)
