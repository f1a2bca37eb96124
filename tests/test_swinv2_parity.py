"""Swin V2 against timm (itself checked equal to the official code): logits, window transfer, gradients,
and safe, strict checkpoint import. Needs the test extra (torch 2.14.1, torchvision 0.29.1, timm)."""
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.models.swin_transformer import SwinTransformer as TimmSwinV1  # noqa: E402
from timm.models.swin_transformer_v2 import SwinTransformerV2 as TimmSwinV2  # noqa: E402

from vit22b.models import convert, vit_weights  # noqa: E402


def perturb_(model, seed=0):
    """Random weights that exercise every path: block norms away from zero (else every block is the
    identity), non-zero q/v biases, and logit scales pushed past the log(100) clamp."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(("norm1.bias", "norm2.bias", "q_bias", "v_bias")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("logit_scale"):
                p.copy_(np.log(10.0) + torch.randn(p.shape, generator=g))
                p.view(-1)[0] = np.log(100.0) + 0.7  # one head per layer beyond the clamp
    scales = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("logit_scale")])
    assert (scales > np.log(100)).any() and (scales < np.log(100)).any()
    return model.eval()


def nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def save(model, tmp_path, name="m.pth"):
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return path


def test_swinv2_tiny_window8_256_logits_match_timm(tmp_path):
    torch.manual_seed(0)
    ref_model = perturb_(timm.create_model("swinv2_tiny_window8_256", pretrained=False))
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        ref = ref_model(x).numpy()
    module, params = convert.load_swinv2(save(ref_model, tmp_path), img_size=256, window_size=8)
    out = np.asarray(jax.jit(module.apply)({"params": params}, nhwc(x)))
    assert np.abs(out - ref).max() < 1e-4, np.abs(out - ref).max()
    assert "layers_2_blocks" in params  # stages are scanned by default; unrolled gives the same logits
    unrolled, params_unrolled = convert.load_swinv2(save(ref_model, tmp_path), img_size=256, window_size=8, scan=False)
    assert "layers_2_blocks_5" in params_unrolled
    out_unrolled = np.asarray(jax.jit(unrolled.apply)({"params": params_unrolled}, nhwc(x)))
    assert np.abs(out_unrolled - ref).max() < 1e-4
    # Per-stage feature maps for dense prediction: strides 4, 8, 16, 32.
    feats = module.apply({"params": params}, nhwc(x[:1]), return_features=True)
    assert [f.shape for f in feats] == [(1, 64, 64, 96), (1, 32, 32, 192), (1, 16, 16, 384), (1, 8, 8, 768)]


SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 4, 8), num_classes=7)


def perturb_v1_(model, seed=0):
    """Swin V1 weights away from init: every LayerNorm (blocks, patch merging, stem, final) and the bias tables."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1 if name.endswith("weight") else 0) + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def test_swin_v1_tiny_patch4_window7_224_logits_match_timm():
    """Swin V1 as SwinTransformerV2's switches (pre-norm, dot attention, bias table, V1 merge order), loaded
    through the converter, which tells V1 by its bias tables and takes window and heads from them."""
    torch.manual_seed(6)
    ref_model = perturb_v1_(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False), seed=6)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = ref_model(x).numpy()
    sd = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    module, params = convert.load_swinv2("swin_tiny", img_size=224, state_dict=sd, scan=False)  # compiles faster
    assert (module.norm_position, module.attention, module.position_bias) == ("pre", "dot", "table")
    assert module.window_size == 7 and tuple(module.num_heads) == (3, 6, 12, 24)
    assert params["layers_0_downsample"]["norm"]["scale"].shape == (384,)  # LayerNorm(4C) before the reduction
    out = np.asarray(jax.jit(module.apply)({"params": params}, nhwc(x)))
    assert np.abs(out - ref).max() < 1e-4, np.abs(out - ref).max()


