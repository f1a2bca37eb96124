"""How fast does a config train here, and how close is that to the machine's matmul ceiling?

  python -m vit22b.tools.bench --config=configs/vit_imagenet.py:variant=B/16 --config.input.batch_size=8
  python -m vit22b.tools.bench --config=configs/swinv2_imagenet.py:variant=T --config.input.batch_size=8 --vs=timm
  python -m vit22b.tools.bench --config=... --forward            # the inference forward instead of the train step
  python -m vit22b.tools.bench --config=... --breakdown          # also: matmuls / batched matmuls / the rest (CPU)

Times the real jitted, donated train step of the config (model, optimizer, dtypes, mesh; the variant the loop
runs between log steps) on synthetic batches of the configured shapes, after warm-up, and prints one JSON line:
compile_s, step_s (median and min over --steps), img_per_s, forward GFLOP per image (XLA's cost analysis of the
unrolled model, and an analytic count), achieved model GFLOP/s (3 x forward for training), the matmul ceilings
measured in the same process (a large f32 matmul, and bf16 x bf16 -> f32), MFU against the ceiling of the
config's dtype, peak memory from XLA's compiled memory analysis, whether the host allocator uses huge pages
(vit22b/tools/hugepages.py) and the CPU time and page faults of each timed step (host_time_per_step: user and system
seconds, all threads), and the host CPU and how the dense layers multiply bf16 on it (vit22b/tools/host_cpu.py).
`--vs=timm` also runs timm's equivalent model (vit22b/tools/bench_timm.py) in a subprocess, alternating with ours, and
prints its line and the ratio; `--pairs=N` adds N single steps of each, alternated one by one (`paired`).
`--vs_impl=IMPL --pairs=N` alternates N single steps with the same config at model.impl=IMPL, compiled in this
process (e.g. the XLA:CPU kernels against the reference: --config.model.impl=cpu --vs_impl=reference); it may be
repeated: each round steps ours and every IMPL once, in rotating order; `paired` holds one summary per IMPL.
`--logged` times the step of log steps (the two norms and config.monitors); `--vs_monitors_off --pairs=N` alternates
with the same step at config.monitors=() (the monitors' cost: none between log steps, one forward pass on them).
`--breakdown` adds where a traced step's time goes (the median of three; vit22b/tools/breakdown.py): matmuls and
batched matmuls (time, GFLOP, GFLOP/s), the rest, idle, and the costliest of the rest by op name.
"""
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from vit22b.tools import breakdown as step_breakdown
from vit22b import config_check, models
from vit22b.parallel import planner, sharding
from vit22b.tools import hugepages
from vit22b.train import loop, monitors
from vit22b.tools import host_cpu

FLAGS = flags.FLAGS


def ceiling_meter(n=None, reps=3):
    """A function measuring the matmul ceilings now: GFLOP/s of an n x n x n matmul in float32 and in bfloat16
    accumulated in float32 (as the CPU kernels compute it with impl='cpu': as float32 on a CPU without bf16
    instructions, vit22b/tools/host_cpu.py). n defaults to 2048 on a CPU and 8192 on an accelerator, where
    a smaller product would not fill the chip.

    Both products are compiled here, once. The bench measures before and after the timed steps, never between
    them: measuring (and compiling) between steps slowed the steps that followed (SwinV2-T float32 on a Zen 3,
    2026-11-27: 3.0 s median per step without, 4.1-5.5 s with). It keeps the best of several measurements: on a
    shared machine, ones that fell in slow moments lowered the bf16 ceiling from ~390 to 302 GFLOP/s."""
    n = n or (2048 if jax.default_backend() == "cpu" else 8192)
    host = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    upcast = host_cpu.bf16_dots_mode(jax.default_backend()) == "float32"
    bf16 = ((lambda x, y: jnp.dot(x.astype(jnp.float32), y.astype(jnp.float32))) if upcast
            else (lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)))
    products = {"float32": (jnp.float32, jax.jit(lambda x, y: jnp.dot(x, y))),
                "bfloat16": (jnp.bfloat16, jax.jit(bf16))}

    def measure():
        out = {}
        for name, (dtype, f) in products.items():
            a = jnp.asarray(host, dtype)
            f(a, a).block_until_ready()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                f(a, a).block_until_ready()
                times.append(time.perf_counter() - t)
            out[name] = 2 * n ** 3 / min(times) / 1e9
            del a
        return out

    measure()  # compiles both
    return measure


