"""SimMIM (vit22b/models/simmim.py) against the official formulation: the pixel shuffle against torch's, the loss
and normalised targets against direct NumPy sums, the Swin V2 and ViT encoders with the mask token against timm's
models run the official way, and the AvgDist of the default mask."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402

from vit22b.models import convert, simmim, vit_weights  # noqa: E402


def test_pixel_shuffle_is_torchs():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 3 * 4 * 4)).astype(np.float32)
    ours = simmim.pixel_shuffle(jnp.asarray(x), 4)
    theirs = torch.nn.PixelShuffle(4)(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_loss_and_norm_targets_against_direct_sums():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((2, 12, 12, 3)).astype(np.float32)
    rec = rng.standard_normal((2, 12, 12, 3)).astype(np.float32)
    mask = (rng.random((2, 12, 12)) < 0.6).astype(np.float32)
    k = 5
    t = np.asarray(simmim.norm_targets(jnp.asarray(images), k))
    for b, i, j, c in [(0, 0, 0, 0), (1, 11, 0, 2), (0, 6, 6, 1), (1, 2, 9, 0)]:  # corners, interior, border
        win = images[b, max(i - 2, 0):i + 3, max(j - 2, 0):j + 3, c]
        expected = (images[b, i, j, c] - win.mean()) / np.sqrt(win.var(ddof=1) + 1e-6)
        assert abs(t[b, i, j, c] - expected) < 1e-4, (b, i, j, c)
    for kernel, target in ((0, images), (k, t)):
        direct = (np.abs(target - rec) * mask[..., None]).sum() / (mask.sum() + 1e-5) / 3
        ours = float(simmim.simmim_loss(jnp.asarray(images), jnp.asarray(rec), jnp.asarray(mask), kernel))
        assert abs(ours - direct) < 1e-5 * direct


def test_default_mask_avg_dist_is_in_the_papers_best_range():
    """SimMIM (section 4.1): a moderate AvgDist, 10 to 20 pixels, transfers best; the default 32-px squares at
    ratio 0.6 on 192 px give about 15.0."""
    d = simmim.avg_dist(192, 32, 0.6, samples=16)
    assert 14 <= d <= 16, d
    assert simmim.avg_dist(192, 8, 0.6, samples=16) < d  # smaller squares: masked pixels nearer the visible ones


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_swinv2_simmim_matches_the_official_formulation_on_timms_model(tmp_path):
    """Encoder: timm's SwinV2 with the mask token substituted after its patch norm, the official way; decoder: a
    1x1 convolution and torch's PixelShuffle; loss: the official formula with normalised targets."""
    torch.manual_seed(0)
    ref = _perturb(timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=64, window_size=4,
                                     embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), num_classes=0), 0)
    torch.save(ref.state_dict(), tmp_path / "enc.pth")
    encoder, params = convert.load_swinv2(tmp_path / "enc.pth", img_size=64, window_size=4, num_classes=0)
    model = simmim.SimMIM(encoder, stride=32)
    x = torch.randn(2, 3, 64, 64)
    token_mask = torch.from_numpy(np.random.default_rng(2).integers(0, 2, (2, 16, 16)).astype(np.float32))
    mask_token = 0.3 * torch.randn(1, 1, 32)
    conv = torch.nn.Conv2d(256, 32 * 32 * 3, 1)
    with torch.no_grad():  # the official SwinTransformerV2ForSimMIM.forward and SimMIM.forward
        z = ref.patch_embed(x)  # NHWC, patch norm included
        w = token_mask[..., None]
        z = z * (1 - w) + mask_token * w
        z = ref.norm(ref.layers(z))
        rec = torch.nn.PixelShuffle(32)(conv(z.permute(0, 3, 1, 2)))
        m = token_mask.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None]
        target = torch.from_numpy(np.asarray(simmim.norm_targets(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), 47))
                                  ).permute(0, 3, 1, 2)
        loss = ((target - rec).abs() * m).sum() / (m.sum() + 1e-5) / 3
    variables = {"params": {"encoder": dict(params, mask_token=jnp.asarray(mask_token.numpy()).reshape(1, 1, 1, 32)),
                            "decoder": {"kernel": jnp.asarray(conv.weight.detach().numpy()[:, :, 0, 0].T),
                                        "bias": jnp.asarray(conv.bias.detach().numpy())}}}
    images, tm = jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(token_mask.numpy())
    ours = model.apply(variables, images, tm)
    np.testing.assert_allclose(np.asarray(ours), rec.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    ours_loss = simmim.simmim_loss(images, ours, simmim.pixel_mask(tm, 4), 47)
    assert abs(float(ours_loss) - float(loss)) < 1e-4 * float(loss)
    # init creates the mask token and the decoder beside the encoder's parameters
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tm)["params"])
    assert shapes["encoder"]["mask_token"].shape == (1, 1, 1, 32) and shapes["decoder"]["kernel"].shape == (256, 3072)


def test_vit_simmim_puts_the_mask_token_before_the_position_embedding(tmp_path):
    torch.manual_seed(1)
    ref = _perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64,
                                     num_classes=0), 1)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "vit.safetensors")
    encoder, params = vit_weights.load_vit(tmp_path / "vit.safetensors", num_classes=0)
    x = torch.randn(2, 3, 64, 64)
    token_mask = torch.from_numpy(np.random.default_rng(3).integers(0, 2, (2, 4, 4)).astype(np.float32))
    mask_token = 0.3 * torch.randn(1, 1, 192)
    with torch.no_grad():
        z = ref.patch_embed(x)
        w = token_mask.reshape(2, 16, 1)
        z = ref.norm(ref.blocks(ref.norm_pre(ref._pos_embed(z * (1 - w) + mask_token * w))))[:, 1:]
    ours = encoder.apply({"params": dict(params, mask_token=jnp.asarray(mask_token.numpy()).reshape(1, 1, 1, 192))},
                         jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), mask=jnp.asarray(token_mask.numpy()),
                         return_map=True)
    np.testing.assert_allclose(np.asarray(ours).reshape(2, 16, 192), z.numpy(), atol=1e-4)


