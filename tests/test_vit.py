"""Each ViT-22B switch changes exactly what it claims."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit22b import models
from vit22b.models import layers, vit

DESIGN = dict(block="parallel", qk_norm=True, qkv_bias=False, norm="rmsnorm", head="map")
CLASSIC = dict(block="sequential", qk_norm=False, qkv_bias=True, norm="layernorm", head="token")


def tiny(**kw):
    base = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=2, scan=False)
    base.update(kw)
    return models.build("vit", base, num_classes=5)


def init(model, size=8, seed=0):
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3)))
    return nn.meta.unbox(variables["params"])


def abstract_params(model, size):
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
    return nn.meta.unbox(boxed)["params"]


def count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def perturb(params, seed=1, scale=0.3):
    """Random values everywhere, so zero-initialised biases/heads and unit norm scales are exercised."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


def test_22b_block_parameters_exact():
    p = abstract_params(models.build("vit", dict(variant="22B/14"), num_classes=1000), 224)
    kernels = {k: v for k, v in p["blocks"].items() if k.endswith("kernel")}
    assert count(kernels) == 21_743_271_936 == 48 * 12 * 6144 ** 2
    assert p["blocks"]["in_kernel"].shape == (48, 6144, 3 * 6144 + 24576)
    assert p["blocks"]["out_kernel"].shape == (48, 6144 + 24576, 6144)
    assert p["pos_embedding"].shape == (1, 256, 6144)  # 224 / 14 = 16 x 16 tokens
    # Non-kernel block parameters: MLP-in bias, out bias, the shared norm scale, and the two QK-norm scales.
    assert count(p["blocks"]) - count(kernels) == 48 * (24576 + 6144 + 6144 + 2 * 128)