def swin_forward_flops(m, image_size, channels=3):
    """Multiply-adds x 2 of one Swin V2 forward per image: patch embedding, window attention blocks (projections,
    MLP, attention within windows), patch merging, head. The continuous position-bias MLP is left out (tiny)."""
    p, c = m.patch_size, m.embed_dim
    res = image_size // p
    flops = 2 * res * res * p * p * channels * c
    for i, depth in enumerate(m.depths):
        n = res * res
        win = min(m.window_size, res) ** 2
        hidden = int(c * m.mlp_ratio)
        flops += depth * 2 * (n * (4 * c * c + 2 * c * hidden) + 2 * n * win * c)
        if i < len(m.depths) - 1:
            flops += 2 * (n // 4) * 4 * c * 2 * c
            res, c = res // 2, 2 * c
    return flops + 2 * c * m.num_classes


def analytic_forward_flops(config, model, num_classes, channels):
    size = config.input.image_size
    if config.get("model_name", "vit") == "vit":
        kw = dict(width=model.width, depth=model.depth, mlp_dim=model.mlp_dim, patch_size=model.patch_size,
                  head=model.head, num_classes=num_classes)
        return planner.vit_forward_flops(kw, size, channels)
    return swin_forward_flops(model, size, channels)


def xla_forward_flops(model, image_shape):
    """XLA's count for one image, from the unrolled model (a scanned body would be counted once)."""
    unrolled = model.clone(scan=False)
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    params = jax.eval_shape(lambda: unrolled.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))["params"]
    lowered = jax.jit(lambda p, x: unrolled.apply({"params": p}, x)).lower(sharding.strip_boxes(params), x)
    cost = lowered.cost_analysis() or lowered.compile().cost_analysis()  # GPU answers only once compiled
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


class DoesNotFit(Exception):
    """The compiled step needs more device memory than `bench`'s memory_limit (args: needed, limit in bytes)."""


def peak_memory_bytes(compiled):
    """What one call of a compiled program holds at its peak, by XLA's memory analysis."""
    mem = compiled.memory_analysis()
    return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
               - mem.alias_size_in_bytes)