def test_pretraining_run_then_its_encoder_initialises_a_finetuning(tmp_path, capsys):
    """configs/simmim_swinv2_imagenet.py:runlocal for 2 steps: the reconstruction loss, AvgDist, the picture and a
    few-shot evaluator logged; configs/swinv2_finetune_imagenet.py:runlocal then trains from that checkpoint,
    whose encoder it takes (mask token and decoder dropped, the head fresh)."""
    import orbax.checkpoint as ocp

    from conftest import config
    from vit22b.parallel import sharding
    from vit22b.train import checkpointing, loop
    from vit22b.train.metrics import read_metrics
    pre = tmp_path / "pre"
    small = {"model.embed_dim": 16, "model.depths": (1, 1, 1, 1), "model.num_heads": (1, 1, 2, 2)}
    c = config("simmim_swinv2_imagenet", total_steps=2, log_every=1, eval_every=2, checkpoint_every=2, **small)
    c.schedule.update(warmup_steps=1, boundaries=(2,))
    c.evals = [dict(name="digits", kind="fewshot", data="digits", shots=(1, 2), seeds=1, max_train=100, max_test=50)]
    loop.run(c, str(pre))
    rows = read_metrics(str(pre))
    assert rows[0]["step"] == 0 and 3 < rows[0]["simmim/avg_dist"] < 6  # 8-px squares on 32 px
    final = {k: v for r in rows if r["step"] == 2 for k, v in r.items()}
    assert 0 < final["eval/loss"] < 10 and "eval/accuracy" not in final
    assert 0 <= final["eval/digits/1shot"] <= 1 and 0 <= final["eval/digits/2shot"] <= 1
    assert (pre / "images" / "eval_reconstruction_2.png").is_file()
    from vit22b.tools import evaluate  # the same evaluator on the checkpoint, from the command
    evaluate.main([f"--checkpoint={pre}/checkpoints/2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        k: v for k, v in final.items() if k.startswith("eval/digits/")}

    ft = config("swinv2_finetune_imagenet", f"runlocal,init={pre}/checkpoints/2", total_steps=2, log_every=1,
                eval_every=2, checkpoint_every=2, **small)
    ft.schedule.warmup_steps = 1
    ft.input.eval_split = ""  # the train step with layer-wise decay 0.75 is what this adds
    assert loop.run(ft, str(tmp_path / "ft"))["step"] == 2
    model = loop.build_model(ft, 10)
    state, shardings, _, _ = loop.create_train_state(model, ft, sharding.make_mesh(), (32, 32, 1))
    loaded, note = checkpointing.load_params(ft.model_init, state["params"], shardings["params"], model)
    assert "head" in note and np.array_equal(loaded["head"]["kernel"], state["params"]["head"]["kernel"])
    with ocp.StandardCheckpointer() as ck:
        encoder = ck.restore(pre / "checkpoints" / "2" / "state")["params"]["encoder"]
    assert "mask_token" in encoder and set(loaded) == set(encoder) - {"mask_token"} | {"head"}
    for a, b in zip(jax.tree.leaves({k: loaded[k] for k in encoder if k != "mask_token"}),
                    jax.tree.leaves({k: encoder[k] for k in encoder if k != "mask_token"})):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fewshot_and_linear_probe_on_features_that_separate_the_classes():
    from vit22b.train import evaluators
    rng = np.random.default_rng(0)
    centres = 3 * rng.standard_normal((4, 16))
    y, yt = rng.integers(0, 4, 400), rng.integers(0, 4, 200)
    x, xt = centres[y] + rng.standard_normal((400, 16)), centres[yt] + rng.standard_normal((200, 16))
    few = evaluators.fewshot_accuracy(x, y, xt, yt, (1, 10), 4, seeds=2, l2_reg=1.0)
    assert few[10] > 0.95 and few[1] > 0.5
    assert evaluators.linear_probe_accuracy(x, y, xt, yt, 4, steps=200, lr=0.05) > 0.95
    # noise features: chance
    noise = evaluators.fewshot_accuracy(rng.standard_normal((400, 16)), y, rng.standard_normal((200, 16)), yt, (10,), 4)
    assert noise[10] < 0.5
    with pytest.raises(ValueError, match="shots: not an option of 'linear_probe'"):
        evaluators.options(dict(name="p", kind="linear_probe", data="digits", shots=(1,)))


def test_vit22b_design_and_classic_vit_reconstruct_at_their_patch_stride():
    from vit22b import models
    images = jnp.zeros((2, 32, 32, 3))
    for cfg in (dict(block="parallel", qk_norm=True, norm="rmsnorm", head="map", qkv_bias=False),
                dict(block="sequential", qk_norm=False, norm="layernorm", head="token", qkv_bias=True)):
        encoder = models.build("vit", dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, **cfg), 0, 32)
        model = simmim.SimMIM(encoder, stride=8)
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, jnp.ones((2, 4, 4)))
        assert jax.eval_shape(model.apply, variables, images, jnp.ones((2, 4, 4))).shape == (2, 32, 32, 3)
        assert nn.meta.unbox(variables["params"])["decoder"]["kernel"].shape == (32, 8 * 8 * 3)
