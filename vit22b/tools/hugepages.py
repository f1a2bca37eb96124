"""An opt-in for CPU hosts: huge pages and an allocator that keeps freed memory, as `export` lines for a shell.

  eval "$(python -m vit22b.tools.hugepages)"      # then python -m vit22b.main ..., jupyter lab, ...

XLA:CPU mallocs each step's temporaries afresh, as one block (1.4 GB for ViT-B/16's float32 train step at batch
8), and frees it when the step ends. glibc serves blocks over 32 MiB with new mmaps and unmaps them when they are
freed, so every step faults its temporaries back in and the kernel zeroes each page again (up to 0.7-1.1 s of
system CPU per ViT-B/16 float32 step on a 2-core Zen 3; docs/cpu_kernels.md has the measurements).

- glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35 and later) marks those mappings for transparent huge
  pages, so each fault brings in 2 MiB instead of 4 KiB.
- tcmalloc (`libtcmalloc_minimal.so.4`; Debian and Ubuntu: `apt install libtcmalloc-minimal4`) or mimalloc
  (`pip install 'vit22b[cpu]'`, the `cmeel-mimalloc` wheel) keep freed blocks for the next request; mimalloc is
  told to keep freed memory (`MIMALLOC_PURGE_DELAY=-1`) and to use huge pages (`MIMALLOC_ALLOW_LARGE_OS_PAGES=1`).
  tcmalloc is preferred where both are installed (it held less memory resident).

Tunables and LD_PRELOAD are read only when a process starts, so they must be in the environment before Python
is. VIT22B_ALLOCATOR=tcmalloc, mimalloc or system picks the allocator (system: glibc's, with the huge pages;
VIT22B_TCMALLOC=0 is an older spelling of it); VIT22B_HUGE_PAGES=0 plans nothing. Nothing is set on TPU or GPU
hosts unless asked for: it was measured on CPU hosts only. `status`, which the bench prints, says what the
running process uses; `usage` and `per_step` give the bench its CPU time and page faults per step.
"""
import ctypes.util
import importlib.metadata
import os
import resource
import shlex

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "VIT22B_HUGE_PAGES"
ALLOCATOR_CHOICE = "VIT22B_ALLOCATOR"
TCMALLOC_OPT_OUT = "VIT22B_TCMALLOC"  # =0: the older spelling of VIT22B_ALLOCATOR=system
CHOICES = ("tcmalloc", "mimalloc", "system")
# mimalloc's defaults decommit freed memory after 10 ms and use 4 KiB pages; a user's own settings are kept.
MIMALLOC_SETTINGS = {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ALLOW_LARGE_OS_PAGES": "1"}
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")  # malloc replacements, by a word in their file names


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


def find_tcmalloc():
    """The file name of an installed tcmalloc that the dynamic loader can find (the minimal build first), or None."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def find_mimalloc():
    """The path of libmimalloc in the installed `cmeel-mimalloc` wheel, or None."""
    try:
        files = importlib.metadata.distribution("cmeel-mimalloc").files or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    paths = (str(f.locate()) for f in files if f.name.startswith("libmimalloc.so."))
    return next((p for p in paths if os.path.exists(p)), None)


def find_allocator(choice=None):
    """(name, library) of the allocator to preload: the one `choice` names ('tcmalloc' or 'mimalloc'), or by
    default tcmalloc, else mimalloc; None when it is not installed."""
    for name, find in (("tcmalloc", find_tcmalloc), ("mimalloc", find_mimalloc)):
        if choice in (None, name):
            library = find()
            if library:
                return name, library
    return None


def allocator_choice(environ):
    """VIT22B_ALLOCATOR's value ('tcmalloc', 'mimalloc', 'system'), or None for the default."""
    value = environ.get(ALLOCATOR_CHOICE, "")
    if not value:
        return "system" if environ.get(TCMALLOC_OPT_OUT) == "0" else None
    if value not in CHOICES:
        raise ValueError(f"{ALLOCATOR_CHOICE}={value!r}: expected one of {', '.join(CHOICES)}, or unset "
                         "(tcmalloc where installed, else mimalloc where its wheel is, else system)")
    return value


def named_allocator(preload):
    """The malloc replacement that an LD_PRELOAD value names, or None."""
    return next((a for a in ALLOCATORS if a in preload), None)


def loaded_allocator(maps="/proc/self/maps"):
    """The malloc replacement mapped into this process ('tcmalloc', 'jemalloc', 'mimalloc'), or 'system'."""
    try:
        with open(maps) as f:
            libs = {line.split()[-1].rsplit("/", 1)[-1] for line in f if ".so" in line}
    except OSError:
        return "system"
    return next((a for a in ALLOCATORS if any(a in lib for lib in libs)), "system")


def status():
    """What the bench prints: the allocator in use, whether glibc's allocator asks for huge pages, and the
    kernel's THP mode."""
    on = f"{TUNABLE}=1" in os.environ.get("GLIBC_TUNABLES", "").split(":")
    return {"allocator": loaded_allocator(), "malloc_hugetlb": on, "thp": thp_mode()}


def planned_environment(environ, glibc, thp, find=find_allocator):
    """The variables to export ({} for none), given the environment, glibc's version and the THP mode:
    the huge-page tunable unless set already (to any value) or unsupported here, and the allocator that
    `find(allocator_choice(environ))` returns ((name, library) or None) first in LD_PRELOAD, with mimalloc's
    settings, unless LD_PRELOAD names an allocator already. {} when VIT22B_HUGE_PAGES=0; no allocator when
    VIT22B_ALLOCATOR=system. Once they are set, it plans nothing more, and `find` (which may run
    ldconfig) is called only when an allocator could still be preloaded.

    Errors, each naming VIT22B_ALLOCATOR: an unknown name; an allocator asked for by name that is not installed,
    or whose path the loader cannot take (LD_PRELOAD splits at spaces and colons; unnamed, such a path is
    skipped); and a VIT22B_ALLOCATOR that LD_PRELOAD contradicts (another allocator, or one at all for
    `system`; VIT22B_TCMALLOC=0 keeps its old meaning, add none)."""
    choice = allocator_choice(environ)
    preload = environ.get("LD_PRELOAD", "")
    preloaded = named_allocator(preload)
    if environ.get(ALLOCATOR_CHOICE) and preloaded not in (None, choice):  # not for the older VIT22B_TCMALLOC=0
        raise RuntimeError(f"{ALLOCATOR_CHOICE}={choice}, but LD_PRELOAD already loads {preloaded}: {preload!r}")
    if environ.get(OPT_OUT, "1") == "0":
        return {}
    out = {}
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE not in tunables and glibc is not None and glibc >= (2, 35) and thp not in (None, "never"):
        out["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    if choice != "system" and preloaded is None:
        found = find(choice)
        if found is None and choice is not None:
            raise RuntimeError(f"{ALLOCATOR_CHOICE}={choice}, but it is not installed ("
                               + ("pip install cmeel-mimalloc" if choice == "mimalloc"
                                  else "Debian/Ubuntu: apt install libtcmalloc-minimal4") + ")")
        if found and any(c in found[1] for c in " \t:"):
            if choice is not None:
                raise RuntimeError(f"{ALLOCATOR_CHOICE}={choice}: its path {found[1]!r} has a space or colon, "
                                   "where LD_PRELOAD splits")
            found = None
        if found:
            name, library = found
            out["LD_PRELOAD"] = f"{library} {preload}".strip()
            if name == "mimalloc":
                out.update({k: v for k, v in MIMALLOC_SETTINGS.items() if k not in environ})
    return out


def shell_exports(environ=None):
    """`planned_environment` as `export` lines for a shell."""
    environ = os.environ if environ is None else environ
    changes = planned_environment(environ, glibc_version(), thp_mode())
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(changes.items()))


def usage():
    """(user CPU seconds, system CPU seconds, page faults) of this process so far, all threads together."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt + r.ru_majflt


def per_step(before, after, steps):
    """What the bench prints as `host_time_per_step`: the `usage()` difference over `steps` steps, per step."""
    user, system, faults = (b - a for a, b in zip(before, after))
    return {"user_cpu_s": round(user / steps, 4), "system_cpu_s": round(system / steps, 4),
            "page_faults": round(faults / steps)}


if __name__ == "__main__":
    print(shell_exports())
