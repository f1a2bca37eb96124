"""`python -m vit22b.tools.bench`: the JSON line's fields are present and sane (a regression guard, not a timing test)."""
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from conftest import CONFIGS, REPO, cpu_env
from vit22b.tools import hugepages
from vit22b.tools import host_cpu


def _json_lines(cmd):
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=cpu_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]


def test_bench_prints_a_sane_json_line():
    (row,) = _json_lines([sys.executable, "-m", "vit22b.tools.bench", f"--config={CONFIGS}/vit22b_digits.py:runlocal",
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
    # Which CPU measured it, and how the CPU kernels would multiply bf16 on it (vit22b/tools/host_cpu.py).
    assert row["host_cpu"] == host_cpu.info() | {"bf16_dots": host_cpu.bf16_dots_mode("cpu")} and row["host_cpu"]["model"]
    # The command ran as launched (no re-exec): the allocator and huge pages of this environment, as it reports them.
    assert row["host_memory"] == hugepages.status() and row["impl"] == "reference"
    _check_host_time(row)


def _check_host_time(row):
    """CPU seconds and page faults per timed step: present, and of the timed steps only (compiling a tiny model
    takes seconds of CPU, its steps milliseconds; 5 x the median leaves room for one slow step)."""
    t = row["host_time_per_step"]
    assert set(t) == {"user_cpu_s", "system_cpu_s", "page_faults"}
    assert t["user_cpu_s"] > 0 and t["system_cpu_s"] >= 0 and t["page_faults"] >= 0
    assert t["user_cpu_s"] + t["system_cpu_s"] <= row["threads"] * 5 * row["step_s"]["median"] + 0.05, t


def hugepages_supported():
    return (hugepages.glibc_version() or (0, 0)) >= (2, 35) and hugepages.thp_mode() not in (None, "never")


def run_opted_in(script, env):
    """`script` in a Python started as the opt-in says: eval "$(python -m vit22b.tools.hugepages)" first."""
    python = shlex.quote(sys.executable)
    return subprocess.run(["bash", "-c", f'x=$({python} -m vit22b.tools.hugepages) && eval "$x" && exec {python} -c '
                           + shlex.quote(script)], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)


# Allocates and touches 256 MiB through malloc in a process started with the opt-in, and prints the page faults.
FAULTS = """
import ctypes, resource, sys
from vit22b.tools import hugepages
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(ctypes.c_size_t(n))
ctypes.memset(p, 1, n)
print(hugepages.status()["malloc_hugetlb"], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not hugepages_supported(), reason="needs glibc >= 2.35 and a kernel with transparent huge pages")
def test_opting_in_to_huge_pages_cuts_page_faults():
    def faults(**env):
        r = run_opted_in(FAULTS, _allocator_env("system") | env)
        assert r.returncode == 0, r.stderr[-2000:]
        on, n = r.stdout.split()
        return on == "True", int(n)

    off_flag, off = faults(VIT22B_HUGE_PAGES="0")
    on_flag, on = faults()
    assert not off_flag and on_flag
    assert off > 60_000 and on < off / 20, (off, on)  # 4 KiB pages: 65,536 faults; 2 MiB pages: 128


def test_the_opt_in_plans_huge_pages_and_an_allocator_once():
    mi, tc = ("mimalloc", "/venv/cmeel.prefix/lib/libmimalloc.so.3"), ("tcmalloc", "libtcmalloc_minimal.so.4")
    huge = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    settings = {"MIMALLOC_PURGE_DELAY": "-1", "MIMALLOC_ALLOW_LARGE_OS_PAGES": "1"}
    looked = []

    def plan(environ, glibc=(2, 39), thp="madvise", installed=(tc, mi)):
        def find(choice):  # find_allocator over `installed`, in its order
            looked.append(choice)
            return next((a for a in installed if choice in (None, a[0])), None)
        return hugepages.planned_environment(environ, glibc, thp, find)

    both = plan({})
    assert both == {**huge, "LD_PRELOAD": tc[1]} and looked == [None]
    assert plan(both) == {} and len(looked) == 1  # once exported: nothing more, no lookup
    with_mi = plan({}, installed=(mi,))
    assert with_mi == {**huge, "LD_PRELOAD": mi[1], **settings}
    assert plan(with_mi) == {} and len(looked) == 2
    assert plan({"VIT22B_ALLOCATOR": "mimalloc"}) == with_mi and looked[-1] == "mimalloc"
    assert plan({"MIMALLOC_PURGE_DELAY": "100"}, installed=(mi,)) == {  # the user's setting stays
        **huge, "LD_PRELOAD": mi[1], "MIMALLOC_ALLOW_LARGE_OS_PAGES": "1"}
    looked.clear()
    assert plan({"VIT22B_HUGE_PAGES": "0"}) == {}
    assert plan({"VIT22B_ALLOCATOR": "system"}) == huge
    assert plan({"VIT22B_TCMALLOC": "0"}) == huge  # the older spelling
    assert looked == []  # opted out: not looked up
    assert plan({}, installed=()) == huge
    assert plan({}, (2, 31), "never") == {"LD_PRELOAD": tc[1]}  # no huge pages here, the allocator still
    assert plan({"LD_PRELOAD": "/opt/libjemalloc.so.2"}, None, None) == {}  # the user's allocator stays
    assert plan({"LD_PRELOAD": "libfoo.so", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, thp="always") \
        == {"LD_PRELOAD": f"{tc[1]} libfoo.so"}  # other preloads kept; a tunable set to any value is the user's
    with pytest.raises(ValueError, match="VIT22B_ALLOCATOR='jemalloc': expected one of tcmalloc, mimalloc, system"):
        plan({"VIT22B_ALLOCATOR": "jemalloc"})
    with pytest.raises(RuntimeError, match="VIT22B_ALLOCATOR=tcmalloc, but it is not installed"):
        plan({"VIT22B_ALLOCATOR": "tcmalloc"}, installed=(mi,))
    with pytest.raises(ValueError, match="VIT22B_ALLOCATOR='jemalloc'"):  # checked even with the opt-in off
        plan({"VIT22B_ALLOCATOR": "jemalloc", "VIT22B_HUGE_PAGES": "0"})
    # A choice that the environment contradicts (a shell that evaluated `python -m vit22b.tools.hugepages` earlier)
    assert plan({"VIT22B_ALLOCATOR": "tcmalloc", "LD_PRELOAD": tc[1]}) == huge  # agrees: nothing more to do
    assert plan({"VIT22B_TCMALLOC": "0", "LD_PRELOAD": tc[1]}) == huge  # the older spelling: add none, as before
    for choice in ("mimalloc", "system"):
        with pytest.raises(RuntimeError, match=f"VIT22B_ALLOCATOR={choice}, but LD_PRELOAD already loads tcmalloc"):
            plan({"VIT22B_ALLOCATOR": choice, "LD_PRELOAD": tc[1]})
    # The loader splits LD_PRELOAD at spaces and colons: such a path is skipped, or an error when asked for.
    spaced = ("mimalloc", "/my venv/cmeel.prefix/lib/libmimalloc.so.3")
    assert plan({}, installed=(spaced,)) == huge
    with pytest.raises(RuntimeError, match="VIT22B_ALLOCATOR=mimalloc: its path '/my venv/.*' has a space or colon"):
        plan({"VIT22B_ALLOCATOR": "mimalloc"}, installed=(spaced,))


def test_the_mimalloc_wheel_is_found_where_it_is_installed():
    import platform
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("cmeel-mimalloc (the cpu and test extras) has wheels for Linux x86-64 and aarch64 only")
    library = hugepages.find_mimalloc()
    assert library and os.path.isfile(library) and "libmimalloc.so." in os.path.basename(library), library


def test_find_allocator_prefers_tcmalloc_then_the_mimalloc_wheel(monkeypatch):
    libs = {"tcmalloc": "libtcmalloc_minimal.so.4", "mimalloc": "/venv/libmimalloc.so.3"}
    monkeypatch.setattr(hugepages, "find_tcmalloc", lambda: libs["tcmalloc"])
    monkeypatch.setattr(hugepages, "find_mimalloc", lambda: libs["mimalloc"])
    assert hugepages.find_allocator() == ("tcmalloc", libs["tcmalloc"])
    assert hugepages.find_allocator("mimalloc") == ("mimalloc", libs["mimalloc"])
    libs["tcmalloc"] = None
    assert hugepages.find_allocator() == ("mimalloc", libs["mimalloc"]) and hugepages.find_allocator("tcmalloc") is None
    libs["mimalloc"] = None
    assert hugepages.find_allocator() is None


# Mallocs, touches and frees 256 MiB twice in a process started with the opt-in; prints the allocator and the
# page faults of each round.
REUSE = """
import ctypes, resource
from vit22b.tools import hugepages
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 256 << 20
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(ctypes.c_size_t(n))
    ctypes.memset(p, 1, n)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(hugepages.status()["allocator"], *faults)
"""


def _allocator_env(choice):
    """This process's environment without any allocator settings, choosing `choice` (VIT22B_ALLOCATOR)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "VIT22B_TCMALLOC", "VIT22B_HUGE_PAGES")
            and not k.startswith("MIMALLOC_")} | {"VIT22B_ALLOCATOR": choice}


@pytest.mark.parametrize("allocator", ["tcmalloc", "mimalloc"])
def test_the_opt_in_preloads_an_allocator_which_reuses_a_freed_block(allocator):
    if hugepages.find_allocator(allocator) is None:  # mimalloc: the test extra on Linux; tcmalloc from apt
        pytest.skip(f"{allocator} is not installed (tcmalloc: apt install libtcmalloc-minimal4)")

    def run(choice):
        r = run_opted_in(REUSE, _allocator_env(choice))
        assert r.returncode == 0, r.stderr[-2000:]
        name, first, second = r.stdout.split()
        return name, int(first), int(second)

    # A fresh 256 MiB takes at least 128 faults (2 MiB pages; 65,536 with 4 KiB ones); a reused one none.
    name, first, second = run(allocator)
    assert name == allocator and first >= 100 and second < 32, (name, first, second)
    name, first, second = run("system")  # glibc maps the block afresh each time
    assert name == "system" and second >= 100, (name, first, second)


STATUS = "from vit22b.tools import hugepages; print(hugepages.status())"


def test_a_shell_gets_the_same_environment_for_a_notebook_server():
    if hugepages.find_allocator("mimalloc") is None:
        pytest.skip("the cmeel-mimalloc wheel is not installed")
    env = _allocator_env("mimalloc")
    python = shlex.quote(sys.executable)  # the README's recipe, with this interpreter
    script = f'x=$({python} -m vit22b.tools.hugepages) && eval "$x" && {python} -c "{STATUS}"'

    r = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str({"allocator": "mimalloc", "malloc_hugetlb": hugepages_supported(),
                                    "thp": hugepages.thp_mode()})


def test_timm_side_prints_a_sane_json_line():
    (row,) = _json_lines([sys.executable, "-m", "vit22b.tools.bench_timm", "--model=vit_tiny_patch16_224",
                          "--image_size=32", "--batch=2", "--steps=2"])
    assert row["framework"] == "timm" and row["model"] == "vit_tiny_patch16_224" and row["batch"] == 2
    assert row["img_per_s"] > 0 and row["step_s"]["steps"] == 2 and row["host_cpu"] == host_cpu.info()["model"]
    _check_host_time(row)


def test_pairs_alternate_single_steps_and_summarise_the_speed_ratio():
    from vit22b.tools import bench
    calls = []
    bench_ours = lambda: calls.append("ours")
    partner = lambda: calls.append("timm") or 0.5
    summary = bench.alternate(bench_ours, partner, 4)
    assert calls == ["ours", "timm", "timm", "ours", "ours", "timm", "timm", "ours"]  # who goes first alternates
    assert summary["pairs"] == 4 and summary["partner_step_s"] == 0.5 and summary["ours_step_s"] < 0.01
    # Per pair, our speed over the partner's is its step time over ours.
    s = bench.paired_summary([(1.0, 2.0), (2.0, 2.0), (4.0, 2.0), (1.0, 1.5)])
    assert s["ours_step_s"] == 1.5 and s["partner_step_s"] == 2.0
    assert s["ratio_img_per_s"] == {"q25": 0.875, "median": 1.25, "q75": 1.625}


def test_timm_side_serves_single_steps_to_the_bench():
    from vit22b.tools import bench
    cmd = [sys.executable, "-m", "vit22b.tools.bench_timm", "--model=vit_tiny_patch16_224", "--image_size=32",
           "--batch=2", "--steps=1"]
    with bench.serving_partner(cmd) as step:
        times = [step() for _ in range(3)]
    assert all(0 < t < 60 for t in times), times
    with pytest.raises(RuntimeError, match=r"the partner exited \(code 3\)"):
        with bench.serving_partner([sys.executable, "-c", "import sys; sys.exit(3)"]) as step:
            step()
    # One that dies after answering a step: the next write meets a broken pipe, reported the same way.
    once = "import json, sys; print(json.dumps({'ready': 1}), flush=True); sys.stdin.readline(); " \
           "print(json.dumps({'step_s': 0.25}), flush=True); sys.exit(4)"
    with pytest.raises(RuntimeError, match=r"the partner exited \(code 4\)"):
        with bench.serving_partner([sys.executable, "-c", once]) as step:
            assert step() == 0.25
            time.sleep(0.5)
            step()
    with pytest.raises(RuntimeError, match=r"answered 'hello'"):
        with bench.serving_partner([sys.executable, "-c", "print('hello')"]) as step:
            step()


def test_pairs_need_timm_and_fail_before_benchmarking():
    r = subprocess.run([sys.executable, "-m", "vit22b.tools.bench", f"--config={CONFIGS}/vit22b_digits.py:runlocal",
                        "--pairs=3"], cwd=REPO, capture_output=True, text=True, timeout=120, env=cpu_env())
    assert r.returncode != 0 and "--pairs=3" in r.stderr and "--vs=timm" in r.stderr, r.stderr[-2000:]
    assert "{" not in r.stdout  # no result line: it stopped before timing anything


def test_analytic_flops_match_published_figures():
    from conftest import config
    from vit22b.tools import bench
    from vit22b.train import loop
    # SwinV2-T, 256 px, window 8: 5.9 G multiply-adds (Swin V2 paper / timm); ViT-B/16 at 224: 17.6 G.
    swin = config("swinv2_imagenet", arg="variant=T")
    assert abs(bench.swin_forward_flops(loop.build_model(swin, 1000), 256) / 2e9 - 5.9) < 0.1
    vit = config("vit_imagenet", arg="variant=B/16")
    assert abs(bench.analytic_forward_flops(vit, loop.build_model(vit, 1000), 1000, 3) / 2e9 - 17.6) < 0.2


def test_analytic_flops_count_the_map_head_as_xla_does():
    # The MAP head's probe attends over every token: its key and value projections are 4 n d^2 FLOPs. What the
    # head adds to the analytic count over global average pooling matches XLA's count of the head module (which
    # also counts its biases, norm, softmax and GELU: 0.2% here).
    import jax
    import jax.numpy as jnp

    from conftest import config
    from vit22b.tools import bench
    from vit22b.train import loop
    from vit22b.models import vit
    n, d, m, h = 64, 256, 1024, 4
    counts = []
    for head in ("gap", "map"):
        c = config("vit_imagenet", arg="variant=B/16")
        c.model.update(width=d, depth=1, mlp_dim=m, num_heads=h, patch_size=8, head=head)
        c.input.image_size = 64  # 8 x 8 = n tokens
        counts.append(bench.analytic_forward_flops(c, loop.build_model(c, 10), 10, 3))
    added = counts[1] - counts[0]
    assert added == 4 * d * d + 4 * n * d * d + 4 * n * d + 4 * d * m
    head, x = vit.MAPHead(h, m, "rmsnorm"), jnp.zeros((1, n, d))
    params = head.init(jax.random.PRNGKey(0), x)
    xla = jax.jit(head.apply).lower(params, x).cost_analysis()["flops"]
    assert abs(xla / added - 1) < 0.01, (xla, added)


def test_breakdown_counts_each_matmul_class_and_adds_up():
    import jax
    import jax.numpy as jnp

    from vit22b.tools import breakdown

    def f(x, w, q):
        y = jnp.tanh(x @ w)  # a dense layer's 2-D dot
        z, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), y, None, length=3)  # three more, in a loop
        return z.sum() + jnp.einsum("nqd,nkd->nqk", q, q).sum()  # attention's batched dot

    args = (jnp.ones((256, 256)), jnp.full((256, 256), 0.01), jnp.ones((8, 64, 32)))
    compiled = jax.jit(f).lower(*args).compile()
    r = breakdown.breakdown(compiled, lambda: jax.block_until_ready(compiled(*args)))
    assert r["matmul"]["gflop"] == round(4 * 2 * 256 ** 3 / 1e9, 4)
    assert r["batched_matmul"]["gflop"] == round(2 * 8 * 64 * 64 * 32 / 1e9, 4)
    assert r["matmul"]["ms"] > 0 and r["matmul"]["gflop_per_s"] > 0
    parts = r["idle_ms"] + r["matmul"]["ms"] + r["batched_matmul"]["ms"] + r["other_ms"]
    assert abs(parts - r["span_ms"]) <= 0.3 and r["span_ms"] > 0
    assert r["top_other_ms"] and all(v >= 0 for v in r["top_other_ms"].values())
    assert breakdown._short("jit(step_fn)/transpose(jvp(ViT))/block_05/concatenate") == "backward block_*/concatenate"
    assert breakdown._short("jit(step_fn)/add") == "update add"
    assert breakdown._short("jit(apply)/block_05/add", differentiated=False) == "forward block_*/add"


