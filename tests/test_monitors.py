"""Instability monitors against direct computations, and the z-loss against its formula."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.special import logsumexp, xlogy

from test_vit import _gelu, _rms, perturb
from vit22b import models
from vit22b.models import monitors as model_monitors
from vit22b.models import vit
from vit22b.train import losses, monitors

ALL = list(model_monitors.COLLECTIONS)


def np_stats(z, allowed=None):
    """Max logit over allowed entries and mean entropy of softmax rows, from float64 logits [..., Lq, Lk]."""
    p = np.exp(z - logsumexp(z, axis=-1, keepdims=True))
    entropy = -xlogy(p, p).sum(-1)
    return (z if allowed is None else np.where(allowed, z, -np.inf)).max(), entropy.mean()


def test_attention_stats_with_grouped_bias_and_shift_mask_match_numpy():
    rng = np.random.default_rng(0)
    b, g, length, h, d = 4, 2, 6, 3, 8
    q, k = rng.normal(size=(2, b, length, h, d)) * 2
    bias = rng.normal(size=(g, h, length, length))
    mask = np.where(rng.uniform(size=(g, length, length)) < 0.3, -100.0, 0.0)
    got = model_monitors.attention_stats(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), scale=0.5,
                                         bias=jnp.asarray(bias, jnp.float32), mask=jnp.asarray(mask, jnp.float32))
    z = np.einsum("bqhd,bkhd->bhqk", q, k) * 0.5
    z = z + bias[np.arange(b) % g] + mask[np.arange(b) % g][:, None]  # element i takes group i % G
    allowed = np.broadcast_to((mask[np.arange(b) % g] == 0)[:, None], z.shape)
    np.testing.assert_allclose(got, np_stats(z, allowed), rtol=1e-5)


def test_entropy_stays_exact_when_logits_run_away():
    """Logits of 1e7, as a ViT without QK-norm reached at lr 0.3: nearly one-hot rows, entropy >= 0 and tiny."""
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 2, 5, 1, 4)) * 2e3
    max_logit, entropy = model_monitors.attention_stats(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                                        scale=1.0)
    z = np.einsum("bqhd,bkhd->bhqk", q, k)
    assert abs(max_logit / z.max() - 1) < 1e-5 and z.max() > 1e6
    np.testing.assert_allclose(entropy, np_stats(z)[1], atol=1e-6)
    assert 0 <= entropy < 1e-3


def test_parallel_block_monitors_equal_the_written_formula():
    d, m, h = 32, 48, 4
    block = vit.ParallelBlock(num_heads=h, mlp_dim=m)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, d))
    params = perturb(nn.meta.unbox(block.init(jax.random.PRNGKey(1), x)["params"]))
    out, sown = block.apply({"params": params}, x, mutable=ALL)
    plain, _ = block.apply({"params": params}, x)
    np.testing.assert_array_equal(out[0], plain)  # monitoring changes nothing computed

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    dh = d // h
    z = (_rms(np.asarray(x, np.float64), p["norm"]["scale"]) @ p["in_kernel"]).reshape(2, 5, h, -1)
    q, k, v = (z[..., i * dh:(i + 1) * dh] for i in range(3))
    q, k = _rms(q, p["q_norm"]["scale"]), _rms(k, p["k_norm"]["scale"])
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
    w = np.exp(logits - logsumexp(logits, -1, keepdims=True))
    attn = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(2, 5, d)
    hidden = _gelu(z[..., 3 * dh:] + p["mlp_bias"].reshape(h, m // h)).reshape(2, 5, m)
    rows = p["out_kernel"].reshape(h, dh + m // h, d)  # head-major: head j's dh attention rows, then its MLP rows
    attn_branch = attn @ rows[:, :dh].reshape(d, d)
    mlp_branch = hidden @ rows[:, dh:].reshape(m, d)
    residual = np.asarray(x, np.float64) + attn_branch + mlp_branch + p["out_bias"]

    def rms(a):
        return np.sqrt(np.mean(a ** 2))

    max_logit, entropy = np_stats(logits)
    att, res = sown[model_monitors.ATTENTION], sown[model_monitors.RESIDUAL]
    np.testing.assert_allclose(att["max_attn_logit"][0], max_logit, rtol=1e-4)
    np.testing.assert_allclose(att["attn_entropy"][0], entropy, rtol=1e-4)
    np.testing.assert_allclose(att["qk_gain"][0], np.abs(p["q_norm"]["scale"] * p["k_norm"]["scale"]).max(), rtol=1e-6)
    assert max_logit <= np.sqrt(dh) * att["qk_gain"][0] * (1 + 1e-6)  # the bound QK-norm puts on the logits
    np.testing.assert_allclose(res["attn_branch_rms"][0], rms(attn_branch), rtol=1e-4)
    np.testing.assert_allclose(res["mlp_branch_rms"][0], rms(mlp_branch), rtol=1e-4)
    np.testing.assert_allclose(res["residual_rms"][0], rms(residual), rtol=1e-4)


def tiny_vit(**kw):
    cfg = dict(width=32, depth=3, mlp_dim=64, num_heads=4, patch_size=2, scan=False) | kw
    return models.build("vit", cfg, num_classes=5, image_size=8)


def monitored(model, params, images):
    c = ml_collections.ConfigDict({"monitors": list(monitors.DEFAULT), "z_loss": 1e-4})
    batch = {"image": images, "mask": jnp.ones(images.shape[0])}
    return monitors.flatten(jax.device_get(monitors.compute(model, params, batch, c, monitors.DEFAULT)))


def test_classic_vit_residual_rms_is_each_block_output_and_names_follow_the_blocks():
    model = tiny_vit(block="sequential", qk_norm=True, qkv_bias=True, norm="layernorm", head="token")
    images = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 3))
    params = perturb(nn.meta.unbox(model.init(jax.random.PRNGKey(0), images)["params"]))
    got = monitored(model, params, images)
    _, inter = model.apply({"params": params}, images, capture_intermediates=True)
    outputs = [np.asarray(inter["intermediates"][f"block_{i:02d}"]["__call__"][0][0], np.float64) for i in range(3)]
    rms = [np.sqrt(np.mean(o ** 2)) for o in outputs]
    for i in range(3):
        np.testing.assert_allclose(got[f"monitor/residual_rms/block_{i:02d}"], rms[i], rtol=1e-5)
    np.testing.assert_allclose(got["monitor/residual_rms_ratio"], max(rms) / min(rms), rtol=1e-5)
    assert got["monitor/max_attn_logit"] == max(got[f"monitor/max_attn_logit/block_{i:02d}"] for i in range(3))
    assert got["monitor/attn_entropy_min"] == min(got[f"monitor/attn_entropy/block_{i:02d}"] for i in range(3))
    # The classifier's logits: log Z, the norm and the z-loss term from the same logits.
    logits = np.asarray(model.apply({"params": params}, images), np.float64)
    log_z = logsumexp(logits, axis=-1)
    np.testing.assert_allclose(got["monitor/logits/log_z_mean"], log_z.mean(), rtol=1e-5)
    np.testing.assert_allclose(got["monitor/logits/log_z_min"], log_z.min(), rtol=1e-5)
    np.testing.assert_allclose(got["monitor/logits/norm"], np.linalg.norm(logits, axis=-1).mean(), rtol=1e-5)
    np.testing.assert_allclose(got["monitor/logits/z_loss"], 1e-4 * (log_z ** 2).mean(), rtol=1e-5)


def test_scanned_and_remat_design_vit_reports_the_same_blocks_as_unrolled():
    images = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3))
    unrolled = tiny_vit()
    params = perturb(nn.meta.unbox(unrolled.init(jax.random.PRNGKey(0), images)["params"]))
    stacked = dict(params, blocks=jax.tree.map(lambda *a: jnp.stack(a), *[params.pop(f"block_{i:02d}")
                                                                        for i in range(3)]))
    want = monitored(unrolled, params | {f"block_{i:02d}": jax.tree.map(lambda a: a[i], stacked["blocks"])
                                         for i in range(3)}, images)
    got = monitored(tiny_vit(scan=True, remat_policy="full"), stacked, images)
    assert set(got) == set(want)
    assert {"monitor/max_attn_logit/map_head", "monitor/residual_rms/block_02", "monitor/attn_branch_rms/block_00",
            "monitor/mlp_branch_rms/block_01", "monitor/attn_entropy/block_02"} <= set(got)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    # The summaries are over the encoder blocks: the MAP head (no QK-norm there) is reported on its own.
    assert got["monitor/max_attn_logit"] == max(got[f"monitor/max_attn_logit/block_{i:02d}"] for i in range(3))
    assert got["monitor/qk_gain"] == max(got[f"monitor/qk_gain/block_{i:02d}"] for i in range(3))


def test_z_loss_value_and_gradient_match_the_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 7)) * 3
    labels = rng.integers(0, 7, 4)
    z = 1e-2

    def total(lg):
        return losses.per_example_loss("softmax_xent", lg, jnp.asarray(labels), z_loss=z).sum()

    value, grad = jax.value_and_grad(total)(jnp.asarray(logits))
    lse = logsumexp(logits, axis=-1)
    softmax = np.exp(logits - lse[:, None])
    onehot = np.eye(7)[labels]
    np.testing.assert_allclose(value, (lse - logits[np.arange(4), labels] + z * lse ** 2).sum(), rtol=1e-5)
    # d/dy [CE + z (log Z)^2] = softmax - onehot + 2 z log Z softmax
    np.testing.assert_allclose(grad, softmax - onehot + 2 * z * lse[:, None] * softmax, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("monitors", ["attention", "entropy"], "config.monitors: unknown monitor 'entropy'"),
    ("z_loss", -1.0, "config.z_loss: must be a coefficient >= 0"),
])
def test_bad_monitor_and_z_loss_settings_name_the_field(field, value, message):
    from conftest import config
    from vit22b import config_check
    c = config("vit22b_digits")
    c[field] = value
    with pytest.raises(config_check.ConfigError, match=message):
        config_check.validate(c)
    c = config("vit22b_digits", loss="sigmoid_xent", z_loss=1e-4)
    with pytest.raises(config_check.ConfigError, match="config.z_loss: applies to loss='softmax_xent'"):
        config_check.validate(c)