def test_swin_v1_official_layout_and_export_round_trip(tmp_path):
    """Official Microsoft V1 keys (downsample at stage end, head.weight, persistent index and mask buffers) load
    like timm's (whose logits the 224 px test checks), a stage smaller than the window with its clamped table;
    export gives back timm's and the official state dicts exactly, with create_model arguments that build the
    timm model. A V1 / V2 mix has no export."""
    torch.manual_seed(7)
    model = perturb_v1_(TimmSwinV1(img_size=64, window_size=4, **dict(SMALL, depths=(2, 1, 1, 1))), seed=7)
    timm_sd = {k: v.numpy() for k, v in model.state_dict().items()}
    assert timm_sd["layers.3.blocks.0.attn.relative_position_bias_table"].shape == (9, 8)  # 2x2 stage: window 2
    official, _ = convert.to_official_keys(timm_sd)
    assert "layers.0.downsample.norm.weight" in official and "head.weight" in official
    with_buffers = dict(official, **{"layers.0.blocks.1.attn_mask": np.zeros((4, 16, 16), np.float32),
                                     "layers.0.blocks.0.attn.relative_position_index": np.zeros((16, 16), np.int64)})
    torch.save({"model": {k: torch.from_numpy(v) for k, v in with_buffers.items()}}, tmp_path / "off.pth")
    module, params = convert.load_swinv2(save(model, tmp_path), img_size=64)
    _, p_off = convert.load_swinv2(tmp_path / "off.pth", img_size=64)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), params, p_off))
    assert module.window_size == 4 and "layers_0_blocks" in params  # scanned by default
    assert params["layers_3_blocks_0"]["attn"]["relative_position_bias_table"].shape == (9, 8)

    sd, args = convert.to_timm(module, params)
    assert args["model_name"] == "swin_tiny_patch4_window7_224" and "pretrained_window_sizes" not in args
    rebuilt = timm.create_model(**args)
    rebuilt.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})  # strict
    assert sd.keys() == timm_sd.keys() and all(np.array_equal(sd[k], timm_sd[k]) for k in sd)
    off = convert.swinv2_to_state_dict(module, params, "official")
    assert off.keys() == official.keys() and all(np.array_equal(off[k], official[k]) for k in off)
    with pytest.raises(convert.CheckpointError, match=r"^model.attention: .* mixes Swin V1"):
        convert.to_timm(module.clone(attention="cosine"), params)
    with pytest.raises(convert.CheckpointError, match=r"relative_position_bias_table.*does not fit"):
        convert.load_swinv2(tmp_path / "off.pth", img_size=64, window_size=8)  # a table does not transfer


def test_window_transfer_12_to_16_matches_timm(tmp_path):
    """A window-12 / 192 px checkpoint loaded at window 16 / 256 px with pretrained_window_sizes 12,12,12,6
    (the official 12to16 fine-tuning setting): no interpolation, only the log-spaced coordinates change."""
    torch.manual_seed(1)
    source = perturb_(TimmSwinV2(img_size=192, window_size=12, **SMALL), seed=1)
    path = save(source, tmp_path)
    target = TimmSwinV2(img_size=256, window_size=16, pretrained_window_sizes=(12, 12, 12, 6), **SMALL).eval()
    target.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        ref = target(x).numpy()
    module, params = convert.load_swinv2(path, img_size=256, window_size=16, pretrained_window_sizes=(12, 12, 12, 6))
    out = np.asarray(jax.jit(module.apply)({"params": params}, nhwc(x)))
    assert np.abs(out - ref).max() < 1e-4, np.abs(out - ref).max()
    # And at the source resolution it matches the source model.
    x192 = torch.randn(1, 3, 192, 192)
    with torch.no_grad():
        ref192 = source(x192).numpy()
    module192, params192 = convert.load_swinv2(path, img_size=192, window_size=12)
    assert np.abs(np.asarray(module192.apply({"params": params192}, nhwc(x192))) - ref192).max() < 1e-4