def bench(config, steps=5, forward=False, warmup=2, breakdown=False, partner=None, pairs=0, memory_limit=None,
          logged=False):
    """One result dict for `config` (see the module docstring); `logged`: time the step the loop runs on log steps
    (with param_norm, update_norm and config.monitors) instead of the one between them; with `breakdown`, also where a traced step's
    time goes (vit22b/tools/breakdown.py); with `pairs`, also `paired`: that many of our steps alternated one by one
    with calls of `partner` (which runs and times one step of another implementation, in seconds). With
    `memory_limit` (bytes), a step whose compiled peak exceeds it raises DoesNotFit before it runs."""
    if steps < 1:
        raise ValueError(f"bench: --steps={steps}; at least one step must be timed")
    if pairs < 0 or (pairs and partner is None):
        raise ValueError(f"bench: --pairs={pairs}: expected 0, or a number of pairs with a partner to alternate "
                         "with (--vs=timm or --vs_impl)")
    config_check.validate(config)
    num_classes = 1000
    size = config.input.image_size
    channels = 3
    batch = config.input.batch_size
    image_shape = (size, size, channels)
    mesh = sharding.make_mesh(config.get("mesh", "data:-1"))
    model = loop.build_model(config, num_classes)
    rng = np.random.default_rng(0)
    host_batch = {"image": rng.uniform(-1, 1, (batch,) + image_shape).astype(np.float32),
                  "label": rng.integers(0, num_classes, batch).astype(np.int32),
                  "mask": np.ones(batch, np.float32)}
    with sharding.activate(mesh, loop.rules_of(config)):
        state, shardings, tx, lr_fn = loop.create_train_state(model, config, mesh, image_shape)
        data = loop.to_device(host_batch, mesh)
        if forward:
            step = jax.jit(lambda p, x: model.apply({"params": p}, x))
            args = (state["params"], data["image"])
        else:
            # The step the loop runs between log steps (without param_norm, update_norm and monitors), or on them.
            step = loop.make_train_step(model, tx, lr_fn, config, shardings, mesh, norms=logged,
                                        monitor=monitors.kinds(config) if logged else ())
            args = (state, data)
        t = time.perf_counter()
        compiled = step.lower(*args).compile()
        compile_s = time.perf_counter() - t
        peak = peak_memory_bytes(compiled)
        if memory_limit is not None and peak > memory_limit:
            raise DoesNotFit(peak, memory_limit)

        def once():
            nonlocal state
            if forward:
                jax.block_until_ready(compiled(*args))
            else:
                state, metrics = compiled(state, data)
                jax.block_until_ready(metrics)

        meter = ceiling_meter()
        measured = [meter(), meter()]
        times = []
        for i in range(warmup + steps):
            if i == warmup:
                before = hugepages.usage()
            t = time.perf_counter()
            once()
            if i >= warmup:
                times.append(time.perf_counter() - t)
        host_time = hugepages.per_step(before, hugepages.usage(), steps)
        measured += [meter(), meter()]
        parts = step_breakdown.breakdown(compiled, once) if breakdown else None
        if pairs and isinstance(partner, dict):  # model.impl partners, by name, in rounds
            paired = rotate(once, partner, pairs)
        else:
            paired = alternate(once, partner, pairs) if pairs else None  # last: the partner then stays up idle
    fwd_xla = xla_forward_flops(model, image_shape)
    fwd_analytic = analytic_forward_flops(config, model, num_classes, channels)
    step_s = float(np.median(times))
    img_per_s = batch / step_s
    achieved = (1 if forward else 3) * fwd_analytic * img_per_s / 1e9
    dtype = str(config.model.get("dtype", "float32"))
    ceilings = {k: max(m[k] for m in measured) for k in measured[0]}
    ceiling = ceilings["bfloat16" if dtype == "bfloat16" else "float32"]
    return {
        "framework": "vit22b", "model": config.get("model_name", "vit"),
        "variant": config.model.get("variant") or _shape_name(model), "mode": "forward" if forward else "train",
        "impl": str(config.model.get("impl", "reference")), "step": "logged" if logged else "between logs",
        "monitors": list(monitors.kinds(config)),
        "batch": batch, "image_size": size, "dtype": dtype, "param_dtype": str(config.model.get("param_dtype", "float32")),
        "devices": jax.device_count(), "threads": os.cpu_count(), "host_memory": hugepages.status(),
        "host_cpu": host_cpu.info() | {"bf16_dots": host_cpu.bf16_dots_mode(jax.default_backend())},
        "compile_s": round(compile_s, 2),
        "step_s": {"median": round(step_s, 4), "min": round(float(np.min(times)), 4), "steps": len(times)},
        "img_per_s": round(img_per_s, 3), "host_time_per_step": host_time,
        "gflops_per_img": {"xla": round(fwd_xla / 1e9, 6), "analytic": round(fwd_analytic / 1e9, 6)},
        "achieved_gflop_per_s": round(achieved, 1),
        "matmul_ceiling_gflop_per_s": {k: round(v, 1) for k, v in ceilings.items()},
        "mfu": round(achieved / ceiling, 3),
        "peak_memory_bytes": peak,
    } | ({"breakdown": parts} if breakdown else {}) | ({"paired": paired} if pairs else {})


def impl_partner(config, impl):
    """A function that times one train step of `config` at model.impl=`impl` (in seconds), built, initialised and
    compiled at its first call, inside the caller's mesh and rules (as `bench`'s own step)."""
    return variant_partner(config, lambda c: c.model.update(impl=impl))


def variant_partner(config, edit, logged=False):
    """As `impl_partner`, for the config that `edit(copy)` makes of a copy (e.g. config.monitors = ()), and the
    logged step where `logged`."""
    step = None

    def once():
        nonlocal step
        if step is None:
            other = config.copy_and_resolve_references()
            edit(other)
            model = loop.build_model(other, 1000)
            mesh = sharding.make_mesh(other.get("mesh", "data:-1"))
            size = other.input.image_size
            state, shardings, tx, lr_fn = loop.create_train_state(model, other, mesh, (size, size, 3))
            rng = np.random.default_rng(1)
            batch = other.input.batch_size
            data = loop.to_device({"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
                                    "label": rng.integers(0, 1000, batch).astype(np.int32),
                                    "mask": np.ones(batch, np.float32)}, mesh)
            compiled = loop.make_train_step(model, tx, lr_fn, other, shardings, mesh, norms=logged,
                                            monitor=monitors.kinds(other) if logged else ()).lower(
                state, data).compile()
            step = [compiled, state, data]
            for _ in range(2):  # warm-up
                step[1], metrics = compiled(step[1], data)
                jax.block_until_ready(metrics)
        t = time.perf_counter()
        step[1], metrics = step[0](step[1], step[2])
        jax.block_until_ready(metrics)
        return time.perf_counter() - t

    return once


