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
        def unstack(p):
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
        params, ref_grad = unstack(params), unstack(ref_grad)
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
