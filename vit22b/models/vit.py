"""The ViT family, with every ViT-22B change (arXiv 2302.05442) as a switch.

ViT-22B design = block='parallel', qk_norm=True, qkv_bias=False, norm='rmsnorm', head='map'.
Classic ViT     = block='sequential', qk_norm=False, qkv_bias=True, norm='layernorm', head='token'.

Parameters carry logical axis names (see vit22b/parallel/sharding.py); activations are annotated with
`nn.with_logical_constraint`, which is a no-op outside a mesh context.
"""
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vit22b.parallel import collective, sharding
from vit22b.models import monitors
from vit22b.models.layers import REFERENCE, Dense, Norm, NormParams, Ops, PatchEmbed, ops

# width, depth, mlp_dim, num_heads. Ti..e from big_vision's decode_variant (arXiv 2106.04560, Table 2);
# 22B from arXiv 2302.05442 (mlp = 4 * width reproduces its 21.74B parameters).
VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
    "22B": (6144, 48, 24576, 48),
}

BLOCKS = ("parallel", "sequential")
NORMS = ("rmsnorm", "layernorm")
HEADS = ("map", "gap", "token")
POSEMBS = ("learn", "sincos2d")
PARALLEL_LINEAR = ("xla", "collective")
COLLECTIVE_RINGS = ("bidirectional", "unidirectional")
_SAVE_RING_OUTPUTS = jax.checkpoint_policies.save_only_these_names(collective.OUTPUT_NAME)
REMAT_POLICIES = {  # "dots" policies also keep the collective rings' outputs, which are matmul outputs too
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.checkpoint_dots,
                                                            _SAVE_RING_OUTPUTS),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _SAVE_RING_OUTPUTS),
}

Dtype = Any


def _p(init, names):
    return nn.with_logical_partitioning(init, names)


def decode_variant(variant):
    """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
    m = re.fullmatch(r"(\w+?)/(\d+)", variant or "")
    if not m or m.group(1) not in VARIANTS:
        raise ValueError(
            f"model.variant: unknown variant {variant!r}; expected NAME/PATCH with NAME in "
            f"{sorted(VARIANTS)} and any patch size, e.g. 'B/16' or '22B/14'")
    width, depth, mlp_dim, heads = VARIANTS[m.group(1)]
    return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=int(m.group(2)))


def make_norm(kind, dtype, param_dtype, name, axes=("embed",), ops=REFERENCE):
    """'rmsnorm' is the ViT-22B scale-only norm (no centering, no bias); 'layernorm' is classic. Parameter
    names (scale, bias) and initialisation are flax.linen's RMSNorm / LayerNorm."""
    return Norm(kind, dtype=dtype, param_dtype=param_dtype, axes=axes, name=name, ops=ops)


def posemb_sincos_2d(h, w, width, temperature=10_000.0):
    """Fixed 2-D sin-cos position embedding, [1, h*w, width] (MoCo v3 / big_vision layout)."""
    if width % 4:
        raise ValueError(f"model.width: sincos2d position embedding needs width % 4 == 0, got {width}")
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(pe, jnp.float32)[None]


