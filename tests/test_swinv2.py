"""Swin V2 without PyTorch: parameter counts, configuration errors, the memory techniques, and training."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import config, override
from vit22b import config_check, models
from vit22b.tools.memory_report import train_step_memory


def count(variant, img=256, window=8, classes=1000):
    m = models.build("swinv2", dict(variant=variant, window_size=window), classes, img)
    shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, img, img, 3))))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))), shapes


@pytest.mark.parametrize("variant,expected", [("T", 28_347_154), ("S", 49_728_418), ("B", 87_918_816),
                                              ("L", 196_739_932)])
def test_official_parameter_counts(variant, expected):
    assert count(variant)[0] == expected
    assert count(variant, window=16)[0] == expected  # independent of the window (log-spaced CPB)


def test_huge_and_giant_from_the_paper():
    n_h, _ = count("H", img=224, window=7)
    n_g, shapes = count("G", img=224, window=7)
    assert abs(n_h - 658e6) / 658e6 < 0.01 and abs(n_g - 3.0e9) / 3.0e9 < 0.01  # paper: 658M and 3.0B
    stage2 = nn.meta.unbox(shapes["params"])["layers_2_blocks"]  # 42 blocks as 7 scanned groups of 6
    assert stage2["blocks_5"]["norm3"]["scale"].shape == (7, 2048)
    assert "norm3" not in stage2["blocks_4"]


def _tiny(**kw):
    base = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4, drop_path_rate=0.0)
    base.update(kw)
    return models.build("swinv2", base, 5, 64)


def _perturb(params):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


V1 = dict(norm_position="pre", attention="dot", position_bias="table")


def _unstack(p):
    """Scanned stages' [groups, ...] parameters (or sown values) as the unscanned model's per-block entries."""
    out = {}
    for k, v in p.items():
        if k.endswith("_blocks"):
            n = jax.tree.leaves(v)[0].shape[0]
            for g in range(n):
                for b, sub in v.items():
                    out[f"{k}_{g * len(v) + int(b.split('_')[1])}"] = jax.tree.map(lambda a: a[g], sub)
        else:
            out[k] = v
    return out


def test_init_makes_every_block_the_identity():
    m = _tiny(scan=False)
    params = nn.meta.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"])
    blk = params["layers_0_blocks_1"]
    assert not np.any(blk["norm1"]["scale"]) and not np.any(blk["norm2"]["scale"])
    np.testing.assert_allclose(blk["attn"]["logit_scale"], np.log(10.0), rtol=1e-6)
    assert "k_bias" not in blk["attn"] and "bias" not in blk["attn"]["qkv"]
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))
    feats = jax.jit(lambda p: m.apply({"params": p}, x, return_features=True))(params)
    assert [f.shape for f in feats] == [(2, 16, 16, 16), (2, 8, 8, 32), (2, 4, 4, 64), (2, 2, 2, 128)]
    # Identity blocks: stage 0's output is the normalised patch embedding itself.
    stem = nn.LayerNorm(epsilon=1e-5).apply({"params": params["patch_embed_norm"]}, jax.lax.conv_general_dilated(
        x, params["patch_embed_proj"]["kernel"], (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision="highest") + params["patch_embed_proj"]["bias"])
    np.testing.assert_allclose(feats[0], stem, atol=1e-5)


X = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))


def _loss(m, p):
    return (m.apply({"params": p}, X) ** 2).sum()


@pytest.fixture(scope="module")
def reference():
    m = _tiny()
    params = _perturb(nn.meta.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), X)["params"]))
    return params, *jax.jit(jax.value_and_grad(lambda p: _loss(m, p)))(params)


@pytest.mark.parametrize("overrides", [{"remat_policy": "full", "attn_chunks": 4}, {"scan": False},
                                       {"remat_policy": "dots", "attn_chunks": 2}])
def test_memory_switches_leave_outputs_and_gradients_unchanged(overrides, reference):
    params, ref_val, ref_grad = reference
    m = _tiny(**overrides)
    if overrides.get("scan") is False:  # unstack the scanned groups into per-block parameters
        params, ref_grad = _unstack(params), _unstack(ref_grad)
    val, grad = jax.jit(jax.value_and_grad(lambda p: _loss(m, p)))(params)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())))


def test_remat_and_sequential_attention_lower_compiled_peak_memory():
    """XLA's memory analysis of the whole train step (compile only): each technique lowers the temporaries."""
    def temp(**kw):
        c = config("swinv2_imagenet", "runlocal")
        c.input.image_size = 64
        # Many heads per stage: the attention matrices, which sequential attention splits, dominate the temporaries.
        # Two stages (one patch merging): compile time grows with the number of stages, not with their depth.
        c.model.update(patch_size=2, window_size=8, embed_dim=16, depths=(2, 6), num_heads=(8, 8),
                       pretrained_window_sizes=(0, 0), **kw)
        return train_step_memory(c, batch_size=8)["temp"]

    base, remat, chunked = temp(), temp(remat_policy="full"), temp(attn_chunks=4)
    print(f"temp bytes: base {base / 2**20:.1f} MiB, remat {remat / 2**20:.1f} MiB, "
          f"sequential attention {chunked / 2**20:.1f} MiB")
    assert remat < 0.8 * base  # 138 -> 93 MiB
    assert chunked < 0.8 * base  # 138 -> 82 MiB


