"""The hand-written VJPs behind the CPU speed work (vit22b/models/layers.py and attention.py) compute what
autodiff of the plain formula computes, and the compiled bf16 train step keeps its matmuls in bf16."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit22b import models
from vit22b.models import attention, layers

R = np.random.default_rng(0)


def rand(*shape, scale=1.0, dtype=jnp.float32):
    return jnp.asarray(R.standard_normal(shape) * scale, dtype)


def reference_attention(q, k, v):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)


def assert_same_value_and_grads(ours, ref, args, atol):
    g = rand(*ours(*args).shape)
    np.testing.assert_allclose(ours(*args), ref(*args), atol=atol)
    argnums = tuple(range(len(args)))
    got = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * g), argnums))(*args)
    want = jax.grad(lambda *a: jnp.sum(ref(*a) * g), argnums)(*args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=atol * max(1.0, float(jnp.abs(b).max())))


@pytest.mark.parametrize("chunks", [1, 3, None])  # None: cpu_batch_chunks, 1 slice for this small problem
def test_attention_matches_autodiff_of_the_formula(chunks):
    q, k, v = rand(6, 7, 3, 4), rand(6, 7, 3, 4), rand(6, 7, 3, 4)
    assert_same_value_and_grads(lambda q, k, v: attention.attend(q, k, v, jnp.float32, batch_chunks=chunks),
                                reference_attention, (q, k, v), atol=1e-5)


def reference_cosine_attention(t, scale, bias, heads):
    """Swin V2's formula: cosine similarity (torch's F.normalize, eps 1e-12) times a per-head scale, plus the
    bias of window i % G, softmax, values; t = [q | k | v]."""
    n, length, c3 = t.shape
    q, k, v = (x.reshape(n, length, heads, -1) for x in jnp.split(t, 3, axis=-1))
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    logits = jnp.einsum("bqhd,bkhd->bhqk", unit(q), unit(k)) * scale[None, :, None, None]
    logits = logits + jnp.tile(bias, (n // bias.shape[0], 1, 1, 1))
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(n, length, -1)


@pytest.mark.parametrize("chunks", [1, 2])
def test_cosine_attention_matches_autodiff_of_the_formula(chunks):
    # 6 = 2 images x 3 windows; bias [windows, heads, q, k] as Swin builds it (position bias + shift mask).
    t, scale, bias = rand(6, 7, 3 * 3 * 4), jnp.asarray([0.5, 3.0, 10.0]), rand(3, 3, 7, 7)
    assert_same_value_and_grads(
        lambda t, s, b: attention.cosine_attention(t, s, b, 3, batch_chunks=chunks),
        lambda t, s, b: reference_cosine_attention(t, s, b, 3), (t, scale, bias), atol=2e-5)


def test_cosine_attention_in_bf16_follows_float32():
    r = np.random.default_rng(1)
    t, bias, g = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((6, 16, 48), (3, 2, 16, 16), (6, 16, 16)))
    scale = jnp.asarray([2.0, 10.0])
    def value_and_grads(t, dtype):
        f = lambda t, s, b: jnp.sum(attention.cosine_attention(t.astype(dtype), s, b, 2).astype(jnp.float32) * g)
        return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(t, scale, bias)
    (v16, g16), (v32, g32) = value_and_grads(t, jnp.bfloat16), value_and_grads(t, jnp.float32)
    assert g16[0].dtype == jnp.float32 and g16[1].dtype == g16[2].dtype == jnp.float32
    np.testing.assert_allclose(v16, v32, rtol=2e-2)
    for a, b in zip(g16, g32):  # bf16 q, k: logits off by up to scale * 2^-8, the scale's gradient by a few %
        np.testing.assert_allclose(a, b, atol=5e-2 * float(jnp.abs(b).max()))


def test_batch_chunks_keep_whole_bias_groups():
    big = 1 << 30  # score elements: no size limit
    c = attention.cpu_batch_chunks
    assert c(8, 1, big) == 8 and c(6, 1, big) == 2 and c(7, 1, big) == 1
    assert c(512, 64, big) == 8 and c(128, 64, big) == 2 and c(6, 3, big) == 2 and c(3, 3, big) == 1
    # Slices keep at least MIN_SLICE_SCORES score elements: ViT-B/16 at batch 8 takes 8, a tiny model none.
    assert c(8, 1, 8 * 12 * 197 * 197) == 8 and c(8, 1, 8 * 12 * 128 * 128) == 4 and c(8, 1, 8 * 4 * 65 * 65) == 1
    with pytest.raises(ValueError, match="batch_chunks=3 must split the batch of 6 into whole multiples of the "
                                         "bias's 3 groups"):
        attention.cosine_attention(rand(6, 7, 36), jnp.ones(3), rand(3, 3, 7, 7), 3, batch_chunks=3)


# tree=True: the float32 row sums as a tree of adds, as the ViT qk-norms take them; None: XLA's reduction.
@pytest.mark.parametrize("tree", [None, True])
@pytest.mark.parametrize("kind,flax_norm", [("layernorm", nn.LayerNorm(epsilon=1e-6, use_fast_variance=False)),
                                            ("rmsnorm", nn.RMSNorm(epsilon=1e-6))])
def test_norm_matches_flax_with_the_same_parameters(kind, flax_norm, tree):
    x = rand(3, 5, 13, scale=2.0) + 1.0
    ours = layers.Norm(kind, tree=tree)
    params = nn.meta.unbox(ours.init(jax.random.PRNGKey(0), x))
    assert jax.tree.structure(params) == jax.tree.structure(flax_norm.init(jax.random.PRNGKey(0), x))
    params = jax.tree.map(lambda p: p + rand(*p.shape, scale=0.3), params)  # non-trivial scale and bias
    assert_same_value_and_grads(lambda p, x: ours.apply(p, x), lambda p, x: flax_norm.apply(p, x),
                                (params, x), atol=2e-6)


@pytest.mark.parametrize("width", [1, 13, 64, 96, 128, 200])
def test_row_sums_as_a_tree_of_adds_equal_the_sum(width):
    # Rows of up to 128 features take the halving tree (odd widths fold the last column in), longer ones XLA's sum.
    x = rand(3, 5, width)
    np.testing.assert_allclose(layers._row_sum(x, tree=True), x.sum(-1, keepdims=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_bf16_norm_follows_float32(kind):
    x, g = rand(4, 7, 3, 13, scale=2.0) + 1.0, rand(4, 7, 3, 13)
    p = {"scale": 1.0 + rand(13, scale=0.3), "bias": rand(13, scale=0.3)} if kind == "layernorm" else \
        {"scale": 1.0 + rand(13, scale=0.3)}
    def loss(x, p):
        return jnp.sum(layers.normalize(x, p, kind, x.dtype).astype(jnp.float32) * g)
    want = jax.grad(loss, (0, 1))(x, p)
    got = jax.jit(jax.grad(loss, (0, 1)))(x.astype(jnp.bfloat16), p)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.05 * float(np.abs(b).max()))


def test_gelu_is_exact_gelu():
    x = jnp.linspace(-8.0, 8.0, 2001)
    assert_same_value_and_grads(layers.gelu, lambda x: jax.nn.gelu(x, approximate=False), (x,), atol=2e-6)
    assert layers.gelu(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("shape,bias_shape", [((8, 197, 64), (64,)), ((7, 9, 16), (9, 16))])
def test_bias_gradient_is_summed_in_float32(shape, bias_shape):
    # 1576 bf16 rows per feature: a sum kept in bf16 (8 significant bits) is off by ~1 here; float32 is not.
    # 7 rows of a [9, 16] bias (a position embedding) take the tree of adds, odd row count included.
    g = rand(*shape, dtype=jnp.bfloat16)
    _, vjp = jax.vjp(jax.jit(layers.add_bias), jnp.zeros(shape, jnp.bfloat16), jnp.zeros(bias_shape, jnp.float32))
    dx, db = vjp(g)
    assert dx.dtype == jnp.bfloat16 and db.dtype == jnp.float32
    exact = np.asarray(g, np.float64).sum(tuple(range(len(shape) - len(bias_shape))))
    np.testing.assert_allclose(db, exact, atol=1e-3)


def _dot_operand_dtypes(hlo):
    """(lhs dtype, rhs dtype, op_name) of every dot in compiled HLO text, operands resolved to their shapes."""
    shapes, dots = {}, []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[", line)
        if m:
            shapes[m.group(1)] = m.group(2)
        d = re.search(r" dot\(%([\w.\-]+), %([\w.\-]+)\).*?op_name=\"([^\"]*)\"", line)
        if d:
            dots.append((d.group(1), d.group(2), d.group(3)))
    return [(shapes.get(a), shapes.get(b), name) for a, b, name in dots]


def _bf16_grad_hlo(design, depth, batch, scan):
    """The compiled gradient of a small bf16 ViT (32 px, patch 4: 64 tokens) of the classic or 22B design."""
    kw = dict(width=64, depth=depth, mlp_dim=128, num_heads=4, patch_size=4, scan=scan, dtype="bfloat16")
    kw.update(dict(block="parallel", qk_norm=True, qkv_bias=False, norm="rmsnorm", head="map")
              if design == "parallel" else {})
    model = models.build("vit", kw, num_classes=10)
    x = jnp.zeros((batch, 32, 32, 3))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"])
    loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)
    return jax.jit(jax.grad(loss)).lower(params).compile().as_text()


@pytest.mark.parametrize("design", ["sequential", "parallel"])
def test_bf16_train_step_keeps_block_matmuls_in_bf16(design, monkeypatch):
    """XLA:CPU converts a bf16 dot's operands to f32 (halving its speed) when an operand arrives with a
    permuted layout; attention on [batch * heads, len, dim] and the custom VJPs avoid that. Every matmul of
    the transformer blocks, forward and backward, must keep bf16 operands (where the CPU multiplies bf16
    natively, the case pinned here; the other is the test below)."""
    monkeypatch.setenv("VIT22B_BF16_DOTS", "native")
    hlo = _bf16_grad_hlo(design, depth=2, batch=4, scan=False)
    block_dots = [d for d in _dot_operand_dtypes(hlo) if "block_" in d[2]]
    assert len(block_dots) >= 2 * 12  # 2 blocks x (4 forward + 8 backward) matmuls at least
    assert all(a == b == "bf16" for a, b, _ in block_dots), [d for d in block_dots if d[:2] != ("bf16", "bf16")]
    if design == "parallel":
        # With excess precision allowed, XLA concatenated the block's bf16 [attention | MLP] activations and the
        # fused projection's gradient in float32 (twice the bytes); layers.concatenate / split keep them 16-bit.
        wide = re.findall(r"(\w+)\[4,64,4,(?:48|80)\]\S* concatenate\(", hlo)
        assert wide and set(wide) <= {"bf16", "u16"}, wide  # f32 before
        # Without a q/k/v bias only the MLP units get one: the bias and its gradient's sum cover [4 heads, 32
        # units], not the fused [4, 80] columns with the q/k/v zeros (an f32[4,80] reduce before).
        assert re.search(r"f32\[4,32\]\S* reduce\(", hlo) and not re.search(r"\w+\[4,80\]", hlo)


def test_without_bf16_instructions_dense_layers_multiply_in_float32(monkeypatch):
    """On a CPU without bf16 matmul instructions (vit22b/host_cpu.py) the dense layers' matmuls, forward and
    backward, take float32 operands (faster there: ViT-B/16 bf16 steps 10.7 -> 8.3 s on a Zen 3); attention's
    small per-head products stay bf16, which was faster there for them."""
    monkeypatch.setenv("VIT22B_BF16_DOTS", "float32")
    dots = [d for d in _dot_operand_dtypes(_bf16_grad_hlo("sequential", depth=2, batch=4, scan=False))
            if "block_" in d[2]]
    dense = {d[:2] for d in dots if "..." in d[2]}
    attention = {d[:2] for d in dots if "nqd" in d[2] or "nkd" in d[2]}
    assert dense == {("f32", "f32")} and attention == {("bf16", "bf16")}, dots


def test_scanned_program_does_not_grow_with_depth():
    """nn.scan keeps one copy of the block in the program, so compile time stays flat in depth (the bench
    measures compile_s; README, Performance). Checked here on the compiled program's size, not a clock."""
    def hlo_size(depth):
        model = models.build("vit", dict(width=32, depth=depth, mlp_dim=64, num_heads=2, patch_size=4, scan=True,
                                         block="parallel", qk_norm=True, qkv_bias=False, norm="rmsnorm",
                                         head="map"), num_classes=10)
        x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
        params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape))))
        loss = lambda p, x: jnp.sum(model.apply(p, x) ** 2)
        return len(jax.jit(jax.grad(loss)).lower(params, x).compile().as_text())

    small, deep = hlo_size(4), hlo_size(48)
    assert deep < 1.05 * small, (small, deep)


