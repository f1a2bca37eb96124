"""Ahead-of-time planner: will this config fit the target mesh? Lowers and compiles the full-size train step
from abstract shapes (never allocating the model) and reports parameters, FLOPs and per-device bytes.

  python -m vit22b.main --config=configs/vit22b_jft.py --config.mesh=data:8,model:8 --workdir=DIR --dry_run
  python -m vit22b.main --config=configs/vit22b_jft.py --config.mesh=fsdp:512,model:8 --workdir=DIR \
      --dry_run --topology=v4-8192

`--dry_run` alone simulates the mesh's devices on the CPU and plans XLA:CPU's program; with `--topology` libtpu's
compiler builds the TPU program for that slice (vit22b/parallel/tpu.py) and the plan adds the TPU compiler's
memory, the collectives, FLOPs with every layer counted and a roofline. Writes WORKDIR/plan.json.
"""
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from vit22b import config_check, paths
from vit22b.input import pipeline
from vit22b.parallel import sharding, tpu
from vit22b.train import loop


def _per_device_bytes(abstract, shardings):
    total = 0
    for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        total += int(np.prod(sh.shard_shape(leaf.shape))) * jnp.dtype(leaf.dtype).itemsize
    return total


def _count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def vit_forward_flops(kw, image_size, channels=3):
    """Multiply-adds x 2 of one forward pass per image: patch embedding, blocks (matmuls and attention), head.
    The MAP head's probe attends over all n tokens, so its key and value projections (4 n d^2) count too: 1.4% of
    a B/16 with this head, 0.3% of ViT-22B, whose published 33.6 TFLOP per trained image covers the blocks."""
    d, depth, m, p = kw["width"], kw["depth"], kw["mlp_dim"], kw["patch_size"]
    n = (image_size // p) ** 2 + (1 if kw.get("head") == "token" else 0)
    embed = 2 * n * p * p * channels * d
    blocks = depth * (2 * n * (4 * d * d + 2 * d * m) + 2 * 2 * n * n * d)
    head = 0
    if kw.get("head") == "map":  # probe query, keys and values, one query's attention, output, MLP on one token
        head = 2 * d * d + 2 * 2 * n * d * d + 2 * 2 * n * d + 2 * d * d + 2 * 2 * d * m
    return embed + blocks + head + 2 * d * kw["num_classes"]


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")


def collective_counts(hlo_text):
    """Collectives in a compiled program's HLO text, by kind: synchronous ops and the `-start` halves of
    asynchronous ones (their `-done` halves are not counted again). libtpu writes a reduce-scatter as a fusion
    calling a computation `all-reduce-scatter*` whose body is an all-reduce: counted as a reduce-scatter."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    computation = ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        for op in COLLECTIVES:
            n = len(re.findall(r"\s" + op + r"(?:-start)?\(", line))
            if n and op == "all-reduce" and computation.startswith("all-reduce-scatter"):
                op = "reduce-scatter"
            counts[op] += n
    return counts


def _target(topology):
    """The devices the plan is for: a TPU topology's compile-only devices, or this host's (simulated) ones."""
    if topology is None:
        return list(jax.devices()), None
    # A persistent-cache entry cannot be loaded without a TPU client (JAX warns and compiles anyway).
    jax.config.update("jax_enable_compilation_cache", False)
    return tpu.devices(topology)


def compile_train_step(config, mesh, batch_size, image_shape, num_classes, multi_label=False):
    """Lower and compile the train step from abstract shapes (nothing allocated). Returns (compiled, abstract
    state, state shardings, lower seconds, compile seconds)."""
    start = time.perf_counter()
    with sharding.activate(mesh, loop.rules_of(config)):
        model = loop.build_model(config, num_classes)
        _, abstract, shardings, tx, lr_fn = loop.abstract_train_state(model, config, mesh, image_shape)
        step = loop.make_train_step(model, tx, lr_fn, config, shardings, mesh)
        batch = loop.abstract_batch(batch_size, image_shape, num_classes, multi_label, config)
        lowered = step.lower(abstract, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, abstract, shardings, lowered_at - start, time.perf_counter() - lowered_at


def _compile(config, mesh, data):
    size = config.input.image_size
    return compile_train_step(config, mesh, config.input.batch_size, (size, size, data.channels),
                              data.num_classes, data.multi_label)


def _cost(compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return np.array([float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))])


def _cost_per_step(config, kw, mesh, data, scanned_cost):
    """One device's FLOPs and bytes accessed per step with every layer counted. XLA's cost analysis counts the
    body of a scanned stack once, so the stacks are unrolled at depth 2 (base) and, one stack at a time, 4: the
    cost is linear in each stack's depth, and two layers more cost twice one layer (Swin V2's shifted and
    unshifted blocks alternate)."""
    key = "depths" if "depths" in kw else "depth"
    depths = tuple(kw[key]) if key == "depths" else (kw[key],)
    if not config.model.get("scan", False):
        return scanned_cost, 0
    base = tuple(min(d, 2) for d in depths)

    def cost_at(ds):
        c = config.copy_and_resolve_references()
        with c.unlocked():  # a variant's config may not have the depth key yet; the CLI's config is locked
            c.model.scan = False
            c.model[key] = tuple(ds) if key == "depths" else ds[0]
        return _cost(_compile(c, mesh, data)[0])

    base_cost, compiles = cost_at(base), 1
    total = base_cost
    for i, (d, b) in enumerate(zip(depths, base)):
        if d > b:
            grown = list(base)
            grown[i] += 2
            total = total + (d - b) * (cost_at(grown) - base_cost) / 2
            compiles += 1
    return total, compiles


def _hbm_oom(error):
    """The TPU compiler refuses a program that does not fit the chip's HBM; what it needed (arguments and
    temporaries) and what it had, in bytes. libtpu words it two ways."""
    scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    for pattern in (r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)",
                    r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"):
        m = re.search(pattern, str(error))
        if m:
            return {"needed": int(float(m.group(1)) * scale[m.group(2)]),
                    "hbm_available": int(float(m.group(3)) * scale[m.group(4)])}
    return None


def _roofline(result, chip, model_flops_per_step):
    """Lower bounds on one chip's step time from the compiled program: its FLOPs at the bf16 peak, its bytes
    accessed at the HBM bandwidth (nothing overlapped better than perfectly, no collective waits); and the MFU
    that bound allows for the model's FLOPs (ViT: the analytic count; remat's recomputation is not model FLOPs)."""
    flops, moved = result["compiler"]["flops_per_device"], result["compiler"]["bytes_accessed_per_device"]
    compute, memory = flops / chip.peak_bf16_flops, moved / chip.hbm_bytes_per_second
    bound = max(compute, memory)
    out = {"compute_seconds": compute, "memory_seconds": memory, "step_seconds_lower_bound": bound,
           "bound_by": "compute" if compute >= memory else "HBM bandwidth"}
    if model_flops_per_step and bound > 0:
        out["mfu_upper_bound"] = model_flops_per_step / (result["devices"] * chip.peak_bf16_flops * bound)
    return out


def plan(config, workdir, memory_per_device_gib=None, topology=None, roofline=True):
    """Compile the full train step of `config` for `config.mesh` on the target devices and write plan.json.

    topology: None (this host's devices: simulated CPUs under `--dry_run`) or a TPU topology / slice name
    (vit22b/parallel/tpu.py), compiled by libtpu's compiler without TPU hardware. roofline: with a topology,
    also count every layer's FLOPs and bytes (two or more smaller compiles) for the roofline."""
    devices, chip = _target(topology)
    try:
        mesh = sharding.make_mesh(config.get("mesh", "data:-1"), devices)
    except ValueError:
        config_check.validate(config, len(devices))  # the error names the field
        raise
    with jax.set_mesh(mesh):  # the attention kernels' checks ask the target's platform
        kw = config_check.validate(config, len(devices))
    data = pipeline.dataset_info(pipeline.dataset_module(config.input.data),
                                 pipeline.data_dir(config.input))  # class count only: no data is read
    size, channels, batch = config.input.image_size, data.channels, config.input.batch_size
    # The program an accelerator runs: the reference layers, whatever model.impl says (the 'cpu' kernels are
    # for CPU hosts, and this host being a CPU says nothing about the target).
    config = config.copy_and_resolve_references()
    config.model.impl = "reference"
    model_name = config.get("model_name", "vit")
    result = {"model": model_name, "impl": "reference", "mesh": dict(mesh.shape), "devices": mesh.size,
              "platform": devices[0].platform, "batch": batch, "image_size": size}
    model_flops = None
    if model_name == "vit":
        analytic = 3 * vit_forward_flops(dict(kw, num_classes=data.num_classes), size, channels)
        result["analytic"] = {"flops_per_image": analytic, "flops_per_step": analytic * batch}
        model_flops = analytic * batch
    if chip is not None:
        desc, _ = tpu.describe(topology)
        result["target"] = {"topology": desc, "requested": topology, "device_kind": devices[0].device_kind,
                            "chip": chip.generation, "chips": len(devices), "hbm_bytes_per_chip": chip.hbm_bytes,
                            "peak_bf16_flops_per_chip": chip.peak_bf16_flops,
                            "hbm_bytes_per_second": chip.hbm_bytes_per_second,
                            "mesh_ici_axes": tpu.physical_axes(mesh)}
        result["memory_per_device_gib"] = chip.hbm_bytes / 2 ** 30
    try:
        compiled, abstract, shardings, lower_seconds, compile_seconds = _compile(config, mesh, data)
    except jax.errors.JaxRuntimeError as e:
        oom = _hbm_oom(e) if chip is not None else None
        if oom is None:
            raise
        # Out of HBM at compile time: the compiler's own verdict, with what it needed.
        result.update(fits=False, compiler={"hbm_oom": oom, "error": str(e).strip().splitlines()[0]})
        return _write(result, workdir)
    mem = compiled.memory_analysis()
    params = abstract["params"]
    # ViT: 'blocks' (scanned) or 'block_N'; Swin V2: 'layers_S_blocks' (scanned) or 'layers_S_blocks_N'.
    blocks = {k: v for k, v in params.items() if k == "blocks" or k.startswith("block_") or "_blocks" in k}
    block_kernels = sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(blocks)
                        if jax.tree_util.keystr(path).endswith("kernel']"))
    p_bytes = _per_device_bytes(params, shardings["params"])
    o_bytes = _per_device_bytes(abstract["opt_state"], shardings["opt_state"])
    buffers = {  # one device's share, as the target's compiler assigned its buffers
        "arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
        "aliased": int(mem.alias_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
        "generated_code": int(mem.generated_code_size_in_bytes)}
    # The state is donated: outputs alias arguments, so what is live at once is the arguments, the outputs that
    # are not aliased, the temporaries and the program.
    buffers["peak"] = (buffers["arguments"] + buffers["outputs"] - buffers["aliased"] + buffers["temporaries"]
                       + buffers["generated_code"])
    scanned_cost = _cost(compiled)
    hlo = compiled.as_text()
    result.update({
        "params_total": _count(params), "params_blocks": _count(blocks), "params_block_matmuls": block_kernels,
        "flops_per_step": scanned_cost[0] * mesh.size,  # XLA reports one device's share
        "bytes_per_device": {"parameters": p_bytes, "optimizer": o_bytes, "temporaries": buffers["temporaries"],
                             "total": p_bytes + o_bytes + buffers["temporaries"]},
        "xla_argument_bytes_per_device": buffers["arguments"],
        "analytic_bytes_per_device": {"parameters": p_bytes, "optimizer": o_bytes},
        "compiler": {"bytes_per_device": buffers, "lower_seconds": lower_seconds, "compile_seconds": compile_seconds},
        "collectives": collective_counts(hlo),
        "pallas_kernels": len(re.findall(r"custom_call_target=\"tpu_custom_call\"", hlo)),
    })
    result["flops_per_image"] = result["flops_per_step"] / batch
    if chip is not None:
        result["fits"] = buffers["peak"] <= chip.hbm_bytes
    if chip is not None and roofline:
        try:
            (flops, moved), compiles = _cost_per_step(config, kw, mesh, data, scanned_cost)
            result["compiler"].update(flops_per_device=float(flops), bytes_accessed_per_device=float(moved),
                                      flops_per_step=float(flops) * mesh.size, cost_compiles=compiles)
            result["roofline"] = _roofline(result, chip, model_flops)
        except jax.errors.JaxRuntimeError as e:  # an unrolled copy out of HBM: the plan stands, without roofline
            if _hbm_oom(e) is None:
                raise
            result["compiler"]["roofline_error"] = str(e).strip().splitlines()[0]
    if memory_per_device_gib:
        total = buffers["peak"] if chip is not None else result["bytes_per_device"]["total"]
        result["fits"] = total <= memory_per_device_gib * 2 ** 30
        result["memory_per_device_gib"] = memory_per_device_gib
    return _write(result, workdir)


def _write(result, workdir):
    out = paths.resolve(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(result, indent=2))
    return result


def print_plan(r):
    gib = 2 ** 30
    where = f" of {r['target']['topology']} ({r['target']['chips']} {r['target']['device_kind']} chips)" \
        if "target" in r else ""
    c = r["compiler"]
    if "hbm_oom" in c:
        print(f"mesh {r['mesh']} = {r['devices']} devices{where}, batch {r['batch']} at {r['image_size']} px")
        print(f"does NOT fit: the TPU compiler needs {c['hbm_oom']['needed'] / gib:.2f} GiB per device (arguments "
              f"and temporaries), {c['hbm_oom']['hbm_available'] / gib:.2f} GiB of HBM are available")
        return
    print(f"{r['model']}: {r['params_total'] / 1e9:.2f}B parameters, {r['params_blocks'] / 1e9:.2f}B in the "
          f"transformer blocks ({r['params_block_matmuls'] / 1e9:.2f}B block matmul weights)")
    print(f"mesh {r['mesh']} = {r['devices']} devices{where}, batch {r['batch']} at {r['image_size']} px")
    if "target" in r:
        print(f"mesh axes along the ICI torus dimensions: {r['target']['mesh_ici_axes']}")
    print(f"compiled for {r['platform']} in {c['compile_seconds']:.1f} s (lowered in {c['lower_seconds']:.1f} s); "
          f"collectives in the program (a scanned body once): "
          + ", ".join(f"{k} {v}" for k, v in r["collectives"].items()))
    line = (f"FLOPs (XLA cost analysis, which counts a scanned loop body once): {r['flops_per_image'] / 1e12:.3f} "
            f"TFLOP per image")
    if "flops_per_step" in c:
        line = (f"FLOPs (TPU cost analysis, every layer counted): {c['flops_per_step'] / r['batch'] / 1e12:.2f} TFLOP "
                f"per image")
    if "analytic" in r:
        line += f"; analytic {r['analytic']['flops_per_image'] / 1e12:.2f} TFLOP per image"
    print(line)
    b = r["bytes_per_device"]
    print(f"per device: parameters {b['parameters'] / gib:.2f} GiB, optimizer {b['optimizer'] / gib:.2f} GiB, "
          f"temporaries {b['temporaries'] / gib:.2f} GiB, total {b['total'] / gib:.2f} GiB")
    m = c["bytes_per_device"]
    print(f"compiler's buffers per device: arguments {m['arguments'] / gib:.2f} GiB, outputs {m['outputs'] / gib:.2f}"
          f" GiB ({m['aliased'] / gib:.2f} aliased to arguments), temporaries {m['temporaries'] / gib:.2f} GiB; "
          f"peak {m['peak'] / gib:.2f} GiB")
    if "roofline" in r:
        f = r["roofline"]
        line = (f"roofline per step: compute {f['compute_seconds'] * 1e3:.1f} ms, HBM traffic "
                f"{f['memory_seconds'] * 1e3:.1f} ms: at least {f['step_seconds_lower_bound'] * 1e3:.1f} ms, "
                f"{f['bound_by']}-bound")
        if "mfu_upper_bound" in f:
            line += f"; MFU at most {100 * f['mfu_upper_bound']:.1f}%"
        print(line)
    if "fits" in r:
        print(f"fits in {r['memory_per_device_gib']:.1f} GiB per device: {'yes' if r['fits'] else 'NO'}")
