"""Weights both ways (vit22b/models/vit_weights.py, vit22b/models/convert.py): timm and big_vision ViTs into ours
with timm's logits, ours back to timm for each family (bit-exact round trips), and parameters-only exports of
training checkpoints. Random weights that exercise every path: every parameter perturbed, norms off their identity
initialisation. Needs the test extra (torch 2.14.1, torchvision 0.29.1, timm)."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402
from timm.models.vision_transformer import checkpoint_filter_fn  # noqa: E402

from vit22b import models  # noqa: E402
from vit22b.models import convert, vit_weights  # noqa: E402


def perturb_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
            if p.ndim == 1 and name.endswith("weight"):  # norm scales away from 1
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def perturbed(params, seed=0):
    """Our parameters with every leaf moved (zero-initialised heads, biases and norms included)."""
    leaves, tree = jax.tree.flatten(nn.meta.unbox(params))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def logits_of(module, params, x):
    return np.asarray(jax.jit(module.apply)({"params": params}, nhwc(x)))


def timm_logits(model, x):
    with torch.no_grad():
        return model(x).numpy()


def save(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.mark.parametrize("name,img", [("vit_base_patch16_224", None), ("vit_small_patch16_384", None),
                                      ("vit_base_patch16_xp_224", None), ("vit_small_patch16_224", 320)])
def test_timm_vits_load_with_timm_logits(name, img, tmp_path):
    """Classic ViTs (another resolution too), timm's ViT-22B-style parallel-block model, and a model loaded at
    another image size than saved (against timm's own resampling of the same file: bicubic, antialiased)."""
    torch.manual_seed(0)
    # The layouts are per block: 4 of 12 blocks suffice, except for the classic B/16, whole.
    kw = {} if name == "vit_base_patch16_224" else {"depth": 4}
    source = perturb_(timm.create_model(name, pretrained=False, **kw))
    reference = source
    if img:
        reference = timm.create_model(name, pretrained=False, img_size=img, **kw).eval()
        reference.load_state_dict(checkpoint_filter_fn(source.state_dict(), reference))
    size = img or source.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size)
    module, params = vit_weights.load_vit(save(source, tmp_path / "m.safetensors"), img_size=img)
    ours = logits_of(module, params, x)
    assert np.abs(ours - timm_logits(reference, x)).max() < 1e-4
    assert module.block == ("parallel" if "_xp_" in name else "sequential")


def test_loss_gradients_match_timm(tmp_path):
    torch.manual_seed(1)
    source = perturb_(timm.create_model("vit_small_patch16_224", pretrained=False, depth=4, num_classes=10))
    module, params = vit_weights.load_vit(save(source, tmp_path / "m.safetensors"))
    x, labels = torch.randn(2, 3, 224, 224), torch.tensor([3, 7])
    torch.nn.functional.cross_entropy(source(x), labels).backward()
    theirs = {k: p.grad.numpy() for k, p in source.named_parameters()}

    def loss(p):
        logits = module.apply({"params": p}, nhwc(x))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels.numpy())[:, None], 1))

    grads = jax.grad(loss)(params)
    ours, _ = vit_weights.to_timm(module, grads)
    # The class slot of timm's position embedding is folded into our class token: both get its gradient.
    slot = theirs["pos_embed"][:, 0]
    assert np.abs(slot - ours["cls_token"][:, 0]).max() < 1e-4 * np.abs(slot).max()
    theirs["pos_embed"], ours["pos_embed"] = theirs["pos_embed"][:, 1:], ours["pos_embed"][:, 1:]
    assert set(ours) == set(theirs)
    for k in ours:
        scale = np.abs(theirs[k]).max() + 1e-8
        assert np.abs(ours[k] - theirs[k]).max() < 1e-4 * scale + 1e-7, k


VIT_CASES = {  # our settings -> the timm layout they export to
    "classic": dict(block="sequential", norm="layernorm", qkv_bias=True, qk_norm=False, head="token"),
    "vit22b_design": dict(block="parallel", norm="rmsnorm", qkv_bias=False, qk_norm=True, head="map"),
    "parallel_qkv_bias_pre_norm": dict(block="parallel", norm="layernorm", qkv_bias=True, qk_norm=True,
                                       head="token", pre_norm=True),
    "mae_style": dict(block="sequential", norm="layernorm", qkv_bias=True, qk_norm=True, head="gap",
                      class_token=True, fc_norm=True),
}


