import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from vit22b.train import losses, optim


def test_rsqrt_schedule_with_warmup_and_cooldown():
    fn = optim.make_schedule(dict(decay_type="rsqrt", warmup_steps=10, cooldown_steps=20, timescale=5), 100)
    np.testing.assert_allclose(fn(0), 0.1, rtol=1e-6)          # linear warm-up
    np.testing.assert_allclose(fn(9), 1.0, rtol=1e-6)
    np.testing.assert_allclose(fn(30), 1 / np.sqrt(1 + 20 / 5), rtol=1e-6)   # lr / sqrt(1 + (t - w) / tau)
    np.testing.assert_allclose(fn(90), 1 / np.sqrt(1 + 80 / 5) * 10 / 20, rtol=1e-6)  # linear cool-down
    np.testing.assert_allclose(fn(100), 0.0, atol=1e-7)


def test_cosine_and_constant():
    cos = optim.make_schedule(dict(decay_type="cosine", warmup_steps=10, min_mult=0.1), 110)
    np.testing.assert_allclose(cos(9), 1.0, rtol=1e-6)
    np.testing.assert_allclose(cos(60), 0.1 + 0.9 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(cos(110), 0.1, rtol=1e-6)
    const = optim.make_schedule(dict(decay_type="constant", warmup_steps=4), 10)
    np.testing.assert_allclose([const(i) for i in range(6)], [0.25, 0.5, 0.75, 1, 1, 1], rtol=1e-6)


def test_schedule_errors_name_the_field():
    with pytest.raises(ValueError, match="schedule.decay_type"):
        optim.make_schedule(dict(decay_type="linear"), 10)
    with pytest.raises(ValueError, match="schedule.timescal"):
        optim.make_schedule(dict(decay_type="rsqrt", timescal=3), 10)
    with pytest.raises(ValueError, match="exceeds total_steps"):
        optim.make_schedule(dict(decay_type="rsqrt", warmup_steps=8, cooldown_steps=8), 10)


PARAMS = {"head": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
          "blocks": {"in_kernel": jnp.ones((2, 4, 4)), "mlp_bias": jnp.ones((2, 4))}}


def test_wd_multipliers_first_match_wins_and_typos_fail():
    mults = optim.wd_multipliers(PARAMS, [("head/kernel", 100.0), (".*kernel", 1.0)])
    assert mults == {"head": {"kernel": 100.0, "bias": 0.0}, "blocks": {"in_kernel": 1.0, "mlp_bias": 0.0}}
    with pytest.raises(ValueError, match="hed/kernel"):
        optim.wd_multipliers(PARAMS, [("hed/kernel", 100.0)])


def _config(**kw):
    base = dict(total_steps=10, lr=0.5, optimizer="sgd", optimizer_kw={"momentum": 0.0},
                schedule={"decay_type": "constant"}, wd=0.1, wd_mults=[("head/kernel", 100.0), (".*kernel", 1.0)])
    return ConfigDict({**base, **kw})


def test_decoupled_weight_decay_follows_the_adamw_convention():
    tx, lr_fn = optim.make_optimizer(_config(), PARAMS)
    grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    # p <- p - lr * (g + wd * mult * p)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.5 * (0.5 + 0.1 * 100 * 1.0))
    np.testing.assert_allclose(updates["head"]["bias"], -0.5 * 0.5)
    np.testing.assert_allclose(updates["blocks"]["in_kernel"], -0.5 * (0.5 + 0.1 * 1.0))
    assert float(lr_fn(3)) == 0.5


def test_grad_clipping():
    tx, _ = optim.make_optimizer(_config(wd=0.0, grad_clip_norm=1.0), PARAMS)
    grads = jax.tree.map(lambda p: 10 * jnp.ones_like(p), PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    np.testing.assert_allclose(optax.tree.norm(updates), 0.5, rtol=1e-5)  # lr * clipped norm 1


@pytest.mark.parametrize("factor", [10.0, 0.01, 0.0])
def test_clip_by_global_norm_follows_optax(factor):
    """Same rule and state as optax.clip_by_global_norm, above, below and at a zero norm."""
    grads = jax.tree.map(lambda p: factor * jnp.linspace(-1, 1, p.size).reshape(p.shape), PARAMS)
    ours, ref = optim.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    got, state = ours.update(grads, ours.init(PARAMS))
    want, ref_state = ref.update(grads, ref.init(PARAMS))
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)
    assert float(optax.tree.norm(got)) <= 1.0 + 1e-6


def test_adafactor_bv_keeps_bf16_momentum_and_factors_big_matrices():
    params = {"w": jnp.ones((64, 48)), "b": jnp.ones(48)}
    tx, _ = optim.make_optimizer(_config(optimizer="adafactor_bv", optimizer_kw={}, wd=0.0), params)
    state = tx.init(params)
    leaves = jax.tree.leaves(state)
    assert any(x.dtype == jnp.bfloat16 and x.shape == (64, 48) for x in leaves)   # momentum
    assert any(x.shape == (64,) for x in leaves) and any(x.shape == (48,) for x in leaves)  # factored v
    grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
    updates, state = tx.update(grads, state, params)
    # First step: v = g^2 (beta2_0 = 0), u = g / |g| = 1, momentum EMA without debias gives 0.1 * u.
    np.testing.assert_allclose(updates["w"], -0.5 * 0.1, rtol=2e-2)


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor_bv"])
def test_each_optimizer_minimises_a_quadratic(name):
    params = {"w": jnp.full((40, 40), 3.0)}
    tx, _ = optim.make_optimizer(_config(optimizer=name, optimizer_kw={}, lr=0.05, wd=0.0), params)
    state = tx.init(params)
    for _ in range(100):
        grads = jax.grad(lambda p: (p["w"] ** 2).sum())(params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert float(jnp.abs(params["w"]).max()) < 1.0


def test_unknown_optimizer_and_option():
    with pytest.raises(ValueError, match="optimizer: unknown"):
        optim.base_optimizer("lamb", {})
    with pytest.raises(ValueError, match="optimizer_kw.beta1"):
        optim.base_optimizer("adamw", {"beta1": 0.9})


def test_losses_and_label_smoothing():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    labels = jnp.array([0])
    ref = -jax.nn.log_softmax(logits)[0]
    np.testing.assert_allclose(losses.per_example_loss("softmax_xent", logits, labels), ref[0], rtol=1e-6)
    smoothed = losses.per_example_loss("softmax_xent", logits, labels, label_smoothing=0.3)
    np.testing.assert_allclose(smoothed, (0.7 + 0.1) * ref[0] + 0.1 * ref[1] + 0.1 * ref[2], rtol=1e-6)
    multi = jnp.array([[1.0, 0.0, 1.0]])
    sig = losses.per_example_loss("sigmoid_xent", logits, multi)
    expected = -(np.log(jax.nn.sigmoid(2.0)) + np.log(1 - jax.nn.sigmoid(0.0)) + np.log(jax.nn.sigmoid(-1.0)))
    np.testing.assert_allclose(sig, expected, rtol=1e-5)
    assert bool(losses.top1_correct(logits, multi)[0]) and not bool(losses.top1_correct(logits, jnp.array([1]))[0])


def _ids_as_state_dict(model_name, cfg, image_size, to_state_dict):
    """Our layer ids, each broadcast over its parameter, written out under the official / timm names (the ids are
    constant per tensor, so the converters' transposes keep them)."""
    import flax.linen as nn

    from vit22b import models
    module = models.build(model_name, cfg, 1000, image_size)
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3))))
    ids, n = optim.layer_ids(shapes["params"], model_name)
    tree = jax.tree.map(lambda i, s: np.broadcast_to(np.asarray(i, np.float32), s.shape), ids, shapes["params"])
    return to_state_dict(module, tree), n


