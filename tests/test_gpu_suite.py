"""`python -m vit22b.tools.gpu_suite`: the accelerator suite's rows, kernel choice, fit search and table, at toy
sizes on the CPU (its numbers need a GPU; docs/performance.md)."""
import json
import sys

from vit22b.tools import bench, gpu_suite


def test_suite_times_real_steps_and_prints_the_table(tmp_path, capsys, monkeypatch):
    out = tmp_path / "suite.json"
    monkeypatch.setattr(sys, "argv", ["gpu_suite", "--tiny", "--rows=vit22b_b16", "--steps=2", f"--out={out}"])
    gpu_suite.main()
    r = capsys.readouterr()
    lines = [json.loads(x) for x in r.out.splitlines() if x.startswith("{")]
    assert lines[0]["versions"]["jax"] and lines[0]["versions"]["platform"] == "cpu"
    rows = lines[1:]
    assert [(x["row"], x["attention_impl"]) for x in rows] == [("vit22b_b16", "xla")]
    for x in rows:  # a CPU has no cuDNN and no datasheet peak here
        assert x["img_per_s"] > 0 and x["dtype"] == "bfloat16" and x["variant"].endswith("(tiny)")
        assert x["mfu_datasheet"] is None and 0 < x["mfu_measured_ceiling"] < 1.5
    saved = json.loads(out.read_text())
    assert saved == {"versions": lines[0]["versions"], "results": rows}  # one kernel ran: none is marked best
    assert "| ViT-22B design at B/16, 224 px | B/16 (tiny), remat none | xla | 4 |" in r.out


def test_largest_row_takes_the_first_setting_that_fits_and_marks_the_faster_kernel(monkeypatch):
    tried = []

    def fake_bench(config, steps, memory_limit):
        setting = (config.model.variant, config.model.remat_policy, config.model.attention_impl)
        tried.append(setting)
        if setting[1] == "none":
            raise bench.DoesNotFit(90 * 2**30, memory_limit)
        step = 0.5 if setting[2] == "cudnn" else 1.0
        return {"variant": setting[0], "batch": 256, "image_size": 224, "dtype": "bfloat16", "compile_s": 1.0,
                "step_s": {"median": step}, "img_per_s": 256 / step, "achieved_gflop_per_s": 4e5 / step,
                "matmul_ceiling_gflop_per_s": {"bfloat16": 8e5}, "peak_memory_bytes": 2**30, "mfu": 0.5 / step}

    monkeypatch.setattr(gpu_suite.bench, "bench", fake_bench)
    monkeypatch.setattr(gpu_suite, "attention_kernels", lambda config: ["xla", "cudnn"])
    results = gpu_suite.run(["vit22b_largest"], memory_limit=80 * 2**30, log=lambda s: None)
    # Each kernel walks the settings: g/14 without remat does not fit, with dots_no_batch it does; H/14 and full
    # are never tried.
    assert tried == [("g/14", "none", "xla"), ("g/14", "dots_no_batch", "xla"), ("g/14", "none", "cudnn"),
                     ("g/14", "dots_no_batch", "cudnn")]
    assert [(r["remat_policy"], r["attention_impl"], r.get("skipped"), r.get("best")) for r in results] == [
        ("none", "xla", "needs 90.0 GiB of 80.0 GiB", None), ("dots_no_batch", "xla", None, None),
        ("none", "cudnn", "needs 90.0 GiB of 80.0 GiB", None), ("dots_no_batch", "cudnn", None, True)]
    assert "not run: needs 90.0 GiB of 80.0 GiB" in gpu_suite.table(results)
    # Nothing starts once the budget is spent; every run is reported as not run.
    spent = gpu_suite.run(["vit_b16_classic"], budget_s=-1, memory_limit=1, log=lambda s: None)
    assert [r["skipped"] for r in spent] == ["budget of -1 s spent"] * 2 and len(tried) == 4


def test_datasheet_peaks_by_device_kind():
    assert gpu_suite.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_suite.datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_suite.datasheet_peak("NVIDIA H200") == 989e12
    assert gpu_suite.datasheet_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_suite.datasheet_peak("NVIDIA L40") == 181e12 and gpu_suite.datasheet_peak("NVIDIA L4") == 121e12
    assert gpu_suite.datasheet_peak("TPU v4") == 275e12
    assert gpu_suite.datasheet_peak("cpu") is None