@pytest.mark.parametrize("case", sorted(VIT_CASES))
def test_ours_to_timm_and_back_is_exact(case, tmp_path):
    cfg = dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8, **VIT_CASES[case])
    module = models.build("vit", cfg, 10, 32)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    params = perturbed(params)
    if cfg.get("pre_norm"):  # timm's pre-norm ViT has no patch bias (refused otherwise)
        params["embedding"]["bias"] = jnp.zeros_like(params["embedding"]["bias"])
    sd, args = vit_weights.to_timm(module, params)
    theirs = timm.create_model(**args).eval()
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})  # strict: every key, no extra
    x = torch.randn(2, 3, 32, 32)
    assert np.abs(logits_of(module, params, x) - timm_logits(theirs, x)).max() < 1e-4
    back_module, back = vit_weights.load_vit(save(theirs, tmp_path / "m.safetensors"), num_heads=4)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
    assert {k: getattr(back_module, k) for k in cfg} == {k: getattr(module, k) for k in cfg}


def test_swinv2_to_pytorch_and_back_is_exact(tmp_path):
    """timm's key layout (loaded by timm with our logits) and the official one; both load back bit-exact."""
    cfg = dict(patch_size=2, window_size=4, embed_dim=32, depths=(2, 1, 1, 1), num_heads=(2, 2, 4, 8),
               drop_path_rate=0.0)
    module = models.build("swinv2", cfg, 10, 32)
    params = perturbed(jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"])
    sd, args = convert.to_timm(module, params)
    theirs = timm.create_model(**args).eval()
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    x = torch.randn(2, 3, 32, 32)
    assert np.abs(logits_of(module, params, x) - timm_logits(theirs, x)).max() < 1e-4
    official = convert.swinv2_to_state_dict(module, params, "official")
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    for name, state_dict in (("timm", sd), ("official", official)):
        torch.save({"model": {k: torch.from_numpy(v) for k, v in state_dict.items()}}, tmp_path / f"{name}.pth")
        _, back = convert.load_swinv2(tmp_path / f"{name}.pth", img_size=32, window_size=4)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params))), name


