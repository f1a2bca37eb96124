"""Ahead-of-time planner: will this config fit the target mesh? Lowers and compiles the full-size train step
from abstract shapes (never allocating the model) and reports parameters, FLOPs and per-device bytes.

  python -m vit22b.main --config=configs/vit22b_jft.py --config.mesh=data:8,model:8 --workdir=DIR --dry_run

`--dry_run` simulates the mesh's devices on the CPU. Writes WORKDIR/plan.json.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np

from vit22b import config_check, paths
from vit22b.input import pipeline
from vit22b.parallel import sharding
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


def plan(config, workdir, memory_per_device_gib=None):
    kw = config_check.validate(config)
    data = pipeline.dataset_info(pipeline.dataset_module(config.input.data),
                                       pipeline.data_dir(config.input))  # class count only: no data is read
    mesh = sharding.make_mesh(config.get("mesh", "data:-1"))
    size, channels = config.input.image_size, data.channels
    # The program an accelerator runs: the reference layers, whatever model.impl says (the 'cpu' kernels are
    # for CPU hosts, and this host being a CPU says nothing about the target).
    config = config.copy_and_resolve_references()
    config.model.impl = "reference"
    model = loop.build_model(config, data.num_classes)
    batch = config.input.batch_size
    with sharding.activate(mesh, loop.rules_of(config)):
        _, _, abstract, shardings, tx, lr_fn = loop.abstract_train_state(model, config, mesh, (size, size, channels))
        step = loop.make_train_step(model, tx, lr_fn, config, shardings, mesh)
        batch_shapes = loop.abstract_batch(batch, (size, size, channels), data.num_classes, data.multi_label)
        compiled = step.lower(abstract, batch_shapes).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    params = abstract["params"]
    blocks = {k: v for k, v in params.items() if k == "blocks" or k.startswith("block_")}
    block_kernels = sum(int(np.prod(x.shape)) for path, x in jax.tree_util.tree_leaves_with_path(blocks)
                        if jax.tree_util.keystr(path).endswith("kernel']"))
    p_bytes = _per_device_bytes(params, shardings["params"])
    o_bytes = _per_device_bytes(abstract["opt_state"], shardings["opt_state"])
    result = {
        "model": config.get("model_name", "vit"), "impl": "reference", "mesh": dict(mesh.shape), "devices": mesh.size,
        "batch": batch, "image_size": size,
        "params_total": _count(params), "params_blocks": _count(blocks), "params_block_matmuls": block_kernels,
        "flops_per_step": float(cost.get("flops", 0.0)) * mesh.size,  # XLA reports one device's share
        "bytes_per_device": {"parameters": p_bytes, "optimizer": o_bytes, "temporaries": int(mem.temp_size_in_bytes),
                             "total": p_bytes + o_bytes + int(mem.temp_size_in_bytes)},
        "xla_argument_bytes_per_device": int(mem.argument_size_in_bytes),
    }
    result["flops_per_image"] = result["flops_per_step"] / batch
    if config.get("model_name", "vit") == "vit":
        analytic = 3 * vit_forward_flops(dict(kw, num_classes=data.num_classes), size, channels)
        result["analytic"] = {"flops_per_image": analytic, "flops_per_step": analytic * batch}
    result["analytic_bytes_per_device"] = {"parameters": p_bytes, "optimizer": o_bytes}
    if memory_per_device_gib:
        result["fits"] = result["bytes_per_device"]["total"] <= memory_per_device_gib * 2 ** 30
        result["memory_per_device_gib"] = memory_per_device_gib
    out = paths.resolve(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(result, indent=2))
    return result


def print_plan(r):
    gib = 2 ** 30
    b = r["bytes_per_device"]
    print(f"{r['model']}: {r['params_total'] / 1e9:.2f}B parameters, {r['params_blocks'] / 1e9:.2f}B in the "
          f"transformer blocks ({r['params_block_matmuls'] / 1e9:.2f}B block matmul weights)")
    print(f"mesh {r['mesh']} = {r['devices']} devices, batch {r['batch']} at {r['image_size']} px")
    line = (f"FLOPs (XLA cost analysis, which counts a scanned loop body once): {r['flops_per_image'] / 1e12:.3f} "
            f"TFLOP per image")
    if "analytic" in r:
        line += f"; analytic {r['analytic']['flops_per_image'] / 1e12:.2f} TFLOP per image"
    print(line)
    print(f"per device: parameters {b['parameters'] / gib:.2f} GiB, optimizer {b['optimizer'] / gib:.2f} GiB, "
          f"temporaries {b['temporaries'] / gib:.2f} GiB, total {b['total'] / gib:.2f} GiB")
    if "fits" in r:
        print(f"fits in {r['memory_per_device_gib']} GiB per device: {'yes' if r['fits'] else 'NO'}")
