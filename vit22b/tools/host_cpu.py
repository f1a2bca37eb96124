"""The host CPU's model and whether it multiplies bf16 matrices in hardware, which decides how the opt-in CPU
kernels' `dense` (vit22b/models/cpu/layers.py, model.impl='cpu') runs bf16; the bench reports both.

XLA:CPU's bf16 x bf16 -> float32 dot is fast only where the CPU has bf16 dot-product instructions (x86
AVX512-BF16 or AMX-BF16, Arm's BF16 extension). Measured on an AMD EPYC without them (Zen 3, 2 cores,
2026-11-27): that dot ran at about 90 GFLOP/s on a 2048^3 product, while converting both operands to float32 and
multiplying in float32 ran at 113-156 GFLOP/s on the ViT-B/16 layer shapes. On the Zen 4 the README's table was
measured on, the bf16 dot runs at about 390 GFLOP/s, twice float32's speed.

That `dense` therefore multiplies bf16 operands as float32 on a CPU whose /proc/cpuinfo lists none of those
instructions. The result is the same to float32 rounding: a product of two bf16 numbers is exact in float32, and
both forms accumulate in float32. VIT22B_BF16_DOTS=native or =float32 overrides the choice; where the CPU cannot
be read (no /proc/cpuinfo), bf16 dots stay native.
"""
import functools
import os
import platform

ENV = "VIT22B_BF16_DOTS"
MODES = ("auto", "native", "float32")
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 `flags`; `bf16` is Arm's `Features` name


def describe(cpuinfo):
    """{"model": name, "bf16_matmul_instructions": True / False / None (unknown)} from /proc/cpuinfo's text."""
    model, flags = None, None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and flags is None:
            flags = set(value.split())
    return {"model": model or platform.processor() or platform.machine(),
            "bf16_matmul_instructions": None if flags is None else bool(flags & BF16_FLAGS)}


@functools.lru_cache(maxsize=1)
def info():
    try:
        with open("/proc/cpuinfo") as f:
            return describe(f.read())
    except OSError:
        return describe("")


def bf16_dots_mode(backend):
    """"native" (bf16 operands into the dot) or "float32" (operands converted first) for programs compiled for
    `backend`: float32 on a CPU known to lack bf16 instructions, unless VIT22B_BF16_DOTS says otherwise."""
    mode = os.environ.get(ENV, "auto")
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "auto":
        return "float32" if backend == "cpu" and info()["bf16_matmul_instructions"] is False else "native"
    return mode