def test_layer_decay_groups_swinv2_tiny_as_the_official_code():
    """Against the official get_swin_layer on the official parameter names (SimMIM's fine-tuning grouping)."""
    from vit22b.models import convert
    depths = (2, 2, 6, 2)
    sd, n = _ids_as_state_dict("swinv2", {"variant": "T"}, 256,
                               lambda m, p: convert.swinv2_to_state_dict(m, p, "official"))

    def get_swin_layer(name):  # the official rule, written from its description
        if name.startswith("patch_embed"):
            return 0
        if name.startswith("layers"):
            stage, part = int(name.split(".")[1]), name.split(".")[3]
            if part in ("reduction", "norm"):
                return sum(depths[:stage + 1])
            return sum(depths[:stage]) + int(part) + 1
        return sum(depths) + 1

    assert n == 12 and len(sd) > 100
    for name, value in sd.items():
        assert np.all(value == get_swin_layer(name)), name


def test_layer_decay_groups_vit_b16_as_beit_and_scales_the_updates():
    from vit22b.models import vit_weights
    sd, n = _ids_as_state_dict("vit", {"variant": "B/16", "block": "sequential", "qkv_bias": True, "norm": "layernorm",
                                       "head": "token", "qk_norm": False}, 224, vit_weights.to_timm)
    sd = sd[0]

    def beit_layer(name):  # BEiT's get_num_layer_for_vit
        if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks"):
            return int(name.split(".")[1]) + 1
        return 13

    assert n == 12
    for name, value in sd.items():
        assert np.all(value == beit_layer(name)), name
    # decay^(n + 1 - layer) times the update, once: block 11 at 0.75, the head at 1, the embedding at 0.75^13
    params = {"embedding": {"kernel": jnp.ones((2,))}, "blocks": {"w": jnp.ones((12, 2))}, "head": {"kernel": jnp.ones(2)}}
    tx = optim.scale_by_layer_decay(0.75, params, "vit")
    updates, _ = tx.update(params, tx.init(params))
    np.testing.assert_allclose(updates["blocks"]["w"][:, 0], 0.75 ** (12 - np.arange(12)), rtol=1e-6)
    np.testing.assert_allclose([updates["head"]["kernel"][0], updates["embedding"]["kernel"][0]], [1, 0.75 ** 13],
                               rtol=1e-6)