def alternate(ours, partner, pairs):
    """`pairs` steps of ours and of the partner, one after the other (which goes first alternates), and the
    summary of `paired_summary`. Hour-long swings of a shared machine's speed hit both sides of a pair alike."""
    return rotate(ours, {"partner": partner}, pairs)["partner"]


def rotate(ours, partners, rounds):
    """`rounds` rounds of one step each of ours and of every partner ({name: function returning its step time}),
    the order rotating from round to round; `paired_summary` of ours against each partner, by name."""
    names = list(partners)
    times = {n: [] for n in names}
    for i in range(rounds):
        order = (["ours"] + names)[i % (len(names) + 1):] + (["ours"] + names)[:i % (len(names) + 1)]
        took = {}
        for n in order:
            if n == "ours":
                t = time.perf_counter()
                ours()
                took[n] = time.perf_counter() - t
            else:
                took[n] = partners[n]()
        for n in names:
            times[n].append((took["ours"], took[n]))
    return {n: paired_summary(times[n]) for n in names}


def paired_summary(times):
    """Medians of each side's step and, per pair, our speed over the partner's (its step over ours): median and
    quartiles."""
    ours, theirs = (np.array(x) for x in zip(*times))
    ratios = theirs / ours
    return {"pairs": len(times), "ours_step_s": round(float(np.median(ours)), 4),
            "partner_step_s": round(float(np.median(theirs)), 4),
            "ratio_img_per_s": {q: round(float(np.percentile(ratios, p)), 3)
                                for q, p in (("q25", 25), ("median", 50), ("q75", 75))}}


def _shape_name(model):
    if hasattr(model, "width"):
        return f"width{model.width}-depth{model.depth}-patch{model.patch_size}"
    return f"dim{model.embed_dim}-depths{'-'.join(map(str, model.depths))}"


TIMM_EQUIVALENTS = {  # (model_name, block) or Swin variant -> timm model
    ("vit", "sequential"): "vit_base_patch16_224",
    ("vit", "parallel"): "vit_base_patch16_xp_224",
    ("swinv2", "T"): "swinv2_tiny_window8_256",
    ("swinv2", "S"): "swinv2_small_window8_256",
    ("swinv2", "B"): "swinv2_base_window8_256",
}


def timm_name(config):
    key = (("vit", config.model.get("block", "parallel")) if config.get("model_name", "vit") == "vit"
           else ("swinv2", config.model.get("variant")))
    if key not in TIMM_EQUIVALENTS:
        raise ValueError(f"--vs=timm: no timm equivalent for {key}; known: {sorted(TIMM_EQUIVALENTS)}")
    return TIMM_EQUIVALENTS[key]


def _timm_command(config, steps, forward):
    return [sys.executable, "-m", "vit22b.tools.bench_timm", f"--model={timm_name(config)}",
            f"--batch={config.input.batch_size}", f"--image_size={config.input.image_size}",
            f"--dtype={config.model.get('dtype', 'float32')}", f"--steps={steps}"] + (["--forward"] if forward else [])


