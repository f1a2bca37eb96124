"""`--dry_run`: compile the full train step for a target mesh from abstract shapes and write plan.json."""
import json

from conftest import CONFIGS, run_main


def test_dry_run_plans_a_mesh_without_allocating(tmp_path):
    r = run_main(f"{CONFIGS}/vit22b_jft.py:variant=B/16,batch=64", tmp_path, "--config.mesh=data:2,model:4",
                 "--dry_run", "--memory_per_device_gib=16")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["devices"] == 8 and plan["mesh"] == {"data": 2, "fsdp": 1, "model": 4}
    assert plan["params_block_matmuls"] == 12 * 12 * 768 ** 2  # B/16: depth * 12 * width^2
    assert plan["params_total"] > plan["params_blocks"] > plan["params_block_matmuls"]
    b = plan["bytes_per_device"]
    assert b["total"] == b["parameters"] + b["optimizer"] + b["temporaries"] and b["temporaries"] > 0
    # Parameters are split over the model axis: each device holds well under the replicated 4 bytes/param.
    assert b["parameters"] < 0.5 * 4 * plan["params_total"]
    # ViT-B/16 at 224 px: 17.6 G multiply-adds forward = 35 GFLOP, x3 for a trained image.
    assert 100e9 < plan["analytic"]["flops_per_image"] < 110e9
    assert plan["fits"] is True and "fits in 16.0 GiB per device: yes" in r.stdout
    assert not (tmp_path / "checkpoints").exists()


def test_dry_run_of_vit22b_on_a_64_device_mesh(tmp_path):
    # The paper's model and sharding (collective rings over the model axis), compiled for 64 simulated devices.
    r = run_main(f"{CONFIGS}/vit22b_jft.py:batch=512", tmp_path, "--config.mesh=fsdp:8,model:8", "--dry_run",
                 "--memory_per_device_gib=32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(21.74B block matmul weights)" in r.stdout and "= 64 devices" in r.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    # Every large parameter is split 64 ways (8 fsdp x 8 model): 22.39B float32 parameters are 1.30 GiB per
    # device; what 8 does not divide stays whole. (3.04 GiB while the MAP head was replicated.)
    assert plan["bytes_per_device"]["parameters"] < 1.1 * 4 * plan["params_total"] / 64
    assert plan["params_block_matmuls"] == 21_743_271_936 and plan["devices"] == 64
    # The paper's 33.64 TFLOP per trained image covers embedding and blocks; the MAP head's probe query, key and
    # value projections over 256 tokens, attention and MLP add 0.11 TFLOP (0.3%).
    d, n, m = 6144, 256, 24576
    head = 3 * (4 * d * d + 4 * n * d * d + 4 * n * d + 4 * d * m)
    assert abs((plan["analytic"]["flops_per_image"] - head) / 33.64e12 - 1) < 1e-3
    b = plan["bytes_per_device"]
    assert 0 < b["temporaries"] and b["total"] == b["parameters"] + b["optimizer"] + b["temporaries"]
    assert plan["fits"] == (b["total"] <= 32 * 2 ** 30)


def test_dry_run_plans_the_reference_program(tmp_path, monkeypatch):
    """The planning host is a CPU; the plan is of what an accelerator runs: the reference layers, also when the
    config asks for the CPU kernels (and whatever this CPU's bf16 instructions)."""
    from conftest import config
    from vit22b.parallel import planner
    from vit22b.train import loop
    seen = []
    real = loop.build_model
    monkeypatch.setattr(loop, "build_model", lambda c, n: seen.append(c.model.impl) or real(c, n))
    monkeypatch.setenv("VIT22B_BF16_DOTS", "float32")
    c = config("vit22b_digits", **{"model.impl": "cpu", "model.dtype": "bfloat16"})
    result = planner.plan(c, str(tmp_path))
    assert seen == ["reference"] and result["impl"] == "reference" and c.model.impl == "cpu"
