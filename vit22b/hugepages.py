"""Transparent huge pages for the host allocator, which the command-line entry points turn on at startup.

XLA:CPU mallocs each step's temporaries afresh. glibc serves blocks over 32 MiB with new mmaps, so every
step faults every temporary page back in, 4 KiB at a time. SwinV2-T in float32 at batch 8 takes 527k page
faults, about a second of kernel time per 3 s step on 2 cores.

glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35 and later) marks those mappings for transparent huge
pages. Each fault then brings in 2 MiB: 3k faults per step, and the step is 3-12% faster (README,
Performance). Tunables are read only when a process starts, so `python -m vit22b.main` and
`python -m vit22b.bench` re-execute themselves once with it set.

Opt out with VIT22B_HUGE_PAGES=0. In a notebook, start Jupyter with GLIBC_TUNABLES=glibc.malloc.hugetlb=1.

Huge pages cut the faults, not the kernel's zeroing of every fresh page, which remains: `usage` and `per_step`
let the bench report the system CPU time and page faults of each step (README, Performance).
"""
import os
import resource
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "VIT22B_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version():
    """(major, minor), or None when the C library is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def thp_mode():
    """The kernel's transparent-huge-page mode: 'always', 'madvise', 'never', or None if it has none."""
    try:
        with open(THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def status():
    """What the bench prints: whether this process's allocator asks for huge pages, and the kernel's mode."""
    on = f"{TUNABLE}=1" in os.environ.get("GLIBC_TUNABLES", "").split(":")
    return {"malloc_hugetlb": on, "thp": thp_mode()}


def reexec_with_huge_pages():
    """Re-execute this process with glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES, unless it is already
    there, the user opted out, or it cannot help here (not glibc 2.35+, or the kernel's THP mode is 'never')."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:  # set already (by us before the exec, or by the user to any value)
        return
    version = glibc_version()
    if version is None or version < (2, 35) or thp_mode() in (None, "never"):
        return
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def usage():
    """(user CPU seconds, system CPU seconds, page faults) of this process so far, all threads together."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt + r.ru_majflt


def per_step(before, after, steps):
    """What the bench prints as `host_time_per_step`: the `usage()` difference over `steps` steps, per step."""
    user, system, faults = (b - a for a, b in zip(before, after))
    return {"user_cpu_s": round(user / steps, 4), "system_cpu_s": round(system / steps, 4),
            "page_faults": round(faults / steps)}