def big_vision_npz(sd, depth, heads, pre_linen=False, scanned=False):
    """A timm ViT state dict under big_vision's (linen) or vision_transformer's (pre-linen) names, by the name map
    of the shared reference (weights.md section 3): written here independently of the importer under test."""
    mha, ln2, mlp = (("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3") if pre_linen
                     else ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"))
    t = {k: v.numpy() for k, v in sd.items()}
    d = t["patch_embed.proj.weight"].shape[0]
    out = {"embedding/kernel": t["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
           "embedding/bias": t["patch_embed.proj.bias"], "Transformer/encoder_norm/scale": t["norm.weight"],
           "Transformer/encoder_norm/bias": t["norm.bias"], "head/kernel": t["head.weight"].T,
           "head/bias": t["head.bias"]}
    out["Transformer/posembed_input/pos_embedding" if pre_linen else "pos_embedding"] = t["pos_embed"]
    if "cls_token" in t:
        out["cls"] = t["cls_token"]

    def attention(prefix, q, k, v, qb, kb, vb, proj_w, proj_b):
        for n, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[f"{prefix}/{n}/kernel"] = w.T.reshape(d, heads, d // heads)
            out[f"{prefix}/{n}/bias"] = b.reshape(heads, d // heads)
        out[f"{prefix}/out/kernel"] = proj_w.T.reshape(heads, d // heads, d)
        out[f"{prefix}/out/bias"] = proj_b

    blocks = []
    for i in range(depth):
        b = f"blocks.{i}."
        before = set(out)
        p = f"Transformer/encoderblock_{i}/"
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = t[b + "norm1.weight"], t[b + "norm1.bias"]
        out[f"{p}{ln2}/scale"], out[f"{p}{ln2}/bias"] = t[b + "norm2.weight"], t[b + "norm2.bias"]
        q, k, v = np.split(t[b + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(t[b + "attn.qkv.bias"], 3)
        attention(p + mha, q, k, v, qb, kb, vb, t[b + "attn.proj.weight"], t[b + "attn.proj.bias"])
        for j, fc in ((0, "fc1"), (1, "fc2")):
            out[f"{p}{mlp}/Dense_{j}/kernel"] = t[f"{b}mlp.{fc}.weight"].T
            out[f"{p}{mlp}/Dense_{j}/bias"] = t[f"{b}mlp.{fc}.bias"]
        blocks.append(sorted(set(out) - before))
    if scanned:  # depth on axis 0 under Transformer/encoderblock
        for name in blocks[0]:
            stacked = [out.pop(name.replace("encoderblock_0/", f"encoderblock_{i}/")) for i in range(depth)]
            out[name.replace("encoderblock_0/", "encoderblock/")] = np.stack(stacked)
    if "attn_pool.latent" in t:
        p = "MAPHead_0/"
        out[p + "probe"] = t["attn_pool.latent"]
        k, v = np.split(t["attn_pool.kv.weight"], 2)
        kb, vb = np.split(t["attn_pool.kv.bias"], 2)
        attention(p + "MultiHeadDotProductAttention_0", t["attn_pool.q.weight"], k, v, t["attn_pool.q.bias"], kb, vb,
                  t["attn_pool.proj.weight"], t["attn_pool.proj.bias"])
        out[p + "LayerNorm_0/scale"], out[p + "LayerNorm_0/bias"] = t["attn_pool.norm.weight"], t["attn_pool.norm.bias"]
        for j, fc in ((0, "fc1"), (1, "fc2")):
            out[f"{p}MlpBlock_0/Dense_{j}/kernel"] = t[f"attn_pool.mlp.{fc}.weight"].T
            out[f"{p}MlpBlock_0/Dense_{j}/bias"] = t[f"attn_pool.mlp.{fc}.bias"]
    return {"params/" + k: v for k, v in out.items()}


@pytest.mark.parametrize("layout", ["big_vision_map_scanned", "vision_transformer_token"])
def test_big_vision_npz_loads_with_the_same_logits(layout, tmp_path):
    torch.manual_seed(2)
    # The reference: timm with the tanh GELU of big_vision and vision_transformer.
    if layout == "big_vision_map_scanned":  # big_vision: position embedding without a class slot, MAP head
        source = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, class_token=False,
                                   global_pool="map", no_embed_class=True, num_classes=10, act_layer="gelu_tanh")
    else:
        source = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, num_classes=10,
                                   act_layer="gelu_tanh")
    perturb_(source)
    npz = big_vision_npz(source.state_dict(), 3, 3, pre_linen=layout.startswith("vision_transformer"),
                         scanned=layout.endswith("scanned"))
    np.savez(tmp_path / "m.npz", **npz)
    module, params = vit_weights.load_vit(tmp_path / "m.npz")
    x = torch.randn(2, 3, 224, 224)
    assert np.abs(logits_of(module, params, x) - timm_logits(source, x)).max() < 1e-4
    assert module.head == ("map" if "map" in layout else "token") and module.gelu == "tanh"
    # big_vision's pre_logits layer (before the head it was trained with) goes only with a new head.
    npz["params/pre_logits/kernel"], npz["params/pre_logits/bias"] = np.eye(192, dtype=np.float32), np.zeros(192)
    np.savez(tmp_path / "rep.npz", **npz)
    with pytest.raises(vit_weights.CheckpointError, match="pre_logits .* pass num_classes for a new head"):
        vit_weights.load_vit(tmp_path / "rep.npz")
    _, fresh = vit_weights.load_vit(tmp_path / "rep.npz", num_classes=10)
    assert not np.any(fresh["head"]["kernel"])


@pytest.mark.parametrize("new", [7, 3])
def test_resampling_as_big_vision_is_scipy_zoom_of_order_one(new):
    """big_vision's resample_posemb: scipy.ndimage.zoom(grid, (r, r, 1), order=1), up and down."""
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    pe = np.random.default_rng(0).standard_normal((1, 25, 3)).astype(np.float32)
    ours = vit_weights.resample_posemb(pe, new, "big_vision").reshape(new, new, 3)
    theirs = scipy_ndimage.zoom(pe.reshape(5, 5, 3), (new / 5, new / 5, 1), order=1)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_fused_out_projection_and_a_class_token_with_average_pooling(tmp_path):
    """timm's fuse_out_proj parallel block, and a class token beside global_pool='avg' without fc_norm (which the
    file cannot tell from a token head: head='gap' says so)."""
    from functools import partial

    from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer
    torch.manual_seed(4)
    fused = perturb_(VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5,
                                       block_fn=partial(ParallelScalingBlock, fuse_out_proj=True),
                                       qkv_bias=False, qk_norm=True, no_embed_class=True))
    averaged = perturb_(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                                          global_pool="avg", fc_norm=False, num_classes=5))
    x = torch.randn(2, 3, 32, 32)
    for name, model, kw in (("fused", fused, {}), ("averaged", averaged, {"head": "gap"})):
        module, params = vit_weights.load_vit(save(model, tmp_path / f"{name}.safetensors"), **kw)
        assert np.abs(logits_of(module, params, x) - timm_logits(model, x)).max() < 1e-4, name
    assert module.head == "gap" and module.class_token


def test_bad_files_name_the_problem(tmp_path):
    torch.manual_seed(3)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, reg_tokens=2)
    with pytest.raises(vit_weights.CheckpointError, match="reg_token: timm's register tokens"):
        vit_weights.load_vit(save(model, tmp_path / "reg.safetensors"))
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1)
    sd = model.state_dict()
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:, :100]
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(vit_weights.CheckpointError, match=r"block_00/qkv_kernel|blocks/qkv_kernel"):
        vit_weights.load_vit(tmp_path / "bad.safetensors")
    swin = timm.create_model("swinv2_tiny_window8_256", pretrained=False, depths=(1, 1, 1, 1))
    with pytest.raises(vit_weights.CheckpointError, match="holds a Swin model"):
        vit_weights.load_vit(save(swin, tmp_path / "swin.safetensors"))


