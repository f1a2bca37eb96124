"""Each ViT-22B switch changes exactly what it claims."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit22b import models
from vit22b.models import vit

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