def parallel_block_apply(x, p, *, num_heads, norm, qk_norm, dtype, ring=None, ops=REFERENCE, module=None):
    """The parallel block's math on one device's share; used as is by XLA's partitioner ('xla') and inside
    `jax.shard_map` ('collective', where `ring` = dict(axis=..., bidirectional=...) and x, the weights' fused
    dimension and the heads are this device's chunks). `module`: the block, to sow monitors into (outside
    shard_map only).

    Fused layout, head-major: column group j of in_kernel [d, h * (3 dh + m/h)] is head j's [q | k | v] and its
    m/h MLP units; out_kernel's rows [h * (dh + m/h), d] match. A contiguous split over the model axis hands each
    device whole heads and their MLP slice, so neither path moves weights to reorder them.
    """
    axis = ring and ring["axis"]
    d_local, (d, fused_local) = x.shape[-1], p["in_kernel"].shape
    h = num_heads // (d // d_local)  # heads on this device
    f, dh = fused_local // h, d // num_heads  # f = 3 dh + m / num_heads columns per head
    y = ops.normalize(x, p["norm"], norm, dtype, axis, d)
    if ring:
        z = collective.allgather_matmul(y, p["in_kernel"], axis, bidirectional=ring["bidirectional"],
                                        dtype=dtype).astype(dtype)
    else:
        z = ops.dense(y, p["in_kernel"], dtype)
    z = z.reshape(z.shape[:-1] + (h, f))
    mlp_bias = p["mlp_bias"].reshape(h, f - 3 * dh)
    if "qkv_bias" in p:  # one add over the fused [q | k | v | mlp] columns
        z = ops.add_bias(z, jnp.concatenate([p["qkv_bias"].reshape(h, 3 * dh), mlp_bias], axis=-1))
    q, k, v, hidden = ops.split(z, (dh, 2 * dh, 3 * dh), -1)
    if "qkv_bias" not in p:  # only the MLP units have a bias
        hidden = ops.add_bias(hidden, mlp_bias)
    if qk_norm:  # per head, after the projection, over head_dim; device-local
        q = ops.normalize(q, p["q_norm"], norm, dtype)
        k = ops.normalize(k, p["k_norm"], norm, dtype)
    if module is not None:
        monitors.record_attention(module, q, k, scale=dh ** -0.5)
        if qk_norm:
            monitors.record_qk_gain(module, p["q_norm"]["scale"], p["k_norm"]["scale"])
    u = ops.concatenate((ops.attention(q, k, v), ops.gelu(hidden)), -1)
    if module is not None and monitors.wanted(module, monitors.RESIDUAL):
        # The two branches share the fused out-projection: split its rows per head into attention and MLP parts.
        w = p["out_kernel"].reshape(h, -1, d)
        for name, part, rows in (("attn_branch_rms", u[..., :dh], w[:, :dh]), ("mlp_branch_rms", u[..., dh:],
                                                                               w[:, dh:])):
            monitors.record(module, monitors.RESIDUAL, name, monitors.rms(
                jnp.einsum("...hf,hfd->...d", part, rows.astype(part.dtype))))
    u = u.reshape(u.shape[:-2] + (-1,))
    if ring:
        out = collective.matmul_reducescatter(u, p["out_kernel"], axis, bidirectional=ring["bidirectional"],
                                              dtype=dtype).astype(dtype)
    else:
        out = ops.dense(u, p["out_kernel"], dtype)
    x = x + ops.add_bias(out, p["out_bias"])
    if module is not None:
        monitors.record(module, monitors.RESIDUAL, "residual_rms", monitors.rms(x))
    return x