@pytest.mark.parametrize("overrides,message", [
    ({"input.image_size": 100}, "config.input.image_size: image size 100 is not divisible by patch_size * 2^3"),
    ({"input.image_size": 96, "model.window_size": 5}, "config.model.window_size: stage 0 is 48x48 tokens"),
    ({"model.variant": "XL"}, "config.model.variant: unknown Swin V2 variant 'XL'"),
    ({"model.num_heads": (2, 5, 4, 8)}, "config.model.num_heads: stage 1 width 64 is not divisible by 5 heads"),
    ({"model.attn_chunks": 0, "model.remat_policy": "half"}, "config.model.remat_policy"),
    ({"model.attn_chunks": 3}, "config.model.attn_chunks: 3 chunks do not divide the 16 windows of stage 0"),
    ({"model.attention": "flash"}, "config.model.attention: 'flash' is not one of ('cosine', 'dot')"),
    ({"model.norm_position": "sandwich"}, "config.model.norm_position: 'sandwich' is not one of ('post', 'pre')"),
    ({"model.position_bias": "table", "model.pretrained_window_sizes": (8, 8, 8, 4)},
     "config.model.pretrained_window_sizes: (8, 8, 8, 4) rescales the log-spaced coordinates"),
])
def test_bad_swin_configs_fail_before_compilation(overrides, message):
    c = override(config("swinv2_imagenet", "runlocal"), overrides)
    with pytest.raises(config_check.ConfigError) as e:
        config_check.validate(c)
    assert message in str(e.value)


def test_stochastic_depth_is_per_sample_and_off_at_eval():
    m = _tiny(drop_path_rate=0.5)
    params = _perturb(nn.meta.unbox(jax.jit(m.init)(jax.random.PRNGKey(0), X)["params"]))
    train_fn = jax.jit(lambda p, r: m.apply({"params": p}, X, train=True, rngs={"dropout": r}))
    a, b = train_fn(params, jax.random.PRNGKey(1)), train_fn(params, jax.random.PRNGKey(2))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4  # different rngs drop different paths
    e1 = jax.jit(lambda p: m.apply({"params": p}, X))(params)
    e2 = jax.jit(lambda p: _tiny(drop_path_rate=0.0).apply({"params": p}, X))(params)
    np.testing.assert_allclose(e1, e2, atol=1e-6)  # evaluation never drops


