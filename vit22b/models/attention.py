"""The one attention entry point: ViT self-attention, the MAP head's pooling and Swin V2's window attention all
call `attention`, whose kernel `config.model.attention_impl` picks:

- 'xla': `jax.nn.dot_product_attention` in plain XLA (logits and softmax in float32), differentiated by autodiff.
- 'cudnn': cuDNN's fused flash attention on NVIDIA GPUs (bf16 / fp16, head_dim a multiple of 8 up to 128, or
  256 from Hopper on; with a bias, even sequence lengths).
- 'pallas': on TPUs, the Pallas flash attention (`jax.experimental.pallas.ops.tpu.flash_attention`), forward and
  backward in VMEM tiles of 128, bias included (its gradient too), for every attention whose shapes it takes,
  'xla' for the others: sequence lengths that are multiples of 128 (a query under 128 long, such as the MAP
  head's one probe, is one tile), head_dim up to 128 or a multiple of 128. ViT-22B's 256 tokens and Swin V2
  windows of 16 or 32 qualify; ViT-B/16's 196 or 197 tokens, Swin V2 windows of 8, 12, 20, 24 or 40 and the
  last stage whose resolution clips the window do not.
- 'auto' (default): 'cudnn' where it can run this call, else 'xla' ('pallas' is not chosen by itself until
  timed on TPU hardware).
- 'cpu': the XLA:CPU kernel of vit22b/models/cpu/attention.py, chosen by config.model.impl='cpu'.

An explicit 'cudnn' that cannot run is a config error naming model.attention_impl (`check`, before tracing).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLS = ("auto", "xla", "cudnn", "pallas")
TILE = 128  # the TPU flash kernel's block along both sequence dimensions


def target_platform():
    """The platform of the program being traced: its mesh's (a TPU topology's when the planner compiles for one
    on a CPU host), else this host's backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def _nvidia_gpu():
    if target_platform() != "gpu":
        return False
    device = jax.devices()[0]
    return device.platform == "gpu" and "cuda" in device.client.platform_version.lower()


def cudnn_unsupported(dtype, head_dim, q_len, kv_len, has_bias):
    """Why cuDNN's fused attention cannot compute this attention here (a sentence), or None if it can."""
    if not _nvidia_gpu():
        return f"cuDNN attention needs an NVIDIA GPU; the target here is {target_platform()}"
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN attention needs bfloat16 or float16 activations (model.dtype), not {jnp.dtype(dtype).name}"
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    limit = 256 if float(capability) >= 9.0 else 128
    if head_dim % 8 or head_dim > limit:
        return f"cuDNN attention needs head_dim a multiple of 8 up to {limit} on this GPU, not {head_dim}"
    if has_bias and (q_len % 2 or kv_len % 2):
        return f"cuDNN attention with a bias needs even sequence lengths, not {q_len} x {kv_len}"
    return None


def pallas_unsupported(head_dim, q_len, kv_len):
    """Why the Pallas TPU flash attention cannot compute this attention here (a sentence), or None if it can."""
    if target_platform() != "tpu":
        return f"Pallas flash attention is a TPU kernel; the target here is {target_platform()}"
    if kv_len % TILE or (q_len % TILE and q_len > TILE):
        return (f"Pallas flash attention needs sequence lengths that are multiples of {TILE} (a query shorter "
                f"than {TILE} is one tile), not {q_len} x {kv_len}")
    if head_dim > TILE and head_dim % TILE:
        return f"Pallas flash attention needs head_dim up to {TILE} or a multiple of it, not {head_dim}"
    return None


def check(impl, dtype, head_dim, q_len, kv_len, has_bias):
    """ValueError naming model.attention_impl where `impl` cannot compute such an attention here."""
    if impl not in IMPLS + ("cpu",):
        raise ValueError(f"model.attention_impl: {impl!r} is not one of {IMPLS}")
    if impl == "cudnn":
        reason = cudnn_unsupported(dtype, head_dim, q_len, kv_len, has_bias)
        if reason:
            raise ValueError(f"model.attention_impl: 'cudnn' cannot run here: {reason} (use 'auto' or 'xla')")
    if impl == "pallas" and target_platform() != "tpu":
        raise ValueError(f"model.attention_impl: 'pallas' is a TPU kernel; the target here is {target_platform()} "
                         f"(use 'auto' or 'xla')")


