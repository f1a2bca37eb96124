"""The one attention entry point (vit22b/models/attention.py): the 'xla' kernel equals a plain einsum/softmax,
values and gradients, with and without Swin V2's grouped bias; every model calls it; kernels are chosen and
refused as documented, before anything is traced."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit22b import models
from vit22b.models import attention

R = np.random.default_rng(0)


def rand(*shape):
    return jnp.asarray(R.standard_normal(shape), jnp.float32)


def einsum_attention(q, k, v, bias, scale):
    """softmax(scale q k^T + bias[i % G]) v, written out."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        logits = logits + jnp.tile(bias, (q.shape[0] // bias.shape[0], 1, 1, 1))
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)


def assert_values_and_gradients_equal(ours, ref, args, tol=1e-5):
    g = rand(*ref(*args).shape)
    np.testing.assert_allclose(ours(*args), ref(*args), rtol=tol, atol=tol)
    argnums = tuple(range(len(args)))
    got = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a) * g), argnums))(*args)
    want = jax.grad(lambda *a: jnp.sum(ref(*a) * g), argnums)(*args)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=tol * float(jnp.abs(b).max()))


@pytest.mark.parametrize("groups", [None, 1, 3, 6])  # None: no bias; 3: Swin's windows; 6: one per element
def test_xla_kernel_equals_einsum_softmax(groups):
    q, k, v = rand(6, 5, 2, 8), rand(6, 7, 2, 8), rand(6, 7, 2, 8)
    bias = None if groups is None else rand(groups, 2, 5, 7)
    args = (q, k, v) if bias is None else (q, k, v, bias)
    unpack = lambda a: (a + (None,))[:4]  # noqa: E731
    assert_values_and_gradients_equal(
        lambda *a: attention.attention(*unpack(a)[:3], bias=unpack(a)[3], scale=0.3, impl="xla"),
        lambda *a: einsum_attention(*unpack(a), 0.3), args)
    # The default scale is 1 / sqrt(head_dim); 'auto' on this CPU is 'xla'.
    np.testing.assert_allclose(attention.attention(q, k, v, bias=bias, impl="auto"),
                               einsum_attention(q, k, v, bias, 8 ** -0.5), rtol=1e-5, atol=1e-5)


def test_cudnn_layout_folds_bias_groups_into_heads_exactly():
    """cuDNN takes a bias per batch element or shared; the entry point hands it Swin's per-window bias as
    [1, G * heads, ...] over windows moved into the heads. The folding is checked here through the same call
    with the XLA kernel (cuDNN itself needs an NVIDIA GPU)."""
    q, k, v, bias = rand(6, 4, 2, 8), rand(6, 4, 2, 8), rand(6, 4, 2, 8), rand(3, 2, 4, 4)
    assert_values_and_gradients_equal(
        lambda q, k, v, b: attention.fused_grouped_bias(q, k, v, b, 0.5, "xla"),
        lambda q, k, v, b: einsum_attention(q, k, v, b, 0.5), (q, k, v, bias))


