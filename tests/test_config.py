"""Config parsing, validation before compilation, and every config in configs/ running at a tiny size."""
import time

import jax
import pytest

from conftest import CONFIGS, config, fake_fashion_mnist, override, run_main
from vit22b import config_check, models
from vit22b.train import loop
from vit22b.config_args import parse_arg

ALL_CONFIGS = sorted(p.stem for p in CONFIGS.glob("*.py"))
# Configs whose tiny run is a test of its own (with more assertions), not repeated here.
RUN_ELSEWHERE = {"simmim_swinv2_imagenet": "tests/test_simmim.py", "swinv2_finetune_imagenet": "tests/test_simmim.py"}


def test_parse_arg_types():
    a = parse_arg("variant=B/16,batch=256,runlocal", variant="22B/14", batch=65536, lr=1e-3, runlocal=False)
    assert (a.variant, a.batch, a.lr, a.runlocal) == ("B/16", 256, 1e-3, True)
    assert parse_arg("L/16", variant="22B/14", batch=1).variant == "L/16"  # bare value -> first key
    with pytest.raises(ValueError, match="'batchsize'"):
        parse_arg("batchsize=3", variant="x", batch=1)
    with pytest.raises(ValueError, match="batch: expected int"):
        parse_arg("batch=many", variant="x", batch=1)


BAD = [
    ({"model.num_heads": 5}, "config.model.width: width 64 is not divisible by model.num_heads = 5"),
    ({"input.image_size": 9}, "config.input.image_size: image size 9 is not divisible by model.patch_size"),
    ({"model.variant": "Q/16"}, "config.model.variant: unknown variant 'Q/16'"),
    ({"optimizer": "lamb"}, "config.optimizer: unknown value 'lamb'"),
    ({"loss": "hinge"}, "config.loss: unknown loss 'hinge'"),
    ({"model.block": "serial"}, "config.model.block: 'serial' is not one of"),
    ({"schedule.decay_type": "step"}, "config.schedule.decay_type"),
    ({"total_steps": 0}, "config.total_steps: must be a positive integer"),
    ({"input.batch_size": -4}, "config.input.batch_size"),
    ({"model.parallel_linear": "ring"}, "config.model.parallel_linear: 'ring' is not one of"),
    ({"model.collective_ring": "both"}, "config.model.collective_ring: 'both' is not one of"),
    ({"model.mlp_dim": 250}, "config.model.mlp_dim: the parallel block needs mlp_dim 250 divisible by"),
    ({"grad_accum_steps": 0}, "config.grad_accum_steps: must be a positive integer"),
    ({"grad_accum_steps": 3}, "config.grad_accum_steps: input.batch_size 128 does not split into 3 microbatches"),
    ({"model.block": "sequential", "model.parallel_linear": "collective"},
     "config.model.parallel_linear: 'collective' applies to model.block = 'parallel' only"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_invalid_configs_name_the_field(overrides, message):
    c = override(config("vit22b_digits"), overrides)
    with pytest.raises(config_check.ConfigError) as e:
        config_check.validate(c)
    assert message in str(e.value)


def test_microbatches_must_split_over_the_data_devices():
    c = override(config("vit22b_digits"), {"mesh": "data:8", "input.batch_size": 16, "grad_accum_steps": 4})
    with pytest.raises(config_check.ConfigError, match=r"config.grad_accum_steps: microbatches of 4 \(input.batch_size "
                       r"16 / 4\) do not split evenly over the 8 devices"):
        config_check.validate(c, num_devices=8)
    c.grad_accum_steps = 2
    config_check.validate(c, num_devices=8)


def test_unknown_keys_are_rejected():
    c = config("vit22b_digits")
    c.totl_steps = 3
    with pytest.raises(config_check.ConfigError, match="config.totl_steps: unknown key"):
        config_check.validate(c)
    c = config("vit22b_digits")
    c.model.qk_nrom = True
    with pytest.raises(config_check.ConfigError, match="model.qk_nrom: unknown vit model key"):
        config_check.validate(c)
    c = config("vit22b_digits")
    c.input.batchsize = 3
    with pytest.raises(config_check.ConfigError, match="config.input.batchsize: unknown key"):
        config_check.validate(c)


@pytest.mark.parametrize("flag,message", [
    ("--config.model.num_heads=5", "config.model.width: width 64 is not divisible by model.num_heads = 5"),
    ("--config.model.widht=5", 'error: config.model.widht: no such key; Did you mean "width" instead of "widht"?'),
    ("--config.total_steps=abc", "total_steps"),                # malformed value
    ("--config.model.patch_size=3", "config.input.image_size: image size 8 is not divisible"),
])
def test_cli_errors_before_compilation(tmp_path, flag, message):
    start = time.time()
    r = run_main(f"{CONFIGS}/vit22b_digits.py", tmp_path / "w", flag)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr[-2000:]
    assert "step " not in r.stdout and not (tmp_path / "w" / "checkpoints").exists()
    print(f"{flag}: failed after {time.time() - start:.1f}s")


def test_jft_config_without_the_dataset_stops_with_a_named_error(tmp_path):
    r = run_main(f"{CONFIGS}/vit22b_jft.py", tmp_path / "w", f"--config.input.data_dir={tmp_path}/tfds")
    assert r.returncode != 0
    assert "dataset 'jft' not found" in r.stderr and f"{tmp_path}/tfds/jft" in r.stderr
    assert "--config.input.data=" in r.stderr  # says how to point the config elsewhere
    assert "Traceback" not in r.stderr


def test_jft_config_is_the_paper_recipe():
    c = config("vit22b_jft", arg=None)
    kw = config_check.validate(c)
    assert (kw["width"], kw["depth"], kw["mlp_dim"], kw["num_heads"], kw["patch_size"]) == (6144, 48, 24576, 48, 14)
    assert (kw["block"], kw["qk_norm"], kw["qkv_bias"], kw["norm"], kw["head"]) == (
        "parallel", True, False, "rmsnorm", "map")
    assert c.input.image_size // 14 == 16 and c.input.batch_size == 65_536
    assert c.loss == "sigmoid_xent" and c.optimizer == "adafactor_bv"
    assert c.optimizer_kw.momentum_dtype == "bfloat16"
    assert c.schedule.decay_type == "rsqrt" and c.schedule.warmup_steps == 10_000
    assert c.schedule.cooldown_steps == 30_000 and c.lr == 1e-3
    assert c.wd == 0.03 and c.wd_mults[0] == ("head/kernel", 100.0)  # head 3.0, body 0.03
    model = models.build("vit", c.model, 29_593)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 224, 224, 3))))
    assert "map_head" in params["params"]
    # The smaller variants of the same recipe come from the config arg.
    assert config_check.validate(config("vit22b_jft", arg="variant=B/16,batch=4096"))["width"] == 768