def test_loss_gradients_match_timm(tmp_path):
    torch.manual_seed(2)
    model = perturb_(TimmSwinV2(img_size=64, window_size=4, **SMALL), seed=2)
    x = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([1, 5])
    loss = torch.nn.functional.cross_entropy(model(x), labels)
    loss.backward()
    grads_sd = {k: p.grad.numpy() for k, p in model.named_parameters()}
    module, params = convert.load_swinv2(save(model, tmp_path), img_size=64, window_size=4)

    def loss_fn(p):
        logits = module.apply({"params": p}, nhwc(x))
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels.numpy())[:, None], 1).mean()

    value, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert abs(float(value) - loss.item()) < 1e-5
    expected = convert.state_dict_to_params(convert.to_official_keys(grads_sd)[0], params)
    flat, ref = jax.tree.leaves_with_path(grads), dict(jax.tree.leaves_with_path(expected))
    for path, g in flat:
        r = ref[path]
        assert np.abs(np.asarray(g) - r).max() <= 1e-5 + 1e-3 * np.abs(r).max(), jax.tree_util.keystr(path)
    # logit scales above the clamp get no gradient; those below do
    ls = [np.asarray(v) for p, v in flat if "logit_scale" in jax.tree_util.keystr(p)]
    assert any((np.abs(a) == 0).any() for a in ls) and any((np.abs(a) > 0).any() for a in ls)


def test_official_and_simmim_layouts(tmp_path):
    """Official keys (downsample at the end of stages 0-2, `head.`), buffers that must be dropped, and
    SimMIM's `encoder.` prefix with the legacy `rpe_mlp` name all load to the same parameters."""
    torch.manual_seed(3)
    model = perturb_(TimmSwinV2(img_size=64, window_size=4, **SMALL), seed=3)
    timm_sd = model.state_dict()
    official, dropped = convert.to_official_keys({k: v.numpy() for k, v in timm_sd.items()})
    assert "layers.0.downsample.reduction.weight" in official and "head.weight" in official
    official_with_buffers = dict(official)
    official_with_buffers["layers.0.blocks.0.attn.relative_coords_table"] = np.zeros((1, 7, 7, 2), np.float32)
    official_with_buffers["layers.0.blocks.1.attn_mask"] = np.zeros((4, 16, 16), np.float32)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in official_with_buffers.items()}}, tmp_path / "off.pth")
    simmim = {("encoder." + k).replace("cpb_mlp", "rpe_mlp"): torch.from_numpy(v) for k, v in official.items()
              if not k.startswith("head.")}
    simmim["encoder.mask_token"] = torch.zeros(1, 1, 32)
    simmim["decoder.0.weight"] = torch.zeros(3072, 256, 1, 1)
    torch.save({"model": simmim}, tmp_path / "simmim.pth")
    _, p_timm = convert.load_swinv2(save(model, tmp_path), img_size=64, window_size=4)
    _, p_off = convert.load_swinv2(tmp_path / "off.pth", img_size=64, window_size=4)
    _, p_sim = convert.load_swinv2(tmp_path / "simmim.pth", img_size=64, window_size=4)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), p_timm, p_off))
    p_timm.pop("head")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), p_timm, p_sim))


