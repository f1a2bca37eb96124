"""Paper-scale TPU plans (docs/tpu_plans.md), compiled by libtpu's TPU compiler on this host, no TPU needed:

  python -m vit22b.tools.tpu_plans vit22b    # ViT-22B/14: HBM per chip by remat_policy x parallel_linear,
                                             # and the largest batch per chip that fits
  python -m vit22b.tools.tpu_plans swinv2g   # SwinV2-G at 640 px (window 40) on v4 and v5p slices

Each cell is one `python -m vit22b.main --dry_run --topology=...` plan (vit22b/parallel/planner.py); the table
says which command reproduces it. Prints markdown tables.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's backend; the TPU devices come from libtpu

import argparse  # noqa: E402
import tempfile  # noqa: E402

from vit22b.config_args import load_config  # noqa: E402
from vit22b.parallel import planner  # noqa: E402

GIB = 2 ** 30
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def plan(config_spec, topology, roofline=False, **overrides):
    config = load_config(config_spec)
    config.update_from_flattened_dict(overrides)
    with tempfile.TemporaryDirectory() as workdir:
        return planner.plan(config, workdir, topology=topology, roofline=roofline)


def cell(r):
    """HBM per chip as the TPU compiler sees it: the peak of a program that compiled, or what one it refused
    needed (arguments and temporaries)."""
    c = r["compiler"]
    if "hbm_oom" in c:
        return f"does not fit: needs {c['hbm_oom']['needed'] / GIB:.1f} GiB"
    return f"{c['bytes_per_device']['peak'] / GIB:.1f} GiB ({c['compile_seconds']:.0f} s)"


def largest_batch_per_chip(config_spec, topology, chips, start, **overrides):
    """Doubling from `start` images per chip until the compiler refuses, then bisecting: the largest batch per
    chip whose step fits the chip's HBM."""
    def ok(per_chip):
        r = plan(config_spec, topology, **{"input.batch_size": per_chip * chips}, **overrides)
        print(f"  batch {per_chip} per chip: {cell(r)}", flush=True)
        return r["fits"]
    lo, hi = 0, start
    while ok(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def vit22b(args):
    spec = f"{REPO}/configs/vit22b_jft.py:batch={args.batch}"
    chips = planner.tpu.describe(args.topology)
    print(f"ViT-22B/14, batch {args.batch} on {args.topology} ({chips[0]}), mesh {args.mesh}: HBM per chip "
          f"(compile time here)\n")
    print("| `remat_policy` | `parallel_linear='xla'` | `parallel_linear='collective'` |\n|---|---|---|")
    results = {}
    for remat in ("none", "dots_no_batch", "full"):
        row = []
        for linear in ("xla", "collective"):
            r = results[remat, linear] = plan(spec, args.topology, mesh=args.mesh, roofline=(
                remat, linear) == ("dots_no_batch", "collective"), **{
                "model.remat_policy": remat, "model.parallel_linear": linear})
            row.append(cell(r))
        print(f"| `{remat}` | " + " | ".join(row) + " |", flush=True)
    r = results["dots_no_batch", "collective"]
    if "roofline" in r:
        f = r["roofline"]
        print(f"\nThe config's setting (dots_no_batch, collective): {r['compiler']['flops_per_step'] / 1e15:.1f} PFLOP "
              f"per step compiled ({r['analytic']['flops_per_step'] / 1e15:.1f} analytic); roofline "
              f"{f['step_seconds_lower_bound']:.2f} s per step, {f['bound_by']}-bound, MFU at most "
              f"{100 * f['mfu_upper_bound']:.1f}%")
    devices = r["devices"]
    print("\nLargest batch per chip that fits:")
    for remat in ("dots_no_batch", "full"):
        n = largest_batch_per_chip(spec, args.topology, devices, max(1, args.batch // devices),
                                   mesh=args.mesh, **{"model.remat_policy": remat})
        print(f"- `remat_policy='{remat}'`, collective: {n} images per chip (global batch {n * devices})",
              flush=True)


def swinv2g(args):
    print(f"SwinV2-G at 640 px, window 40, batch {args.batch}, mesh {args.mesh}: HBM per chip (compile time "
          f"here)\n")
    print("| slice | `remat_policy='full'` | `full` + `attn_chunks=4` |\n|---|---|---|")
    spec = f"{REPO}/configs/swinv2_imagenet.py:variant=G,img=640,window=40,batch={args.batch}"
    for topology in args.slices.split(","):
        row = [cell(plan(spec, topology, mesh=args.mesh, **{"model.remat_policy": "full",
                                                           "model.attn_chunks": chunks}))
               for chunks in (1, 4)]
        print(f"| {topology} | " + " | ".join(row) + " |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="which", required=True)
    v = sub.add_parser("vit22b")
    v.add_argument("--topology", default="v4-8192")
    v.add_argument("--mesh", default="fsdp:512,model:8")
    v.add_argument("--batch", type=int, default=65_536)
    s = sub.add_parser("swinv2g")
    s.add_argument("--slices", default="v4-128,v5p-128")
    s.add_argument("--mesh", default="fsdp:64")
    s.add_argument("--batch", type=int, default=576)
    args = p.parse_args()
    {"vit22b": vit22b, "swinv2g": swinv2g}[args.which](args)


if __name__ == "__main__":
    main()