def test_an_async_eigen_dot_runs_until_its_result_is_used():
    from vit22b.tools import breakdown
    comps = breakdown.parse_hlo("""HloModule m

ENTRY %main (a: f32[4,4]) -> f32[16] {
  %a = f32[4,4]{1,0} parameter(0)
  %dot.1 = f32[4,4]{1,0} dot(%a, %a), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %exp.2 = f32[4,4]{1,0} exponential(%a)
  %bitcast.3 = f32[16]{0} bitcast(%dot.1)
  ROOT %negate.4 = f32[16]{0} negate(%bitcast.3)
}
""")
    assert breakdown.matmul_flops(comps) == {"dot.1": (2 * 4 * 4 * 4, False)}
    events = [(0, 10, "dot.1"), (20, 60, "exp.2"), (100, 110, "negate.4")]
    extended = breakdown.extend_async_dots(events, comps, set())
    assert extended == [(0, 100, "dot.1"), (20, 60, "exp.2"), (100, 110, "negate.4")]  # through the bitcast
    wall, span = breakdown.attribute(extended, lambda n: n)
    assert span == 110e-9 and abs(wall["dot.1"] - 80e-9) < 1e-15 and abs(wall["exp.2"] - 20e-9) < 1e-15


def test_bench_refuses_zero_steps_before_compiling():
    from vit22b.tools import bench
    with pytest.raises(ValueError, match="--steps=0"):
        bench.bench(None, steps=0)  # the config is not even read