def kernel_for(impl, dtype, head_dim, q_len, kv_len, has_bias):
    """The kernel `attention` runs: 'auto' resolved to 'cudnn' or 'xla', 'pallas' to 'xla' for shapes it does
    not take; an explicit choice after `check`."""
    if impl == "auto":
        return "xla" if cudnn_unsupported(dtype, head_dim, q_len, kv_len, has_bias) else "cudnn"
    check(impl, dtype, head_dim, q_len, kv_len, has_bias)
    if impl == "pallas" and pallas_unsupported(head_dim, q_len, kv_len):
        return "xla"
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
    if kernel == "pallas":
        return pallas_flash(q, k, v, bias, scale)
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


def pallas_flash(q, k, v, bias, scale):
    """The TPU flash kernel for `attention`'s arguments. XLA cannot partition a Pallas kernel, so on a mesh with
    automatic axes it runs under `jax.shard_map`: batch over the rules' batch axes, heads over the heads axis
    (those that divide them), each device's share whole."""
    mesh = jax.sharding.get_abstract_mesh()
    auto = [] if mesh.empty else [a for a, t in zip(mesh.axis_names, mesh.axis_types)
                                  if t != jax.sharding.AxisType.Manual]
    if all(mesh.shape[a] == 1 for a in auto):  # one device, or inside a shard_map (the collective ViT block)
        return _flash_local(q, k, v, bias, scale)
    from vit22b.parallel import sharding
    batch_axes, heads_axis = nn.logical_to_mesh_axes(("batch", "heads"))
    spec = sharding.fit_spec(P(_only(batch_axes, auto), None, _only(heads_axis, auto)), q.shape, mesh)
    local_batch = q.shape[0] // math.prod(mesh.shape[a] for a in _names(spec[0]))
    if bias is not None and local_batch % bias.shape[0]:  # each device's elements must start a group cycle
        bias = jnp.tile(bias, (q.shape[0] // bias.shape[0], 1, 1, 1))
    bias_spec = None if bias is None else P(spec[0] if bias.shape[0] == q.shape[0] else None, spec[2])
    return jax.shard_map(lambda q, k, v, b: _flash_local(q, k, v, b, scale), mesh=mesh,
                         in_specs=(spec, spec, spec, bias_spec), out_specs=spec, axis_names=set(auto),
                         check_vma=False)(q, k, v, bias)


def _names(axes):
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _only(axes, allowed):
    kept = tuple(a for a in _names(axes) if a in allowed)
    return None if not kept else kept[0] if len(kept) == 1 else kept


def _flash_local(q, k, v, bias, scale):
    """The kernel on one device's arrays. It adds the bias before scaling ((q k^T + ab) * scale), so it gets
    bias / scale in float32, tiled to one per batch element."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
    batch, q_len = q.shape[:2]
    bq = min(q_len, TILE)
    blocks = tpu_flash.BlockSizes(
        block_q=bq, block_k_major=TILE, block_k=TILE, block_b=1,
        block_q_major_dkv=bq, block_k_major_dkv=TILE, block_k_dkv=TILE, block_q_dkv=bq,
        block_k_major_dq=TILE, block_k_dq=TILE, block_q_dq=bq)
    ab = None
    if bias is not None:
        ab = jnp.tile(bias.astype(jnp.float32) / scale, (batch // bias.shape[0], 1, 1, 1))
    heads_first = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731  [B, L, H, D] <-> [B, H, L, D]
    out = tpu_flash.flash_attention(heads_first(q), heads_first(k), heads_first(v), ab, sm_scale=scale,
                                    block_sizes=blocks)
    return heads_first(out)


def _groups_to_heads(t, groups):
    """[B, L, H, D] with batch element i in group i % G -> [B / G, L, G * H, D]."""
    b, length, h, d = t.shape
    return t.reshape(b // groups, groups, length, h, d).transpose(0, 2, 1, 3, 4).reshape(b // groups, length, -1, d)


def _heads_to_groups(t, groups):
    b, length, gh, d = t.shape
    return t.reshape(b, length, groups, gh // groups, d).transpose(0, 2, 1, 3, 4).reshape(b * groups, length, -1, d)