def test_shape_and_name_mismatches_name_the_parameter(tmp_path):
    model = TimmSwinV2(img_size=64, window_size=4, **SMALL)
    path = save(model, tmp_path)
    with pytest.raises(convert.CheckpointError, match=r"patch_embed.proj.weight.*does not fit.*patch_embed_proj/kernel"):
        convert.load_swinv2(path, img_size=64, window_size=4, embed_dim=48)
    sd = model.state_dict()
    sd["layers.0.blocks.0.attn.extra.weight"] = torch.zeros(2, 2)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(convert.CheckpointError, match="layers.0.blocks.0.attn.extra.weight"):
        convert.load_swinv2(tmp_path / "extra.pth", img_size=64, window_size=4)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARKER', '/tmp/evil')}",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(convert.CheckpointError, match="refused to load"):
        convert.read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_a_truncated_or_foreign_checkpoint_gets_one_line_naming_it(tmp_path, capsys):
    torch.save({"model": {"w": torch.ones(64, 64)}}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as e:
        convert.main(["--checkpoint", str(tmp_path / "cut.pth"), "--out", str(tmp_path / "out")])
    assert str(e.value).startswith(f"error: {tmp_path / 'cut.pth'}: not a readable PyTorch checkpoint")
    assert "\n" not in str(e.value)
    vit = {"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8),
           "patch_embed.proj.weight": torch.zeros(8, 3, 4, 4), "blocks.0.attn.qkv.weight": torch.zeros(24, 8),
           "blocks.1.attn.qkv.weight": torch.zeros(24, 8)}
    torch.save(vit, tmp_path / "vit.pth")
    with pytest.raises(vit_weights.CheckpointError) as e:  # the Swin loader, given a ViT
        convert.load_swinv2(tmp_path / "vit.pth")
    assert str(e.value) == (f"{tmp_path / 'vit.pth'}: this file holds a ViT (cls_token, pos_embed, "
                            "blocks.N.attn.qkv), not a Swin")
    # The command takes it as a ViT, and names what the file does not say or lacks.
    with pytest.raises(SystemExit) as e:
        convert.main(["--checkpoint", str(tmp_path / "vit.pth"), "--out", str(tmp_path / "out")])
    assert str(e.value) == (f"error: {tmp_path / 'vit.pth'}: the number of heads of a width-8 ViT is not in the "
                            "file; pass num_heads")
    with pytest.raises(SystemExit) as e:
        convert.main(["--checkpoint", str(tmp_path / "vit.pth"), "--num_heads=2", "--out", str(tmp_path / "out")])
    assert str(e.value) == (f"error: {tmp_path / 'vit.pth'}: lacks blocks.0.mlp.fc1.weight, which a ViT with these "
                            "settings has")


def test_safetensors(tmp_path):
    from safetensors.torch import save_file
    model = perturb_(TimmSwinV2(img_size=64, window_size=4, **SMALL), seed=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x).numpy()
    module, params = convert.load_swinv2(tmp_path / "m.safetensors", img_size=64, window_size=4)
    assert np.abs(np.asarray(module.apply({"params": params}, nhwc(x))) - ref).max() < 1e-4


def test_convert_command_and_model_init(tmp_path, capsys):
    """`python -m vit22b.models.convert` writes an Orbax checkpoint that `config.model_init` loads (training from
    one: tests/test_weights.py), checked against the model."""
    from conftest import config
    from vit22b.parallel import sharding
    from vit22b.train import checkpointing, loop
    source = TimmSwinV2(img_size=32, patch_size=2, window_size=4, embed_dim=32, depths=(1, 1, 2, 1),
                        num_heads=(2, 2, 4, 8), num_classes=10, in_chans=1)
    torch.save({"model": perturb_(source, seed=5).state_dict()}, tmp_path / "digits_swin.pth")
    out = tmp_path / "converted"
    convert.main(["--checkpoint", str(tmp_path / "digits_swin.pth"), "--img", "32", "--window", "4", "--out", str(out)])
    assert "1,442,558 parameters" in capsys.readouterr().out

    c = config("swinv2_imagenet")
    mesh = sharding.make_mesh()
    model = loop.build_model(c, 10)
    state, shardings, _, _ = loop.create_train_state(model, c, mesh, (32, 32, 1))
    loaded, _ = checkpointing.load_params(str(out), state["params"], shardings["params"])
    _, expected = convert.load_swinv2(tmp_path / "digits_swin.pth", img_size=32, window_size=4)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), loaded, expected))
    c.model.embed_dim = 48  # a model the checkpoint does not fit: the error names the parameter
    model = loop.build_model(c, 10)
    state, shardings, _, _ = loop.create_train_state(model, c, mesh, (32, 32, 1))
    with pytest.raises(ValueError, match=r"config.model_init: head/kernel has shape \(256, 10\).*wants \(384, 10\)"):
        checkpointing.load_params(str(out), state["params"], shardings["params"])