@pytest.mark.parametrize("design", ["sequential", "parallel"])
def test_scanned_bf16_residuals_are_not_stacked_in_float32(design):
    """Under nn.scan, XLA:CPU converted every stacked bf16 residual buffer to float32 and back on each
    iteration (a 46% slower scanned ViT-B/16 bf16 step than unrolled); the custom VJPs store bf16 residuals
    as uint16 bits. No float32 stack of activations [depth, batch, tokens, ...] may appear in the program."""
    hlo = _bf16_grad_hlo(design, depth=3, batch=5, scan=True)
    # Stacked per-token arrays: [depth, batch, tokens (64, or 65 with a class token), ...]; float32 statistics of
    # the norms ([..., 1]) are expected.
    stacks = {m.group(1) for m in re.finditer(r"(f32|bf16|u16)\[3,5,6[45](,\d+)*\]", hlo)
              if not m.group(0).endswith(",1]")}
    assert "u16" in stacks and not stacks - {"u16"}, stacks


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_concatenate_and_split_equal_jnp(dtype):
    """Both move values without arithmetic, so they equal jnp's exactly, values and gradients."""
    a, b = rand(3, 5, dtype=dtype), rand(3, 2, dtype=dtype)
    assert_same_value_and_grads(lambda a, b: layers.concatenate((a, b), -1) ** 2,
                                lambda a, b: jnp.concatenate((a, b), -1) ** 2, (a, b), atol=0)
    assert layers.concatenate((a, b), -1).dtype == dtype
    z = rand(4, 7, dtype=dtype)
    assert_same_value_and_grads(lambda z: jnp.stack([t.sum(0) for t in layers.split(z, (2, 3), 0)]) ** 2,
                                lambda z: jnp.stack([t.sum(0) for t in jnp.split(z, (2, 3), 0)]) ** 2, (z,), atol=0)
