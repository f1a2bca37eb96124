"""`python -m vit22b.bench`: the JSON line's fields are present and sane (a regression guard, not a timing test)."""
import json
import os
import subprocess
import sys

from conftest import CONFIGS, REPO


def _json_lines(cmd):
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]


def test_bench_prints_a_sane_json_line():
    (row,) = _json_lines([sys.executable, "-m", "vit22b.bench", f"--config={CONFIGS}/vit22b_digits.py:runlocal",
                          "--config.input.batch_size=16", "--steps=5"])
    assert row["framework"] == "vit22b" and row["mode"] == "train" and row["batch"] == 16
    assert row["variant"] == "width64-depth4-patch2" and row["dtype"] == "float32" and row["devices"] == 1
    assert row["compile_s"] > 0 and row["step_s"]["steps"] == 5
    assert 0 < row["step_s"]["min"] <= row["step_s"]["median"]
    assert abs(row["img_per_s"] - 16 / row["step_s"]["median"]) < 0.01 * row["img_per_s"]
    # XLA's count of the unrolled forward and the analytic count agree within 25% (XLA adds norms, softmax...).
    g = row["gflops_per_img"]
    assert g["analytic"] > 0 and 0.8 < g["xla"] / g["analytic"] < 1.25
    assert abs(row["achieved_gflop_per_s"] - 3 * g["analytic"] * row["img_per_s"]) < 0.01 * row["achieved_gflop_per_s"] + 0.1
    c = row["matmul_ceiling_gflop_per_s"]
    assert c["float32"] > 1 and c["bfloat16"] > 1
    assert abs(row["mfu"] - row["achieved_gflop_per_s"] / c["float32"]) < 0.002 and 0 < row["mfu"] < 1.5
    assert row["peak_memory_bytes"] > 0


def test_timm_side_prints_a_sane_json_line():
    (row,) = _json_lines([sys.executable, "-m", "vit22b.bench_timm", "--model=vit_tiny_patch16_224",
                          "--image_size=32", "--batch=2", "--steps=2"])
    assert row["framework"] == "timm" and row["model"] == "vit_tiny_patch16_224" and row["batch"] == 2
    assert row["img_per_s"] > 0 and row["step_s"]["steps"] == 2


def test_analytic_flops_match_published_figures():
    from conftest import config
    from vit22b import bench, train
    # SwinV2-T, 256 px, window 8: 5.9 G multiply-adds (Swin V2 paper / timm); ViT-B/16 at 224: 17.6 G.
    swin = config("swinv2_imagenet", arg="variant=T")
    assert abs(bench.swin_forward_flops(train.build_model(swin, 1000), 256) / 2e9 - 5.9) < 0.1
    vit = config("vit_imagenet", arg="variant=B/16")
    assert abs(bench.analytic_forward_flops(vit, train.build_model(vit, 1000), 1000, 3) / 2e9 - 17.6) < 0.2