def _random_params(m, x, seed=0):
    """Parameters without compiling an init: every path exercised (block norms near 1, not V2's zeros; logit
    scales near log(10), one head per layer past the clamp at log(100))."""
    shapes = nn.meta.unbox(jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, mutable=["params"]))["params"])
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = jax.tree_util.keystr(path), leaf.shape
        if name.endswith("['logit_scale']"):
            v = np.log(10.0) + 0.5 * rng.standard_normal(shape)
            v[..., 0, 0, 0] = np.log(100.0) + 0.5
            return v.astype(np.float32)
        if name.endswith("['scale']"):
            return (1 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        if name.endswith("['kernel']"):
            fan_in = np.prod(shape[:-1]) if len(shape) == 4 else shape[-2]  # the patch conv, else [.., in, out]
            return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        return (0.3 * rng.standard_normal(shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def _direct_monitors(params, inter, mode, heads):
    """The monitors of each unscanned block from its captured intermediates, in float64 numpy: the logits
    rebuilt from the qkv projection, the branches from the block's residual algebra out = x + attn + mlp."""
    from vit22b.models import swinv2
    att, res = {}, {}
    x = np.asarray(inter["patch_embed_norm"]["__call__"][0], np.float64)
    for name in sorted(k for k in params if "_blocks_" in k):
        stage, j = int(name.split("_")[1]), int(name.split("_")[3])
        if j == 0 and stage:
            x = np.asarray(inter[f"layers_{stage - 1}_downsample"]["__call__"][0], np.float64)
        p, i = params[name]["attn"], inter[name]
        out = np.asarray(i["__call__"][0], np.float64)
        b, hh, ww, c = x.shape
        h, d = heads[stage], c // heads[stage]
        window, shift = swinv2.effective_window((hh, ww), 4, 2 if j % 2 else 0)
        n = window * window
        t = np.asarray(i["attn"]["qkv"]["__call__"][0], np.float64)
        if mode == "v2":
            t = t + np.concatenate([p["q_bias"], np.zeros(c), p["v_bias"]])
        t = t.reshape(-1, n, 3, h, d)
        q, k = t[:, :, 0], t[:, :, 1]
        index = swinv2.relative_position_index(window).reshape(-1)
        if mode == "v2":
            unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)  # noqa: E731
            ls = np.exp(np.minimum(np.asarray(p["logit_scale"], np.float64).reshape(h), np.log(100.0)))
            z = np.einsum("bqhd,bkhd->bhqk", unit(q), unit(k)) * ls[:, None, None]
            table = 16 / (1 + np.exp(-np.asarray(i["attn"]["cpb_mlp_2"]["__call__"][0], np.float64).reshape(-1, h)))
            att[(name, "logit_scale_max")] = ls.max()
        else:
            z = np.einsum("bqhd,bkhd->bhqk", q, k) * d ** -0.5
            table = np.asarray(p["relative_position_bias_table"], np.float64)
        z = z + table[index].reshape(n, n, h).transpose(2, 0, 1)
        allowed = np.ones(z.shape, bool)
        if shift:
            mask = swinv2.shift_mask(hh, ww, window, shift)
            nw = mask.shape[0]
            z = (z.reshape(b, nw, h, n, n) + mask[:, None]).reshape(z.shape)
            allowed = np.broadcast_to((mask == 0)[None, :, None], (b, nw, h, n, n)).reshape(z.shape)
        att[(name, "max_attn_logit")] = z[allowed].max()
        zs = z - z.max(-1, keepdims=True)
        prob = np.exp(zs) / np.exp(zs).sum(-1, keepdims=True)
        att[(name, "attn_entropy")] = -(prob * np.log(prob)).sum(-1).mean()
        if mode == "v2":
            a, y = (np.asarray(i[m]["__call__"][0], np.float64) for m in ("norm1", "norm2"))
        else:
            y = np.asarray(i["mlp"]["__call__"][0], np.float64)
            a = out - x - y
        for key, v in (("residual_rms", out), ("attn_branch_rms", a), ("mlp_branch_rms", y)):
            res[(name, key)] = np.sqrt(np.mean(v ** 2))
        x = out
    return att, res


@pytest.mark.parametrize("mode", ["v2", "v1"])
def test_monitors_equal_a_direct_computation(mode):
    """Sown monitors (vit22b/models/monitors.py) against float64 numpy from the captured intermediates, unscanned;
    scanned stages (two groups in stage 0, under remat and attn_chunks) stack the same values over their groups
    and give the same logits; a normal apply returns the logits alone."""
    from vit22b.models import monitors
    base = dict(patch_size=2, embed_dim=16, depths=(4, 2), num_heads=(2, 4), window_size=4, drop_path_rate=0.0,
                pretrained_window_sizes=(0, 0), **(V1 if mode == "v1" else {}))
    cols = [monitors.ATTENTION, monitors.RESIDUAL]
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 32, 32, 3))
    scanned = models.build("swinv2", dict(base, remat_policy="full", attn_chunks=2), 5, 32)
    params = _random_params(scanned, x)
    flat = _unstack(params)
    unscanned = models.build("swinv2", dict(base, scan=False), 5, 32)
    logits, tree = jax.jit(lambda p: unscanned.apply({"params": p}, x, mutable=cols + ["intermediates"],
                                                     capture_intermediates=True))(flat)
    att, res = _direct_monitors(flat, tree["intermediates"], mode, base["num_heads"])
    sown = {col: {(blk, name): np.asarray(v[0]) for blk, d in tree[col].items()
                  for name, v in (d["attn"] if col == monitors.ATTENTION else d).items()} for col in cols}
    assert set(sown[monitors.ATTENTION]) == set(att) and set(sown[monitors.RESIDUAL]) == set(res)
    for got, want in ((sown[monitors.ATTENTION], att), (sown[monitors.RESIDUAL], res)):
        for key, v in want.items():
            np.testing.assert_allclose(got[key], v, rtol=2e-5, atol=1e-5, err_msg=str(key))
            assert got[key].shape == () and got[key].dtype == np.float32
    assert (np.asarray([v for (_, s), v in att.items() if s == "max_attn_logit"]) > 0).all()

    s_logits, s_tree = jax.jit(lambda p: scanned.apply({"params": p}, x, mutable=cols))(params)
    np.testing.assert_allclose(s_logits, logits, atol=1e-5)
    assert s_tree[monitors.RESIDUAL]["layers_0_blocks"]["blocks_1"]["residual_rms"][0].shape == (2,)  # 2 groups
    for col in cols:
        per_block = _unstack(dict(s_tree[col]))
        assert jax.tree.structure(per_block) == jax.tree.structure(tree[col])
        for a, b in zip(jax.tree.leaves(per_block), jax.tree.leaves(tree[col])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    plain = jax.eval_shape(lambda p: scanned.apply({"params": p}, x), params)  # nothing mutable: logits alone
    assert isinstance(plain, jax.ShapeDtypeStruct) and plain.shape == (2, 5)


def test_v1_switches_make_v1_parameters():
    """Swin V1 block: qkv bias, a (2W-1)^2 x heads bias table at std 0.02, block norms at one, no q/v bias or
    logit scale; the V1 merge normalises the 4C concatenation. V2's defaults leave its parameters as they were."""
    from vit22b.models import swinv2
    block = swinv2.SwinBlock(num_heads=2, window=4, shift=2, **V1)
    variables = jax.jit(block.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 16)))
    assert list(variables) == ["params"]  # init computes no monitors, though it makes every collection mutable
    p = nn.meta.unbox(variables["params"])
    assert sorted(p["attn"]) == ["proj", "qkv", "relative_position_bias_table"] and "bias" in p["attn"]["qkv"]
    table = p["attn"]["relative_position_bias_table"]
    assert table.shape == (49, 2) and 0.01 < float(table.std()) < 0.03
    assert all(np.all(p[n]["scale"] == 1) for n in ("norm1", "norm2"))
    merge = jax.eval_shape(lambda: swinv2.PatchMerging(norm_position="pre").init(
        jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 16))))["params"]
    assert nn.meta.unbox(merge)["norm"]["scale"].shape == (64,)
    v2 = nn.meta.unbox(jax.eval_shape(lambda: swinv2.WindowAttention(16, 2, 4).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4, 16, 16))))["params"])
    assert sorted(v2) == ["cpb_mlp_0", "cpb_mlp_2", "logit_scale", "proj", "q_bias", "qkv", "v_bias"]