def test_training_checkpoint_exports_to_params_and_to_timm(tmp_path, capsys):
    """A run's checkpoint -> parameters only in bfloat16 (what config.model_init loads) -> timm, whose logits are
    ours for the same (bf16-rounded) parameters."""
    from conftest import config
    from vit22b.parallel import sharding
    from vit22b.train import checkpointing, loop
    c = config("vit22b_digits", total_steps=2, log_every=1, eval_every=2, checkpoint_every=2)
    c.schedule.warmup_steps = 1
    loop.run(c, str(tmp_path / "run"))
    step = tmp_path / "run" / "checkpoints" / "2"
    convert.main(["--to=params", "--dtype=bfloat16", f"--checkpoint={step}", f"--out={tmp_path / 'p'}"])
    assert "in bfloat16, no optimizer state" in capsys.readouterr().out
    module, trained, _ = convert.load_checkpoint(str(step))
    model = loop.build_model(c, 10)
    state, shardings, _, _ = loop.create_train_state(model, c, sharding.make_mesh(), (8, 8, 1))
    loaded, _ = checkpointing.load_params(str(tmp_path / "p"), state["params"], shardings["params"])
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32), trained)
    assert all(np.array_equal(np.asarray(a, np.float32), b)
               for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(rounded)))

    c.model_init, c.total_steps = str(tmp_path / "p"), 1  # a run starts from the bf16 export
    assert loop.run(c, str(tmp_path / "from_export"))["step"] == 1
    c.model.head = "gap"  # the same parameters pooled otherwise: named before anything is compared
    with pytest.raises(ValueError, match="config.model_init: the checkpoint's model.head is 'map', this run's 'gap'"):
        loop.run(c, str(tmp_path / "pooled_otherwise"))

    convert.main(["--to=timm", f"--checkpoint={tmp_path / 'p'}", f"--out={tmp_path / 'vit.safetensors'}"])
    assert "timm.create_model" in capsys.readouterr().out
    args = json.loads((tmp_path / "vit.json").read_text())
    theirs = timm.create_model(**args).eval()
    from safetensors.torch import load_file
    theirs.load_state_dict(load_file(tmp_path / "vit.safetensors"))
    x = torch.randn(3, 1, 8, 8)
    assert np.abs(logits_of(module, rounded, x) - timm_logits(theirs, x)).max() < 1e-4
