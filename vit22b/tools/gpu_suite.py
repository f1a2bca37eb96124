"""The accelerator benchmark suite: one command, the rows our performance goals are set on (issue 27).

  python -m vit22b.tools.gpu_suite                       # all rows, about eight minutes on one H100 / H200
  python -m vit22b.tools.gpu_suite --rows=vit_b16_classic,swinv2_t8 --out=suite.json
  python -m vit22b.tools.gpu_suite --tiny                # the same plumbing at toy sizes (the CPU test runs this)

Every row is the real jitted, donated train step of a config in configs/ (vit22b/tools/bench.py's `bench`), bf16,
on one device: classic ViT-B/16 and the ViT-22B design at B/16 and L/16 (224 px, batch 256), the ViT-22B design at
the largest size that fits (g/14 first, its remat_policy chosen: the first of none, dots_no_batch, full whose
compiled peak fits the device's memory, then H/14 the same way), SwinV2-T/8 and SwinV2-B/16 at 256 px. Each row
runs with every attention kernel that can run it ('xla', and 'cudnn' on an NVIDIA GPU) and marks the faster.
It prints a JSON line per run, then a markdown table: img/s, achieved TFLOP/s (3 x the analytic forward), MFU
against the 8192^3 bf16 matmul ceiling measured in the same process and against the datasheet peak of the
detected chip; and the versions (jax, jaxlib, CUDA runtime and driver, cuDNN). Runs left when --budget_s is spent
are reported as not run.
"""
import argparse
import gc
import json
import os
import time

import jax

from vit22b import config_args
from vit22b.models import attention
from vit22b.parallel import tpu
from vit22b.tools import bench

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense bf16 peak per device (NVIDIA datasheets, without sparsity), matched against JAX's device_kind in this
# order (a PCIe or NVL card before the SXM part of the same name).
GPU_PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("GH200", 989e12),
             ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("B200", 2250e12), ("B100", 1750e12),
             ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10", 125e12))


def datasheet_peak(device_kind):
    """Dense bf16 FLOP/s of one device of this kind (TPU chips from vit22b/parallel/tpu.py), or None."""
    if device_kind in tpu.CHIPS:
        return tpu.CHIPS[device_kind].peak_bf16_flops
    return next((peak for name, peak in GPU_PEAKS if name.lower() in device_kind.lower()), None)


def versions():
    """jax, jaxlib, the device (its platform_version names the CUDA driver on GPUs), and the versions of the
    installed JAX plugin and NVIDIA wheels (CUDA runtime, cuDNN, cuBLAS) that `jax[cuda]` brings."""
    import importlib.metadata
    import re

    import jaxlib
    device = jax.devices()[0]
    wanted = re.compile(r"(jax-cuda\d+-(plugin|pjrt)|libtpu|nvidia-(cudnn|cublas|cuda-runtime|cuda-nvcc|nccl)\S*)$")
    packages = {d.metadata["Name"].lower(): d.version for d in importlib.metadata.distributions()
                if d.metadata["Name"] and wanted.match(d.metadata["Name"].lower())}
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "platform": device.platform,
            "device_kind": device.device_kind, "platform_version": device.client.platform_version,
            "packages": dict(sorted(packages.items()))}


def vit(variant, design, batch=256, remat="none"):
    spec = "vit22b_jft.py" if design == "vit22b" else "vit_imagenet.py"
    return {"config": f"{spec}:variant={variant}", "overrides": {
        "input.batch_size": batch, "input.image_size": 224, "mesh": "data:-1", "model.remat_policy": remat,
        "model.dtype": "bfloat16", **({"model.parallel_linear": "xla"} if design == "vit22b" else {})}}


def swin(variant, window, batch=256):
    return {"config": f"swinv2_imagenet.py:variant={variant},window={window},batch={batch}",
            "overrides": {"mesh": "data:-1", "model.dtype": "bfloat16"}}


# Row name -> its label and candidate settings, the first that fits the device taken.
ROWS = {
    "vit_b16_classic": ("ViT-B/16 classic, 224 px", [vit("B/16", "classic")]),
    "vit22b_b16": ("ViT-22B design at B/16, 224 px", [vit("B/16", "vit22b")]),
    "vit22b_l16": ("ViT-22B design at L/16, 224 px", [vit("L/16", "vit22b")]),
    "vit22b_largest": ("ViT-22B design, largest that fits", [
        vit(v, "vit22b", remat=r) for v in ("g/14", "H/14") for r in ("none", "dots_no_batch", "full")]),
    "swinv2_t8": ("SwinV2-T/8, 256 px", [swin("T", 8)]),
    "swinv2_b16": ("SwinV2-B/16, 256 px", [swin("B", 16)]),
}

# --tiny: every row's plumbing at toy sizes, for the CPU (the shapes keep each family's structure).
TINY = {
    "vit": {"model.width": 32, "model.depth": 2, "model.mlp_dim": 64, "model.num_heads": 2, "model.patch_size": 8,
            "input.image_size": 32, "input.batch_size": 4},
    "swinv2": {"model.embed_dim": 16, "model.depths": (1, 1, 2, 1), "model.num_heads": (1, 1, 2, 2),
               "model.patch_size": 2, "model.window_size": 4, "input.image_size": 32, "input.batch_size": 4},
}


def load(candidate, tiny=False):
    config = config_args.load_config(f"{REPO}/configs/{candidate['config']}")
    for key, value in {**candidate["overrides"], **(TINY[config.model_name] if tiny else {})}.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value  # also keys a config leaves to its variant (vit_imagenet's model.width)
    return config