def test_swin_window_attention_goes_through_the_entry_point_with_bias_and_mask(monkeypatch):
    """Swin V2's cosine attention as the entry point receives it: unit q times the head's scale, unit k, scale 1,
    and the position bias plus the shift mask as one bias per window. The formula is written out here, from
    the parameters, against the module's output."""
    from vit22b.models import swinv2
    calls = []
    real = attention.attention
    monkeypatch.setattr(attention, "attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    from vit22b.models import layers
    layers.ops.cache_clear()
    try:
        m = swinv2.WindowAttention(dim=16, num_heads=2, window=4, ops=layers.ops())
        x = rand(2, 4, 16, 16)  # 2 images x 4 windows of 16 tokens
        mask = jnp.asarray(swinv2.shift_mask(8, 8, 4, 2))
        params = nn.meta.unbox(m.init(jax.random.PRNGKey(0), x, mask))["params"]
        params = jax.tree.map(lambda p: p + 0.2 * rand(*p.shape), params)
        out = m.apply({"params": params}, x, mask)
    finally:
        layers.ops.cache_clear()
    assert len(calls) == 2 and calls[1]["bias"].shape == (4, 2, 16, 16) and calls[1]["scale"] == 1.0  # init, apply

    t = x @ params["qkv"]["kernel"] + jnp.concatenate([params["q_bias"], jnp.zeros(16), params["v_bias"]])
    q, k, v = (u.reshape(8, 16, 2, 8) for u in jnp.split(t.reshape(8, 16, 48), 3, -1))
    unit = lambda u: u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    scale = jnp.exp(jnp.minimum(params["logit_scale"].reshape(2), np.log(100.0)))
    table = jnp.asarray(swinv2.relative_coords_table(4))
    hidden = jax.nn.relu(table @ params["cpb_mlp_0"]["kernel"] + params["cpb_mlp_0"]["bias"])
    rpb = (hidden @ params["cpb_mlp_2"]["kernel"]).reshape(-1, 2)[swinv2.relative_position_index(4).reshape(-1)]
    rpb = 16 * jax.nn.sigmoid(rpb.reshape(16, 16, 2).transpose(2, 0, 1))
    logits = jnp.einsum("bqhd,bkhd->bhqk", unit(q), unit(k)) * scale[None, :, None, None]
    logits = logits + jnp.tile(rpb[None] + mask[:, None], (2, 1, 1, 1))
    ref = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(2, 4, 16, 16)
    ref = ref @ params["proj"]["kernel"] + params["proj"]["bias"]
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("family,cfg,size,expected", [
    ("vit", dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4, scan=False), 16, 3),  # blocks + MAP
    ("vit", dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4, scan=False, block="sequential",
                 head="token"), 16, 2),
    ("swinv2", dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, scan=False,
                    pretrained_window_sizes=(0, 0)), 32, 4),
])
def test_every_model_attention_goes_through_the_entry_point(family, cfg, size, expected, monkeypatch):
    calls = []
    real = attention.attention
    monkeypatch.setattr(attention, "attention", lambda *a, **kw: calls.append(kw.get("impl")) or real(*a, **kw))
    from vit22b.models import layers
    layers.ops.cache_clear()
    try:
        model = models.build(family, dict(cfg, attention_impl="xla"), 5, size)
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
    finally:
        layers.ops.cache_clear()
    assert calls == ["xla"] * expected


@pytest.mark.parametrize("family,cfg,size", [
    ("vit", dict(variant="B/16"), 224),
    ("swinv2", dict(variant="T"), 256),
])
def test_cudnn_asked_for_where_it_cannot_run_is_a_config_error(family, cfg, size):
    with pytest.raises(ValueError, match=r"model.attention_impl: 'cudnn' cannot run here: cuDNN attention needs "
                                         r"an NVIDIA GPU; the target here is cpu"):
        models.resolve(family, dict(cfg, attention_impl="cudnn", dtype="bfloat16"), 10, size)
    with pytest.raises(ValueError, match=r"model.attention_impl: 'flash' is not one of"):
        models.resolve(family, dict(cfg, attention_impl="flash"), 10, size)
    with pytest.raises(ValueError, match=r"model.impl: unknown CPU kernel 'fast'"):
        models.resolve(family, dict(cfg, impl="cpu:dense,fast"), 10, size)
    with pytest.raises(ValueError, match=r"model.impl: 'tpu' is not 'reference', 'cpu'"):
        models.resolve(family, dict(cfg, impl="tpu"), 10, size)


def test_cudnn_constraints(monkeypatch):
    """The reasons 'auto' falls back to XLA on an NVIDIA GPU (simulated here: only the checks are exercised)."""
    monkeypatch.setattr(attention, "_nvidia_gpu", lambda: True)
    ok = attention.cudnn_unsupported
    assert ok(jnp.bfloat16, 64, 197, 197, False) is None  # ViT-B/16 with a class token, no bias
    assert ok(jnp.bfloat16, 32, 64, 64, True) is None  # Swin V2's windows with their bias
    assert "bfloat16 or float16" in ok(jnp.float32, 64, 196, 196, False)
    assert "multiple of 8" in ok(jnp.bfloat16, 20, 196, 196, False)
    assert "even sequence lengths" in ok(jnp.bfloat16, 64, 197, 197, True)
    assert attention.kernel_for("auto", jnp.bfloat16, 64, 196, 196, False) == "cudnn"
    assert attention.kernel_for("auto", jnp.float32, 64, 196, 196, False) == "xla"