@pytest.mark.parametrize("variant", ["Ti/16", "S/16", "B/16", "L/16", "H/14", "g/14", "G/14", "e/14"])
@pytest.mark.parametrize("layout", ["design", "classic"])
def test_variant_parameter_counts(variant, layout):
    shape = vit.decode_variant(variant)
    d, L, m, h, p = shape["width"], shape["depth"], shape["mlp_dim"], shape["num_heads"], shape["patch_size"]
    switches = DESIGN if layout == "design" else CLASSIC
    params = abstract_params(models.build("vit", dict(variant=variant, **switches), num_classes=1000), 224)
    n = (224 // p) ** 2
    embed = p * p * 3 * d + d + n * d
    if layout == "design":  # fused parallel block, RMS norms, QK-norm, MAP head
        block = d * (3 * d + m) + (d + m) * d + m + d + d + 2 * (d // h)
        head = d + (4 * d * d + 4 * d) + d + (d * m + m + m * d + d)  # probe, attention, norm, MLP
        final_norm = d
    else:  # classic: qkv bias, LayerNorm with bias, class token
        block = 4 * d * d + 3 * d + d + 2 * d * m + m + d + 4 * d
        head = d  # cls token
        final_norm = 2 * d
    expected = embed + L * block + final_norm + head + d * 1000 + 1000
    assert count(params) == expected


def test_classic_b16_matches_big_vision_count():
    # big_vision / original ViT-B/16 (class token, no posemb on it): 86,566,888 parameters with 1000 classes.
    params = abstract_params(models.build("vit", dict(variant="B/16", **CLASSIC), num_classes=1000), 224)
    assert count(params) == 86_566_888


def _rms(x, scale, eps=1e-6):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale


def _gelu(x):
    from scipy.special import erf
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_parallel_block_equals_written_formula(qkv_bias):
    d, m, h = 32, 48, 4
    block = vit.ParallelBlock(num_heads=h, mlp_dim=m, qkv_bias=qkv_bias)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, d))
    params = perturb(nn.meta.unbox(block.init(jax.random.PRNGKey(1), x)["params"]))
    out, _ = block.apply({"params": params}, x)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xn = np.asarray(x, np.float64)
    y = _rms(xn, p["norm"]["scale"])                       # y' = N(x), one shared norm
    z = y @ p["in_kernel"]                                 # one fused matmul, head-major:
    z = z.reshape(2, 5, h, 3 * (d // h) + m // h)          # head j's columns are [q_j | k_j | v_j | mlp_j]
    if qkv_bias:
        z[..., :3 * (d // h)] += p["qkv_bias"].reshape(h, 3 * (d // h))
    q, k, v = (z[..., i * (d // h):(i + 1) * (d // h)] for i in range(3))
    q, k = _rms(q, p["q_norm"]["scale"]), _rms(k, p["k_norm"]["scale"])  # per head, over head_dim
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    attn = np.einsum("bhqk,bkhd->bqhd", w, v)
    hidden = _gelu(z[..., 3 * (d // h):] + p["mlp_bias"].reshape(h, m // h))
    expected = xn + np.concatenate([attn, hidden], -1).reshape(2, 5, d + m) @ p["out_kernel"] + p["out_bias"]
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-4)


def _scale_head_q(params, head, c, d, h, block_key):
    """Multiply the query projection columns of one head by c."""
    kern = "in_kernel" if "in_kernel" in params[block_key] else "qkv_kernel"
    w = np.array(params[block_key][kern])
    hd = d // h
    start = head * (w.shape[1] // h) if kern == "in_kernel" else head * hd  # head-major fused columns
    w[:, start:start + hd] *= c
    new = jax.tree.map(lambda a: a, params)
    new[block_key] = dict(params[block_key], **{kern: jnp.asarray(w)})
    return new


@pytest.mark.parametrize("block", ["parallel", "sequential"])
def test_qk_norm_is_per_head_after_projection(block):
    d, h = 32, 4
    images = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 3))
    for qk_norm in (True, False):
        model = tiny(block=block, qk_norm=qk_norm, head="gap", width=d, num_heads=h)
        params = perturb(init(model))
        if qk_norm:  # one scale of size head_dim shared by the heads: normalisation is over head_dim
            assert params["block_00"]["q_norm"]["scale"].shape == (d // h,)
            assert params["block_00"]["k_norm"]["scale"].shape == (d // h,)
        else:
            assert "q_norm" not in params["block_00"] and "k_norm" not in params["block_00"]
        apply = jax.jit(model.apply)
        base = apply({"params": params}, images)
        # Scaling ONE head's query projection is invisible after a per-head norm; a norm over the full width
        # (or none at all) would change every head's attention.
        scaled = apply({"params": _scale_head_q(params, 1, 7.0, d, h, "block_00")}, images)
        if qk_norm:
            np.testing.assert_allclose(scaled, base, atol=1e-4)
        else:
            assert np.abs(np.asarray(scaled) - np.asarray(base)).max() > 1e-3


def test_bias_free_layout_has_no_biases():
    design = init(tiny(**DESIGN))
    blk = design["block_00"]
    assert set(blk) == {"norm", "in_kernel", "mlp_bias", "q_norm", "k_norm", "out_kernel", "out_bias"}
    assert set(blk["norm"]) == {"scale"} and set(blk["q_norm"]) == {"scale"}
    assert set(design["encoder_norm"]) == {"scale"}
    classic = init(tiny(**CLASSIC))["block_00"]
    assert classic["qkv_bias"].shape == (96,)
    assert set(classic["norm1"]) == {"scale", "bias"}
    # Only the switched-off pieces disappear: the MLP biases stay (the paper keeps them).
    with_qkv_bias = init(tiny(**dict(DESIGN, qkv_bias=True)))["block_00"]
    assert with_qkv_bias["qkv_bias"].shape == (96,) and "mlp_bias" in with_qkv_bias


def test_rmsnorm_does_not_center():
    norm = vit.make_norm("rmsnorm", jnp.float32, jnp.float32, "n")
    x = jnp.arange(8.0)[None] + 3.0
    out = norm.apply(norm.init(jax.random.PRNGKey(0), x), x)
    np.testing.assert_allclose(out, _rms(x, 1.0), rtol=1e-5)
    assert float(out.mean()) > 0.5  # a LayerNorm would centre this to mean 0


@pytest.mark.parametrize("head,extra", [("map", "map_head"), ("gap", None), ("token", "cls")])
def test_heads(head, extra):
    model = tiny(head=head)
    params = init(model)
    if extra:
        assert extra in params
    assert not ({"map_head", "cls"} - {extra}) & set(params)
    apply = jax.jit(model.apply)
    logits = apply({"params": perturb(params)}, jnp.ones((3, 8, 8, 3)))
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
    # The classifier starts at zero, so a fresh model predicts uniform logits.
    np.testing.assert_allclose(apply({"params": params}, jnp.ones((3, 8, 8, 3))), 0.0, atol=1e-6)


def test_map_attention_equals_flax_multihead_attention():
    """The MAP head's attention keeps flax's parameter tree, initialisation and math; only the matmuls change."""
    probe = jax.random.normal(jax.random.PRNGKey(0), (3, 1, 32))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 7, 32))
    ours = vit.MAPAttention(num_heads=4)
    ref = nn.MultiHeadDotProductAttention(num_heads=4, kernel_init=nn.initializers.xavier_uniform())
    params = nn.meta.unbox(ours.init(jax.random.PRNGKey(2), probe, x))["params"]
    ref_params = ref.init(jax.random.PRNGKey(2), probe, x)["params"]
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):  # same draws, same fan-in/out
        np.testing.assert_allclose(a, b, atol=1e-6)
    params = perturb(params)
    run = lambda m: lambda p, x: m.apply({"params": p}, probe, x)  # noqa: E731
    np.testing.assert_allclose(run(ours)(params, x), run(ref)(params, x), rtol=1e-5, atol=1e-5)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(run(m)(p, x)))  # noqa: E731
    got, want = jax.grad(loss(ours), (0, 1))(params, x), jax.grad(loss(ref), (0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="num_heads 5"):
        vit.MAPAttention(num_heads=5).init(jax.random.PRNGKey(0), probe, x)


def test_posemb_switch():
    assert init(tiny(posemb="learn"))["pos_embedding"].shape == (1, 16, 32)
    model = tiny(posemb="sincos2d")
    params = init(model)
    assert "pos_embedding" not in params
    # The fixed embedding depends on position: shifting the image content changes the output.
    img = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 3))
    p = perturb(params)
    apply = jax.jit(model.apply)
    a, b = apply({"params": p}, img), apply({"params": p}, jnp.roll(img, 2, axis=2))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


@pytest.mark.parametrize("block", ["parallel", "sequential"])
def test_scan_and_remat_equal_unrolled(block):
    unrolled = tiny(block=block, depth=3)
    params = perturb(init(unrolled))
    blocks = [params.pop(f"block_{i:02d}") for i in range(3)]
    stacked = dict(params, blocks=jax.tree.map(lambda *xs: jnp.stack(xs), *blocks))
    params_unrolled = dict(params, **{f"block_{i:02d}": b for i, b in enumerate(blocks)})
    img = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    ref = jax.jit(unrolled.apply)({"params": params_unrolled}, img)
    for policy in ("none", "dots_no_batch"):
        scanned = tiny(block=block, depth=3, scan=True, remat_policy=policy)
        assert jax.tree.map(jnp.shape, init(scanned)) == jax.tree.map(jnp.shape, stacked)
        np.testing.assert_allclose(jax.jit(scanned.apply)({"params": stacked}, img), ref, atol=1e-5)

        def loss(p, m=scanned):
            return m.apply({"params": p}, img).sum()
        g = jax.jit(jax.grad(loss))(stacked)
        g_ref = jax.jit(jax.grad(lambda p: unrolled.apply({"params": p}, img).sum()))(params_unrolled)
        np.testing.assert_allclose(g["blocks"]["out_kernel" if block == "parallel" else "mlp_out_kernel"][1],
                                   g_ref["block_01"]["out_kernel" if block == "parallel" else "mlp_out_kernel"],
                                   atol=1e-5)


def test_dtypes():
    img = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
    f32 = tiny()
    params = perturb(init(f32))
    bf16 = tiny(dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(init(bf16)))  # params stay f32
    out16 = jax.jit(bf16.apply)({"params": params}, img)
    out32 = jax.jit(f32.apply)({"params": params}, img)
    assert out16.dtype == jnp.float32  # logits come back in f32 for the loss
    assert 0 < np.abs(np.asarray(out16) - np.asarray(out32)).max() < 0.1 * np.abs(np.asarray(out32)).max() + 0.1
    lowered = jax.jit(lambda p: bf16.apply({"params": p}, img)).lower(params).as_text()
    assert "bf16" in lowered
    half = tiny(param_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(init(half)))


def test_decode_variant():
    assert vit.decode_variant("22B/14") == dict(width=6144, depth=48, mlp_dim=24576, num_heads=48, patch_size=14)
    assert vit.decode_variant("B/8")["patch_size"] == 8
    for bad in ("X/16", "B", "B/x", ""):
        with pytest.raises(ValueError, match="model.variant"):
            vit.decode_variant(bad)


@pytest.mark.parametrize("features", [48, 16])
def test_bf16_dense_backward_stays_on_bf16_dots(features, monkeypatch):
    # Natively, all three matmuls take bf16 operands. On a CPU without bf16 matmul instructions
    # (VIT22B_BF16_DOTS=float32, vit22b/host_cpu.py) they take the same bf16 values converted to float32, which
    # gives the native result to float32 rounding: a bf16 x bf16 product is exact in float32.
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 32))
    w = jax.random.normal(jax.random.PRNGKey(1), (32, features)) / 6

    def loss(x, w, dtype):
        return jnp.sum(jnp.sin(layers.dense(x, w, dtype).astype(jnp.float32)))

    def dot_operand_dtypes(mode):
        monkeypatch.setenv("VIT22B_BF16_DOTS", mode)
        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, w, jnp.bfloat16)
        dots = [e for e in jaxpr.eqns for e in ([e] + [s for j in jax.extend.core.jaxprs_in_params(e.params)
                                                        for s in j.eqns]) if e.primitive.name == "dot_general"]
        assert len(dots) == 3  # forward, d/dx, d/dw
        return {v.aval.dtype for e in dots for v in e.invars}

    assert dot_operand_dtypes("native") == {jnp.dtype(jnp.bfloat16)}
    g16 = jax.grad(loss, argnums=(0, 1))(x, w, jnp.bfloat16)
    assert dot_operand_dtypes("float32") == {jnp.dtype(jnp.float32)}
    upcast = jax.grad(loss, argnums=(0, 1))(x, w, jnp.bfloat16)
    g32 = jax.grad(loss, argnums=(0, 1))(x, w, jnp.float32)
    for a, u, b in zip(g16, upcast, g32):
        assert a.dtype == u.dtype == jnp.float32  # gradients reach the float32 inputs in their dtype
        np.testing.assert_allclose(a, b, atol=0.03 * float(jnp.abs(b).max()))
        np.testing.assert_allclose(u, a, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()))


@pytest.mark.parametrize("features", [(16, 48), (48, 16)])
def test_float32_dense_gradient_transposes_the_narrower_operand(features):
    # XLA:CPU copies one operand of the kernel gradient's contraction over tokens into a transposed [features,
    # tokens] layout: the first, as dense's backward writes it, which puts the narrower of x and the cotangent
    # first (in the train step, autodiff's formulation copied the cotangent: 8.4M elements instead of 1.2M in the
    # ViT-22B block's [768, 5376] projection). And every dot contracts the last axis of its first operand, the
    # form XLA:CPU gives YNNPACK: folding the final transpose into the product made it contract x's leading axis
    # in Eigen instead (55 GFLOP/s for SwinV2-T's first fc2 on a Zen 3). Values equal autodiff of the plain einsum.
    from vit22b import breakdown
    d, f = features
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, d))
    w = jax.random.normal(jax.random.PRNGKey(1), (d, f)) / 4
    c = jax.random.normal(jax.random.PRNGKey(2), (4, 16, f))

    def grads(fn):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w)) * c), argnums=(0, 1)))

    ours = grads(lambda x, w: layers.dense(x, w, jnp.float32, jax.lax.Precision.HIGHEST))
    plain = grads(lambda x, w: jnp.einsum("...d,df->...f", x, w, precision=jax.lax.Precision.HIGHEST))
    for a, b in zip(ours(x, w), plain(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    comps = breakdown.parse_hlo(ours.lower(x, w).compile().as_text())
    copies = [i["dims"] for body in comps.values() for i in body
              if i["opcode"] == "transpose" or (i["opcode"] == "fusion" and any(
                  j["opcode"] == "transpose" for j in comps.get(i["calls"], [])))]
    assert copies and all(shape[0] == min(d, f) for shape in copies), copies
    dims = {i["name"]: i["dims"] for body in comps.values() for i in body}
    dots = [(dims[i["operands"][0]], i["lhs_contracting"]) for body in comps.values() for i in body
            if i["opcode"] == "dot"]
    assert len(dots) == 3 and all(c == [len(lhs) - 1] for lhs, c in dots), dots


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_gradient_inside_shard_map_sums_over_the_batch_devices(dtype):
    # Inside jax.shard_map the kernel is replicated over the batch axis that x varies on; a custom VJP must sum
    # the kernel gradient over it itself (without, JAX rejects the bwd rule's output type).
    from jax.sharding import PartitionSpec as P
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    w = jax.random.normal(jax.random.PRNGKey(1), (8, 5))

    def grad_w(x, w):
        return jax.grad(lambda w: jnp.sum(jnp.sin(layers.dense(x, w, dtype).astype(jnp.float32))))(w)

    inside = jax.jit(jax.shard_map(grad_w, mesh=mesh, in_specs=(P("data"), P()), out_specs=P()))(x, w)
    np.testing.assert_allclose(inside, grad_w(x, w), rtol=1e-6)