@pytest.mark.parametrize("name", sorted(set(ALL_CONFIGS) - set(RUN_ELSEWHERE)))
def test_every_config_runs_at_a_tiny_size(name, tmp_path):
    # Every step logged: one compiled step (the loop compiles a second, norm-free one for steps between logs).
    c = config(name, "runlocal", total_steps=6, log_every=1, eval_every=6, checkpoint_every=6)
    if c.model_name == "vit":
        c.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
    else:
        stages = len(c.model.depths or (1, 1, 1, 1))
        c.model.update(embed_dim=16, depths=(1,) * stages, num_heads=(1, 1, 2, 2)[:stages])
    c.input.batch_size = 8
    if c.input.data == "fashion_mnist":  # converted from (small, generated) IDX files by the real tool
        fake_fashion_mnist(tmp_path / "data")
        c.input.data_dir = str(tmp_path / "data")
    c.schedule.warmup_steps = min(c.schedule.warmup_steps, 2)
    if "cooldown_steps" in c.schedule:
        c.schedule.cooldown_steps = min(c.schedule.cooldown_steps, 2)
    if "boundaries" in c.schedule:
        c.schedule.boundaries = (5,)
    out = loop.run(c, str(tmp_path))
    if c.get("simmim"):  # masked-image modelling: a reconstruction loss and its picture, no accuracy
        assert out["step"] == 6 and 0.0 < out["eval/loss"] and (tmp_path / "images").is_dir()
    else:
        assert out["step"] == 6 and 0.0 <= out["eval/accuracy"] <= 1.0
    assert (tmp_path / "checkpoints" / "6").is_dir()


def test_configs_run_elsewhere_are_run_there():
    for name, test_file in RUN_ELSEWHERE.items():
        assert name in ALL_CONFIGS and f'"{name}"' in (CONFIGS.parent / test_file).read_text(), name


def test_the_simmim_fashion_mnist_stages():
    """configs/simmim_fashion_mnist.py (run tiny above): pretraining on every training image without labels, then
    fine-tuning (layer decay, from `init`) or training from scratch on the first 10% with labels."""
    pre, fine, scratch = (config("simmim_fashion_mnist", arg) for arg in
                          ("stage=pretrain", "stage=finetune,init=/tmp/pre/checkpoints/1000", "stage=scratch"))
    assert pre.simmim.mask_patch_size == 8 and pre.input.split == "train" and not pre.model_init
    assert fine.input.split == scratch.input.split == "train[:10%]" and "simmim" not in fine
    assert fine.model_init == "/tmp/pre/checkpoints/1000" and fine.layer_decay == 0.75 and "layer_decay" not in scratch
    assert fine.total_steps == scratch.total_steps and fine.model == scratch.model
    with pytest.raises(ValueError, match="config arg stage: 'probe' is not one of"):
        config("simmim_fashion_mnist", "stage=probe")