def attention_kernels(config):
    """'xla', and 'cudnn' on an NVIDIA GPU in bf16. The probe's shapes (head_dim 8, length 2) pass cuDNN's shape
    rules, so only the platform and dtype decide here; whether cuDNN takes every attention of the model, the
    model checks when the explicit 'cudnn' is resolved (a ValueError naming model.attention_impl)."""
    reason = attention.cudnn_unsupported(config.model.dtype, 8, 2, 2, False)
    return ["xla"] if reason else ["xla", "cudnn"]


def run(names, steps=10, budget_s=480.0, tiny=False, memory_limit=None, log=print):
    """The suite's results: one dict per (row, attention kernel) that ran, or that did not with `skipped` saying
    why (does not fit, no time left, the kernel refused the config, the run failed). Each kernel walks the row's
    candidate settings on its own and takes the first that fits; `best` marks the faster kernel where two ran.
    `log` gets each result as a JSON line as soon as it is known."""
    start = time.perf_counter()
    device = jax.devices()[0]
    if memory_limit is None:
        memory_limit = (device.memory_stats() or {}).get("bytes_limit")
    peak = datasheet_peak(device.device_kind)
    results = []

    def note(result):
        results.append(result)
        log(json.dumps(result))

    for name in names:
        label, candidates = ROWS[name]
        for kernel in attention_kernels(load(candidates[0], tiny)):
            for candidate in candidates:
                config = load(candidate, tiny)
                config.model.attention_impl = kernel
                row = {"row": name, "label": label, "config": candidate["config"],
                       "remat_policy": config.model.remat_policy, "attention_impl": kernel}
                if time.perf_counter() - start > budget_s:
                    note(row | {"skipped": f"budget of {budget_s:.0f} s spent"})
                    break
                try:
                    r = bench.bench(config, steps=steps, memory_limit=memory_limit)
                except bench.DoesNotFit as e:
                    needed, limit = e.args
                    note(row | {"skipped": f"needs {needed / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB"})
                    continue
                except ValueError as e:
                    if not str(e).startswith("model.attention_impl"):  # a bug, not a kernel that cannot run here
                        raise
                    note(row | {"skipped": str(e)})
                    break
                except jax.errors.JaxRuntimeError as e:  # e.g. out of memory beyond the compiled estimate
                    note(row | {"skipped": f"failed: {' '.join(str(e).split())[:200]}"})
                    continue
                finally:
                    gc.collect()
                    jax.clear_caches()
                note(row | {"variant": r["variant"] + (" (tiny)" if tiny else ""), **{k: r[k] for k in (
                    "batch", "image_size", "dtype", "compile_s", "step_s", "img_per_s", "achieved_gflop_per_s",
                    "matmul_ceiling_gflop_per_s", "peak_memory_bytes")}, "mfu_measured_ceiling": r["mfu"],
                    "datasheet_peak_tflop_per_s": peak and peak / 1e12,
                    "mfu_datasheet": peak and round(r["achieved_gflop_per_s"] * 1e9 / peak, 3)})
                break
    for name in names:  # the faster kernel of each row, where more than one ran
        ran = [r for r in results if r["row"] == name and "img_per_s" in r]
        if len(ran) > 1:
            max(ran, key=lambda r: r["img_per_s"])["best"] = True
    return results


def table(results):
    lines = ["| row | model | attention | batch | img/s | TFLOP/s | MFU (measured ceiling) | MFU (datasheet) | "
             "compile s | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        attn = r["attention_impl"] + (" (best)" if r.get("best") else "")
        if "skipped" in r:
            reason = " ".join(r["skipped"].replace("|", "/").split())  # one table cell
            lines.append(f"| {r['label']} | {r['config']} {r['remat_policy']} | {attn} | | not run: {reason} "
                         f"| | | | | |")
            continue
        mfu_ds = "" if r["mfu_datasheet"] is None else f"{r['mfu_datasheet']:.3f}"
        lines.append(f"| {r['label']} | {r['variant']}, remat {r['remat_policy']} | {attn} | {r['batch']} | "
                     f"{r['img_per_s']:,.0f} | {r['achieved_gflop_per_s'] / 1e3:.1f} | {r['mfu_measured_ceiling']:.3f} "
                     f"| {mfu_ds} | {r['compile_s']:.0f} | {r['peak_memory_bytes'] / 2**30:.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run, after 2 warm-up steps")
    p.add_argument("--budget_s", type=float, default=480.0, help="no new run starts after this many seconds")
    p.add_argument("--tiny", action="store_true", help="toy sizes: the suite's plumbing on a CPU")
    p.add_argument("--memory_limit_gib", type=float, default=None,
                   help="device memory to fit (default: what the device reports)")
    p.add_argument("--out", default="", help="also write the versions and results here as JSON")
    args = p.parse_args()
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; known: {', '.join(ROWS)}")
    env = versions()
    print(json.dumps({"versions": env}), flush=True)
    limit = None if args.memory_limit_gib is None else args.memory_limit_gib * 2**30
    so_far = []

    def log(line):  # each result printed, and the --out file rewritten, as soon as it is known
        print(line, flush=True)
        so_far.append(json.loads(line))
        save(so_far)

    def save(results):
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"versions": env, "results": results}, f, indent=1)

    results = run(names, args.steps, args.budget_s, args.tiny, limit, log=log)
    save(results)  # with the `best` marks
    print(f"\n{env['device_kind']}, jax {env['jax']}\n\n{table(results)}", flush=True)


if __name__ == "__main__":
    main()