class ParallelBlock(nn.Module):
    """ViT-22B block: y = x + Attn(N(x)) + MLP(N(x)) with one fused input and one fused output matmul.

    in_kernel  [d, 3d + m] and out_kernel [d + m, d], head-major (see `parallel_block_apply`).
    parallel_linear='xla' lets XLA's partitioner place the collectives; 'collective' runs the block in
    `jax.shard_map` with the activations split on features over the `heads` mesh axis and the two fused
    matmuls as all-gather and reduce-scatter rings (vit22b/parallel/collective.py), heads device-local. A monitor
    pass (vit22b/models/monitors.py) takes the 'xla' path: the same math, with the statistics sown from the block.
    """
    num_heads: int
    mlp_dim: int
    qk_norm: bool = True
    qkv_bias: bool = False
    norm: str = "rmsnorm"
    parallel_linear: str = "xla"
    collective_ring: str = "bidirectional"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ops: Ops = REFERENCE

    @nn.compact
    def __call__(self, x, _=None):
        d, m, h = x.shape[-1], self.mlp_dim, self.num_heads
        xavier = nn.initializers.xavier_uniform()
        p = {"norm": NormParams(self.norm, param_dtype=self.param_dtype, name="norm")(d),
             "in_kernel": self.param("in_kernel", _p(xavier, ("embed", "fused")), (d, 3 * d + m), self.param_dtype),
             "mlp_bias": self.param("mlp_bias", _p(nn.initializers.normal(1e-6), ("mlp",)), (m,), self.param_dtype),
             "out_kernel": self.param("out_kernel", _p(xavier, ("fused", "embed")), (d + m, d), self.param_dtype),
             "out_bias": self.param("out_bias", _p(nn.initializers.normal(1e-6), ("embed",)), (d,),
                                    self.param_dtype)}
        if self.qkv_bias:
            p["qkv_bias"] = self.param("qkv_bias", _p(nn.initializers.zeros, ("fused",)), (3 * d,), self.param_dtype)
        if self.qk_norm:
            p["q_norm"] = NormParams(self.norm, ("kv",), self.param_dtype, name="q_norm")(d // h)
            p["k_norm"] = NormParams(self.norm, ("kv",), self.param_dtype, name="k_norm")(d // h)
        apply = functools.partial(parallel_block_apply, num_heads=h, norm=self.norm, qk_norm=self.qk_norm,
                                  dtype=self.dtype, ops=self.ops)
        mesh = jax.sharding.get_abstract_mesh()
        axis = nn.logical_to_mesh_axes(("heads",))[0] if not mesh.empty else None
        monitored = any(monitors.wanted(self, c) for c in monitors.COLLECTIONS)
        if self.parallel_linear != "collective" or not isinstance(axis, str) or monitored:
            x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
            return apply(x, p, module=self), None
        pallas = getattr(self.ops.attention, "keywords", {}).get("impl") == "pallas"
        return _collective_block(apply, x, p, mesh, axis, self.collective_ring == "bidirectional", pallas), None


def _collective_block(apply, x, p, mesh, axis, bidirectional, pallas=False):
    """Run `apply` under `jax.shard_map`: batch over the rules' batch axes (those that divide it), features,
    heads and the fused dimension over `axis`; per-head and replicated parameters whole."""
    act = sharding.fit_spec(P(nn.logical_to_mesh_axes(("batch",))[0], None, axis), x.shape, mesh)
    specs = {"norm": {n: P(axis) for n in p["norm"]}, "in_kernel": P(None, axis), "mlp_bias": P(axis),
             "out_kernel": P(axis, None), "out_bias": P(axis)}
    if "qkv_bias" in p:
        specs["qkv_bias"] = P(axis)
    for n in ("q_norm", "k_norm"):
        if n in p:
            specs[n] = {key: P() for key in p[n]}
    ring = {"axis": axis, "bidirectional": bidirectional}
    # Pallas kernels (attention_impl='pallas') declare outputs without the varying-axes types that check_vma
    # needs; the block's psum and rings are over values that vary on `axis`, so unchecked they differentiate alike.
    return jax.shard_map(lambda x, p: apply(x, p, ring=ring), mesh=mesh, in_specs=(act, specs),
                         out_specs=act, check_vma=not pallas)(x, p)


class SequentialBlock(nn.Module):
    """Classic pre-norm block: x + Attn(N1(x)), then + MLP(N2(x)). Same switches as ParallelBlock."""
    num_heads: int
    mlp_dim: int
    qk_norm: bool = False
    qkv_bias: bool = True
    norm: str = "layernorm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ops: Ops = REFERENCE

    @nn.compact
    def __call__(self, x, _=None):
        d, m, h, ops = x.shape[-1], self.mlp_dim, self.num_heads, self.ops
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        xavier = nn.initializers.xavier_uniform()
        y = make_norm(self.norm, self.dtype, self.param_dtype, "norm1", ops=ops)(x)
        qkv = ops.dense(y, self.param("qkv_kernel", _p(xavier, ("embed", "fused")), (d, 3 * d), self.param_dtype),
                    self.dtype)
        if self.qkv_bias:
            qkv = ops.add_bias(qkv, self.param("qkv_bias", _p(nn.initializers.zeros, ("fused",)), (3 * d,),
                                           self.param_dtype))
        q, k, v = (t.reshape(t.shape[:-1] + (h, d // h)) for t in ops.split(qkv, (d, 2 * d), -1))
        if self.qk_norm:
            q = make_norm(self.norm, self.dtype, self.param_dtype, "q_norm", ("kv",), ops)(q)
            k = make_norm(self.norm, self.dtype, self.param_dtype, "k_norm", ("kv",), ops)(k)
        monitors.record_attention(self, q, k, scale=(d // h) ** -0.5)
        if self.qk_norm:
            monitors.record_qk_gain(self, self.variables["params"]["q_norm"]["scale"],
                                    self.variables["params"]["k_norm"]["scale"])
        a = ops.attention(q, k, v).reshape(x.shape[:-1] + (d,))
        a = ops.dense(a, self.param("attn_out_kernel", _p(xavier, ("heads", "embed")), (d, d), self.param_dtype),
                  self.dtype)
        a = ops.add_bias(a, self.param("attn_out_bias", _p(nn.initializers.zeros, ("embed",)), (d,), self.param_dtype))
        monitors.record(self, monitors.RESIDUAL, "attn_branch_rms", monitors.rms(a))
        x = x + a
        y = make_norm(self.norm, self.dtype, self.param_dtype, "norm2", ops=ops)(x)
        hidden = ops.dense(y, self.param("mlp_in_kernel", _p(xavier, ("embed", "mlp")), (d, m), self.param_dtype),
                       self.dtype)
        hidden = ops.add_bias(hidden, self.param("mlp_in_bias", _p(nn.initializers.normal(1e-6), ("mlp",)), (m,),
                                             self.param_dtype))
        hidden = ops.gelu(hidden)
        out = ops.dense(hidden, self.param("mlp_out_kernel", _p(xavier, ("mlp", "embed")), (m, d),
                                       self.param_dtype), self.dtype)
        out = ops.add_bias(out, self.param("mlp_out_bias", _p(nn.initializers.normal(1e-6), ("embed",)), (d,),
                                       self.param_dtype))
        monitors.record(self, monitors.RESIDUAL, "mlp_branch_rms", monitors.rms(out))
        monitors.record(self, monitors.RESIDUAL, "residual_rms", monitors.rms(x + out))
        return x + out, None


class _Projection(nn.Module):
    """flax's DenseGeneral parameters (kernel in_shape + out_shape, bias out_shape, xavier-initialised as the
    flattened matrix), computed as one dense layer on the flattened kernel."""
    in_shape: tuple
    out_shape: tuple
    axes: tuple  # logical names of the kernel's axes; the bias takes the output ones
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ops: Ops = REFERENCE

    @nn.compact
    def __call__(self, x):
        n_in, n_out = int(np.prod(self.in_shape)), int(np.prod(self.out_shape))
        xavier = nn.initializers.xavier_uniform()
        init = lambda key, shape, dtype: xavier(key, (n_in, n_out), dtype).reshape(shape)  # noqa: E731
        kernel = self.param("kernel", _p(init, self.axes), self.in_shape + self.out_shape, self.param_dtype)
        bias = self.param("bias", _p(nn.initializers.zeros, self.axes[len(self.in_shape):]), self.out_shape,
                          self.param_dtype)
        x = x.reshape(x.shape[:x.ndim - len(self.in_shape)] + (n_in,))
        y = self.ops.add_bias(self.ops.dense(x, kernel.reshape(n_in, n_out), self.dtype), bias.reshape(n_out))
        return y.reshape(y.shape[:-1] + self.out_shape)


class MAPAttention(nn.Module):
    """nn.MultiHeadDotProductAttention(num_heads, kernel_init=xavier_uniform)'s parameters (query, key, value
    [d, heads, head_dim], out [heads, head_dim, d], zero-initialised biases) and math."""
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ops: Ops = REFERENCE

    @nn.compact
    def __call__(self, inputs_q, inputs_kv):
        d, h = inputs_kv.shape[-1], self.num_heads
        if d % h:
            raise ValueError(f"map head: width {d} is not divisible by num_heads {h}")

        def project(name, in_shape, out_shape, axes):
            return _Projection(in_shape, out_shape, axes, self.dtype, self.param_dtype, self.ops, name=name)

        heads = (h, d // h)
        q = project("query", (d,), heads, ("embed", "heads", "kv"))(inputs_q)
        k = project("key", (d,), heads, ("embed", "heads", "kv"))(inputs_kv)
        v = project("value", (d,), heads, ("embed", "heads", "kv"))(inputs_kv)
        monitors.record_attention(self, q, k, scale=(d // h) ** -0.5)
        return project("out", heads, (d,), ("heads", "kv", "embed"))(self.ops.attention(q, k, v))


class MAPHead(nn.Module):
    """Multi-head attention pooling: a learned probe attends over the tokens (big_vision's MAPHead)."""
    num_heads: int
    mlp_dim: int
    norm: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ops: Ops = REFERENCE

    @nn.compact
    def __call__(self, x):
        d, ops = x.shape[-1], self.ops
        probe = self.param("probe", _p(nn.initializers.xavier_uniform(), (None, None, "embed")),
                           (1, 1, d), self.param_dtype)
        probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(self.dtype)
        x = MAPAttention(self.num_heads, self.dtype, self.param_dtype, ops, name="attention")(probe, x)
        y = make_norm(self.norm, self.dtype, self.param_dtype, "norm", ops=ops)(x)
        # nn.Dense's parameters and initialisers, with logical axes: replicated, the 22B head's MLP alone was
        # 1.1 GiB on every device.
        lecun, zeros = nn.initializers.lecun_normal(), nn.initializers.zeros
        y = Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_in", ops=ops,
                  kernel_init=_p(lecun, ("embed", "mlp")), bias_init=_p(zeros, ("mlp",)))(y)
        y = Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_out", ops=ops,
                  kernel_init=_p(lecun, ("mlp", "embed")), bias_init=_p(zeros, ("embed",)))(ops.gelu(y))
        return (x + y)[:, 0]


class ViT(nn.Module):
    """Vision Transformer; the defaults are the ViT-22B design. Input: NHWC images in [-1, 1]."""
    num_classes: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    block: str = "parallel"
    qk_norm: bool = True
    qkv_bias: bool = False
    norm: str = "rmsnorm"
    head: str = "map"
    posemb: str = "learn"
    # Layouts of imported models (vit22b/models/vit_weights.py): a class token also when the head is not 'token'
    # (timm's avg-pooled models keep one; pooling skips it), a norm after the position embedding (timm's
    # norm_pre, its `_xp` models), and the final norm after pooling instead of before (timm's fc_norm).
    class_token: bool = False
    pre_norm: bool = False
    fc_norm: bool = False
    gelu: str = "exact"  # or "tanh": big_vision's approximation, for its weights (vit_weights.py)
    head_bias_init: float = 0.0
    scan: bool = True
    remat_policy: str = "none"
    parallel_linear: str = "xla"
    collective_ring: str = "bidirectional"
    impl: str = "reference"  # or "cpu": the XLA:CPU kernels of vit22b/models/cpu/
    attention_impl: str = "auto"  # vit22b/models/attention.py
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _block(self):
        cls = ParallelBlock if self.block == "parallel" else SequentialBlock
        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            cls = nn.remat(cls, policy=policy, prevent_cse=not self.scan)
        kw = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, qk_norm=self.qk_norm, qkv_bias=self.qkv_bias,
                  norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype,
                  ops=ops(self.impl, self.attention_impl, self.gelu))
        if self.block == "parallel":
            kw.update(parallel_linear=self.parallel_linear, collective_ring=self.collective_ring)
        return cls, kw

    @nn.compact
    def __call__(self, images, *, train=False, mask=None, return_map=False):
        """mask: [B, H/p, W/p], 1 where SimMIM's mask token replaces the patch token (vit22b/models/simmim.py);
        return_map: the encoder's patch tokens as a map [B, H/p, W/p, width] instead of the head's output."""
        del train  # no dropout or stochastic depth in the ViT-22B recipe
        p, layer_ops = self.patch_size, ops(self.impl, self.attention_impl, self.gelu)
        x = PatchEmbed(self.width, patch=p, dtype=self.dtype, param_dtype=self.param_dtype, name="embedding",
                       ops=layer_ops,
                       kernel_init=_p(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                       bias_init=_p(nn.initializers.zeros, ("embed",)))(images.astype(self.dtype))
        b, h, w, d = x.shape
        if mask is not None:  # on the patch tokens, before the position embedding (SimMIM's ViT)
            token = self.param("mask_token", _p(nn.initializers.normal(0.02), (None, None, None, "embed")),
                               (1, 1, 1, d), self.param_dtype)
            m = mask.astype(x.dtype)[..., None]
            x = x * (1 - m) + token.astype(x.dtype) * m
        x = x.reshape(b, h * w, d)
        if self.posemb == "learn":
            pe = self.param("pos_embedding", _p(nn.initializers.normal(1 / np.sqrt(d)), (None, "length", "embed")),
                            (1, h * w, d), self.param_dtype)
        else:
            pe = posemb_sincos_2d(h, w, d)
        x = layer_ops.add_bias(x, pe[0])
        prefix = int(self.head == "token" or self.class_token)
        if prefix:
            cls = self.param("cls", _p(nn.initializers.zeros, (None, None, "embed")), (1, 1, d), self.param_dtype)
            x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (b, 1, 1)), x], axis=1)
        if self.pre_norm:
            x = make_norm(self.norm, self.dtype, self.param_dtype, "pre_norm", ops=layer_ops)(x)

        block_cls, kw = self._block()
        if self.scan:
            stack = nn.scan(block_cls, variable_axes=monitors.SCAN_AXES, split_rngs={"params": True},
                            length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(**kw, name="blocks")(x, None)
        else:
            for i in range(self.depth):
                x, _ = block_cls(**kw, name=f"block_{i:02d}")(x, None)
        # The encoder output batch-sharded, whatever layout the blocks left it in: without this, XLA partitioned
        # the MAP head's backward wrongly after the collective blocks' feature-sharded output inside the
        # gradient-accumulation scan (block gradients off by half; tests/test_meshes.py, '+accum').
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        if not self.fc_norm:
            x = make_norm(self.norm, self.dtype, self.param_dtype, "encoder_norm", ops=layer_ops)(x)
        if return_map:
            return x[:, prefix:].reshape(b, h, w, d).astype(jnp.float32)

        if self.head == "map":
            x = MAPHead(self.num_heads, self.mlp_dim, self.norm, self.dtype, self.param_dtype, layer_ops,
                        name="map_head")(x[:, prefix:])
        elif self.head == "gap":
            x = x[:, prefix:].mean(axis=1)
        else:
            x = x[:, 0]
        if self.fc_norm:
            x = make_norm(self.norm, self.dtype, self.param_dtype, "fc_norm", ops=layer_ops)(x)
        if not self.num_classes:  # pre-logit features (a backbone, or weights loaded without their head)
            return x.astype(jnp.float32)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head",
                          kernel_init=_p(nn.initializers.zeros, ("embed", "classes")),
                          bias_init=_p(nn.initializers.constant(self.head_bias_init), ("classes",)))(x)
        return logits.astype(jnp.float32)