PALLAS_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.experimental.pallas import tpu as pltpu
from vit22b.models import attention
from vit22b.parallel import sharding

attention.target_platform = lambda: "tpu"  # the kernel runs in Pallas' TPU interpreter on these CPU devices
r = np.random.default_rng(0)
rand = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)

def einsum_attention(q, k, v, b):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 0.25
    if b is not None:
        logits = logits + jnp.tile(b, (q.shape[0] // b.shape[0], 1, 1, 1))
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)

out = {}
mesh = sharding.make_mesh("data:2,model:2")
# (batch, query length, bias groups): Swin's grouped bias whose groups each device's batch share holds whole; one
# it does not (tiled to the batch first); the MAP head's single probe without a bias.
for batch, q_len, groups in [(4, 128, 2), (12, 128, 4), (4, 1, None)]:
    q, k, v = rand(batch, q_len, 2, 16), rand(batch, 128, 2, 16), rand(batch, 128, 2, 16)
    b = None if groups is None else rand(groups, 2, q_len, 128)
    g = rand(batch, q_len, 2, 16)
    args = (q, k, v) if b is None else (q, k, v, b)
    def loss(fn):
        return lambda *a: jnp.sum(fn(*(a + (None,))[:4]) * g)
    ours = lambda q, k, v, b: attention.attention(q, k, v, bias=b, scale=0.25, impl="pallas")
    with sharding.activate(mesh), pltpu.force_tpu_interpret_mode():
        got = jax.jit(ours)(q, k, v, b)
        grads = jax.jit(jax.grad(loss(ours), tuple(range(len(args)))))(*args)
    want = einsum_attention(q, k, v, b)
    want_grads = jax.grad(loss(einsum_attention), tuple(range(len(args))))(*args)
    out[f"{batch},{q_len},{groups}"] = [float(jnp.abs(got - want).max())] + [
        float(jnp.abs(x - y).max() / jnp.abs(y).max()) for x, y in zip(grads, want_grads)]
print("ERRS" + json.dumps(out))
"""


def test_pallas_tpu_flash_equals_einsum_softmax_on_a_mesh():
    """attention_impl='pallas': the Pallas TPU flash kernel, run by Pallas' TPU interpreter on 4 CPU devices
    under a (data 2, model 2) mesh, where the entry point wraps it in a shard_map (batch and heads split),
    equals softmax(scale q k^T + bias) v, values and gradients (bias included)."""
    import json
    import subprocess
    import sys
    from conftest import REPO, cpu_env
    r = subprocess.run([sys.executable, "-c", PALLAS_SCRIPT], cwd=REPO, env=cpu_env(devices=4),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    errs = json.loads(r.stdout.split("ERRS", 1)[1])
    assert set(errs) == {"4,128,2", "12,128,4", "4,1,None"}
    for case, values in errs.items():
        assert max(values) < 1e-5, (case, values)


def test_pallas_is_a_tpu_kernel_with_shape_limits(monkeypatch):
    with pytest.raises(ValueError, match=r"model.attention_impl: 'pallas' is a TPU kernel; the target here is cpu"):
        models.resolve("vit", dict(variant="B/16", attention_impl="pallas"), 10, 224)
    monkeypatch.setattr(attention, "target_platform", lambda: "tpu")
    assert attention.kernel_for("pallas", jnp.bfloat16, 128, 256, 256, False) == "pallas"  # ViT-22B
    assert attention.kernel_for("pallas", jnp.bfloat16, 128, 1, 256, False) == "pallas"  # its MAP head
    assert attention.kernel_for("pallas", jnp.bfloat16, 64, 196, 196, False) == "xla"  # ViT-B/16
    assert attention.kernel_for("pallas", jnp.bfloat16, 32, 144, 144, True) == "xla"  # Swin V2, window 12
    assert "multiples of 128" in attention.pallas_unsupported(32, 400, 400)
    assert "head_dim up to 128" in attention.pallas_unsupported(192, 256, 256)
    assert attention.kernel_for("auto", jnp.bfloat16, 128, 256, 256, False) == "xla"  # not chosen by itself
