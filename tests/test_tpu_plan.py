"""`--dry_run --topology`: the train step compiled by libtpu's TPU compiler for a TPU topology, on this CPU host
(vit22b/parallel/tpu.py, vit22b/parallel/planner.py)."""
import json
import subprocess
import sys

from conftest import CONFIGS, REPO, cpu_env, run_main

GIB = 2 ** 30


def plans(*cases):
    """plan.json of each (config name, overrides) compiled for v5p:2x2x1 (4 chips) in one subprocess."""
    script = f"""
import json, sys
sys.path.insert(0, {str(REPO / 'tests')!r})
from conftest import config
from vit22b.parallel import planner
out = []
for i, (name, overrides) in enumerate({list(cases)!r}):
    out.append(planner.plan(config(name, **overrides), f"/tmp/unused", topology="v5p:2x2x1"))
print("PLANS" + json.dumps(out))
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("PLANS", 1)[1])


def check_plan(p, mesh):
    assert p["platform"] == "tpu" and p["mesh"] == mesh and p["devices"] == 4
    t = p["target"]
    assert t["topology"] == "v5p:2x2x1" and t["chip"] == "v5p" and t["chips"] == 4 and t["device_kind"] == "TPU v5"
    assert t["hbm_bytes_per_chip"] == 95 * GIB and t["peak_bf16_flops_per_chip"] == 459e12
    # Every mesh axis of size > 1 runs along the torus; the model axis along one dimension: a ring.
    assert set(t["mesh_ici_axes"]) == {a for a, n in mesh.items() if n > 1} and len(t["mesh_ici_axes"]["model"]) == 1
    c = p["compiler"]
    m = c["bytes_per_device"]
    assert m["arguments"] > 0 and m["temporaries"] > 0 and 0 < m["aliased"] <= m["outputs"]
    assert m["peak"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["generated_code"]
    assert p["fits"] is True and m["peak"] < GIB and c["compile_seconds"] > 0
    # Parameters and optimizer state are the donated arguments (plus the batch), split over the mesh.
    assert m["arguments"] >= p["bytes_per_device"]["parameters"] + p["bytes_per_device"]["optimizer"]
    # Every layer counted: at least the scanned program's count, which has the stacked layers' body once.
    assert c["flops_per_device"] >= p["flops_per_step"] / 4 > 0 and c["bytes_accessed_per_device"] > 0
    f = p["roofline"]
    assert f["step_seconds_lower_bound"] == max(f["compute_seconds"], f["memory_seconds"]) > 0
    assert f["compute_seconds"] == c["flops_per_device"] / 459e12
    return c


def test_vit22b_design_compiles_for_a_tpu_topology(tmp_path):
    r = run_main(f"{CONFIGS}/vit22b_jft.py:runlocal", tmp_path, "--config.mesh=data:2,model:2", "--dry_run",
                 "--topology=v5p-8")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "= 4 devices of v5p:2x2x1 (4 TPU v5 chips)" in r.stdout and "compiled for tpu in" in r.stdout
    assert "fits in 95.0 GiB per device: yes" in r.stdout and "roofline per step" in r.stdout
    p = json.loads((tmp_path / "plan.json").read_text())
    assert p["target"]["requested"] == "v5p-8"
    c = check_plan(p, {"data": 2, "fsdp": 1, "model": 2})
    # The asynchronous parallel linear ops are rings of collective-permutes in the TPU program.
    assert p["collectives"]["collective-permute"] >= 4
    # The compiled FLOPs (whole step, optimizer included) are close to the analytic 3 x forward count.
    assert 1.0 < c["flops_per_step"] / p["analytic"]["flops_per_step"] < 1.6
    assert 0 < p["roofline"]["mfu_upper_bound"] < 1


def test_vit_and_pallas_attention_on_tpu_meshes():
    fsdp, xla, deep_scanned, deep_unrolled, pallas = plans(
        ("vit22b_jft", {"mesh": "fsdp:2,model:2", "model.scan": False}),
        ("vit22b_jft", {"mesh": "data:2,model:2", "model.parallel_linear": "xla", "model.scan": False}),
        ("vit22b_jft", {"mesh": "data:4", "model.depth": 3}),
        ("vit22b_jft", {"mesh": "data:4", "model.depth": 3, "model.scan": False}),
        # 32 px in patches of 2: 256 tokens, which the Pallas TPU flash kernel takes.
        ("vit22b_jft", {"mesh": "data:2,model:2", "input.image_size": 32, "model.attention_impl": "pallas",
                        "model.scan": False}),
    )
    check_plan(fsdp, {"data": 1, "fsdp": 2, "model": 2})
    # fsdp gathers the parameters and reduce-scatters their gradients (libtpu's all-reduce-scatter fusions).
    assert fsdp["collectives"]["collective-permute"] >= 4 and fsdp["collectives"]["all-gather"] > 0
    assert fsdp["collectives"]["reduce-scatter"] > 0
    check_plan(xla, {"data": 2, "fsdp": 1, "model": 2})
    assert xla["collectives"]["collective-permute"] == 0  # XLA's own collectives: no ring
    # Three scanned layers: their cost from two unrolled compiles (depth 2 and 4) equals the three-layer
    # unrolled program's, though XLA's cost analysis of the scanned program counts one layer.
    assert deep_scanned["compiler"]["cost_compiles"] == 2 and deep_unrolled["compiler"]["cost_compiles"] == 0
    for key in ("flops_per_device", "bytes_accessed_per_device"):
        assert abs(deep_scanned["compiler"][key] / deep_unrolled["compiler"][key] - 1) < 0.02, key
    assert deep_scanned["flops_per_step"] < 0.7 * deep_unrolled["flops_per_step"]
    # The Pallas kernel: forward and two backward kernels (dK/dV, dQ) in each of the two blocks' attention and
    # the MAP head's.
    assert xla["pallas_kernels"] == 0 and pallas["pallas_kernels"] == 9 and pallas["fits"]


def test_swinv2_compiles_for_tpu_meshes():
    # Two stages of one block: window attention with its position bias, the patch merging between stages.
    base = {"model.scan": False, "input.batch_size": 8, "input.image_size": 16, "model.depths": (1, 1),
            "model.num_heads": (2, 4), "model.pretrained_window_sizes": (0, 0)}
    data_model, fsdp_model = plans(("swinv2_imagenet", dict(base, mesh="data:2,model:2")),
                                   ("swinv2_imagenet", dict(base, mesh="fsdp:2,model:2")))
    check_plan(data_model, {"data": 2, "fsdp": 1, "model": 2})
    check_plan(fsdp_model, {"data": 1, "fsdp": 2, "model": 2})
    assert fsdp_model["collectives"]["all-gather"] > data_model["collectives"]["all-gather"]
    assert "mfu_upper_bound" not in data_model["roofline"]  # no analytic FLOPs for Swin V2 (yet)
    assert 0 < data_model["params_block_matmuls"] < data_model["params_blocks"] < data_model["params_total"]


def test_unknown_topology_is_one_line_naming_the_known_ones(tmp_path):
    r = run_main(f"{CONFIGS}/vit22b_jft.py:runlocal", tmp_path, "--dry_run", "--topology=v5q-8")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    line, = r.stderr.strip().splitlines()
    assert line.startswith("error: --topology: unknown TPU topology 'v5q-8'; known: v4:SHAPE, v5e:SHAPE, v5p:SHAPE")
    assert "v4-256" in line and "v5p-512" in line and "v5e-256" in line
    r = run_main(f"{CONFIGS}/vit22b_jft.py:runlocal", tmp_path, "--topology=v4-8")
    assert r.returncode != 0 and "--topology plans a TPU program: it needs --dry_run" in r.stderr
