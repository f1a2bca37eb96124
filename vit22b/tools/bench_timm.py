"""timm's side of `python -m vit22b.tools.bench --vs=timm`: one JSON line for a timm model's train step (or forward)
on the CPU, with the same batch, image size and dtype (bfloat16 = torch.autocast) and all CPU threads.

  python -m vit22b.tools.bench_timm --model=vit_base_patch16_224 --batch=8 --image_size=224 --dtype=float32

With --serve it stays up after the warm-up and times one step per line on stdin, so that `vit22b.tools.bench --pairs`
can alternate single steps of the two frameworks.
"""
import argparse
import json
import os
import sys
import time

from vit22b.tools import host_cpu, hugepages


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--forward", action="store_true")
    p.add_argument("--serve", action="store_true",
                   help="after the warm-up, print a ready line, then time one step per line read from stdin and "
                        "print its seconds (vit22b.tools.bench --pairs)")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error(f"--steps={a.steps}; at least one step must be timed")

    import numpy as np
    import timm
    import torch
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    model = timm.create_model(a.model, pretrained=False, num_classes=1000, img_size=a.image_size)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size)
    y = torch.randint(0, 1000, (a.batch,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bfloat16")

    def step():
        if a.forward:
            with torch.no_grad(), autocast:
                model(x)
            return
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    model.eval() if a.forward else model.train()
    if a.serve:
        serve(step, a.warmup, a.model)
        return
    times = []
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            before = hugepages.usage()
        t = time.perf_counter()
        step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    host_time = hugepages.per_step(before, hugepages.usage(), a.steps)
    step_s = float(np.median(times))
    print(json.dumps({"framework": "timm", "model": a.model, "mode": "forward" if a.forward else "train",
                      "batch": a.batch, "image_size": a.image_size, "dtype": a.dtype, "threads": torch.get_num_threads(),
                      "host_memory": hugepages.status(), "host_cpu": host_cpu.info()["model"],
                      "torch": torch.__version__, "timm": timm.__version__,
                      "step_s": {"median": round(step_s, 4), "min": round(float(np.min(times)), 4),
                                 "steps": len(times)},
                      "img_per_s": round(a.batch / step_s, 3), "host_time_per_step": host_time}), flush=True)


def serve(step, warmup, name):
    """Warm up, say so, then time one step for each line read from stdin until its end."""
    for _ in range(warmup):
        step()
    print(json.dumps({"ready": name}), flush=True)
    for _ in sys.stdin:
        t = time.perf_counter()
        step()
        print(json.dumps({"step_s": time.perf_counter() - t}), flush=True)


if __name__ == "__main__":
    main()