def run_timm(config, steps, forward):
    r = subprocess.run(_timm_command(config, steps, forward), capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if r.returncode:
        raise RuntimeError(f"timm benchmark failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def serving_partner(cmd):
    """A function that times one step of `cmd --serve` (vit22b/tools/bench_timm.py), a subprocess started at the first
    call, after our own timed steps (its start and warm-up would overlap them), and ended on exit."""
    proc, err = None, tempfile.TemporaryFile(mode="w+")

    def fail(what):
        err.seek(0)
        raise RuntimeError(f"{what}: {' '.join(cmd)} --serve: {err.read()[-2000:]}")

    def reply(key):
        line = proc.stdout.readline()
        if not line:
            fail(f"the partner exited (code {proc.wait()})")
        try:
            return json.loads(line)[key]
        except (ValueError, TypeError, KeyError):
            fail(f"the partner answered {line.strip()[:200]!r}, not a JSON line with {key!r}")

    def step():
        nonlocal proc
        if proc is None:
            proc = subprocess.Popen(cmd + ["--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
            reply("ready")
        try:
            proc.stdin.write("step\n")
            proc.stdin.flush()
        except OSError:  # a broken pipe: it died since its last answer
            fail(f"the partner exited (code {proc.wait()})")
        return reply("step_s")

    try:
        yield step
    finally:
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        err.close()


def main(argv):
    del argv
    config = FLAGS.config
    if FLAGS.breakdown:
        step_breakdown.require_cpu()  # before minutes of compiling
    if FLAGS.vs and FLAGS.vs_impl:
        raise app.UsageError("--vs=timm and --vs_impl: one partner at a time")
    if FLAGS.vs_monitors_off and (FLAGS.vs or FLAGS.vs_impl or FLAGS.forward or not FLAGS.pairs):
        raise app.UsageError("--vs_monitors_off: alternates train steps with config.monitors=(); give --pairs=N "
                             "and no --vs, --vs_impl or --forward")
    if FLAGS.pairs and not (FLAGS.vs == "timm" or FLAGS.vs_impl or FLAGS.vs_monitors_off):  # bench() checks the number itself
        raise app.UsageError(f"--pairs={FLAGS.pairs}: expected 0, or a number of single steps to alternate with "
                             "timm's (with --vs=timm) or another model.impl's (with --vs_impl)")
    if FLAGS.vs_impl and (FLAGS.forward or not FLAGS.pairs):
        raise app.UsageError("--vs_impl: alternates train steps; give --pairs=N and no --forward")
    for impl in FLAGS.vs_impl or ():  # a bad --vs_impl fails before minutes of compiling
        models.resolve(config.get("model_name", "vit"), dict(config.model, impl=impl), 1000, config.input.image_size)
    if FLAGS.vs == "timm":
        timm_name(config)  # an unknown equivalent fails before minutes of compiling
    if FLAGS.vs_monitors_off:
        partner = contextlib.nullcontext({"monitors_off": variant_partner(
            config, lambda c: setattr(c, "monitors", ()), FLAGS.logged)})
    elif FLAGS.vs_impl:
        partner = contextlib.nullcontext({impl: impl_partner(config, impl) for impl in FLAGS.vs_impl})
    elif FLAGS.pairs:
        partner = serving_partner(_timm_command(config, FLAGS.steps, FLAGS.forward))
    else:
        partner = contextlib.nullcontext()
    with partner as step:
        ours = bench(config, FLAGS.steps, FLAGS.forward, breakdown=FLAGS.breakdown, partner=step, pairs=FLAGS.pairs,
                     logged=FLAGS.logged)
    print(json.dumps(ours), flush=True)
    if FLAGS.vs == "timm":
        theirs = run_timm(config, FLAGS.steps, FLAGS.forward)
        print(json.dumps(theirs), flush=True)
        again = bench(config, FLAGS.steps, FLAGS.forward)  # ours, timm, ours: a noisy minute hits both
        print(json.dumps(again), flush=True)
        ours["img_per_s"] = round((ours["img_per_s"] + again["img_per_s"]) / 2, 3)
        print(json.dumps({"ratio_img_per_s": round(ours["img_per_s"] / theirs["img_per_s"], 3),
                          "ours": ours["img_per_s"], "timm": theirs["img_per_s"], "timm_model": theirs["model"]}
                         | ({"paired": ours["paired"]} if FLAGS.pairs else {})),
              flush=True)


if __name__ == "__main__":
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file with optional ':ARGS'.", lock_config=False)
    flags.DEFINE_integer("steps", 5, "Timed steps (after 2 warm-up steps).")
    flags.DEFINE_bool("forward", False, "Time the inference forward pass instead of the train step.")
    flags.DEFINE_enum("vs", "", ["", "timm"], "Also time the equivalent timm model (PyTorch, CPU).")
    flags.DEFINE_integer("pairs", 0, "With --vs=timm, also alternate this many single steps of ours and timm's "
                         "(timm in a subprocess that stays up) and report the per-pair speed ratio's median and "
                         "quartiles: steadier than the ratio of separate runs on a machine whose speed drifts.")
    flags.DEFINE_multi_string("vs_impl", [], "With --pairs, alternate single train steps with the same config at "
                              "this model.impl (e.g. 'reference', 'cpu', 'cpu:-gelu'), compiled in this process; "
                              "repeated, in rounds with each, the order rotating (`paired` by model.impl).")
    flags.DEFINE_bool("logged", False, "Time the step the loop runs on log steps (with the two norms and "
                      "config.monitors) instead of the one between them.")
    flags.DEFINE_bool("vs_monitors_off", False, "With --pairs, alternate single train steps with the same config at "
                      "config.monitors=() (the same step kind: between logs, or --logged).")
    flags.DEFINE_bool("breakdown", False, "Also trace three more steps and split the median one's time among "
                      "matmuls, batched matmuls and the rest (XLA:CPU only; vit22b/tools/breakdown.py).")
    flags.mark_flags_as_required(["config"])
    app.run(main)
