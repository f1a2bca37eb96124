"""TPU targets for the ahead-of-time planner: chip facts, slice names, and the topologies that libtpu's compiler
targets on a host without TPUs (`python -m vit22b.main --dry_run --topology=v4-256`).

A topology is a description `GENERATION:SHAPE` (chips along each ICI dimension: `v4:4x4x8`, `v5p:8x8x8`,
`v5e:16x16`, `v6e:16x16`) or a slice name from Cloud TPU (`v4-256`: v4 and v5p slices count TensorCores, two a
chip; v5e and v6e slices count chips). JAX sees one device per chip on all four (v4 and v5p as megacores).
"""
import dataclasses
import importlib.util
import os
import re

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str
    hbm_bytes: int
    peak_bf16_flops: float  # per chip, per second
    hbm_bytes_per_second: float


# Cloud TPU documentation (per chip): HBM capacity, bf16 peak, HBM bandwidth. Keyed by JAX's device_kind.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GIB, 275e12, 1200e9),
    "TPU v5 lite": Chip("v5e", 16 * GIB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GIB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GIB, 918e12, 1640e9),
}
GENERATIONS = {c.generation: kind for kind, c in CHIPS.items()}

# Slice names users create on Cloud TPU -> the topology description libtpu compiles for.
SLICES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4", "v4-128": "v4:4x4x4",
    "v4-256": "v4:4x4x8", "v4-512": "v4:4x8x8", "v4-1024": "v4:8x8x8", "v4-2048": "v4:8x8x16",
    "v4-4096": "v4:8x16x16", "v4-8192": "v4:16x16x16",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4",
    "v5p-128": "v5p:4x4x4", "v5p-256": "v5p:4x4x8", "v5p-512": "v5p:4x8x8", "v5p-1024": "v5p:8x8x8",
    "v5p-2048": "v5p:8x8x16", "v5p-4096": "v5p:8x16x16", "v5p-8192": "v5p:16x16x16",
    # v5e's slices are also called v5litepod-N (their gcloud accelerator type).
    **{f"{name}-{n}": f"{g}:{s}" for g, name in (("v5e", "v5e"), ("v5e", "v5litepod"), ("v6e", "v6e"))
       for n, s in ((1, "1x1"), (4, "2x2"), (8, "2x4"), (16, "4x4"), (32, "4x8"), (64, "8x8"), (128, "8x16"),
                    (256, "16x16"))},
}


class UnknownTopologyError(ValueError):
    pass


def known_names():
    return (", ".join(f"{g}:SHAPE" for g in GENERATIONS) + " (e.g. v4:4x4x8, v5e:16x16); slices "
            + ", ".join(SLICES))


def describe(name):
    """'v4-256' or 'v4:4x4x8' -> ('v4:4x4x8', Chip); a one-line UnknownTopologyError otherwise."""
    desc = SLICES.get(name.strip().lower(), name.strip().lower())
    m = re.fullmatch(r"(v\w+):(\d+(?:x\d+){1,2})", desc)
    if not m or m.group(1) not in GENERATIONS:
        raise UnknownTopologyError(f"--topology: unknown TPU topology {name!r}; known: {known_names()}")
    dims = m.group(2).count("x") + 1
    if dims != (3 if m.group(1) in ("v4", "v5p") else 2):
        raise UnknownTopologyError(f"--topology: {m.group(1)} slices are {3 if dims == 2 else 2}-D "
                                   f"(e.g. {next(s for s in SLICES.values() if s.startswith(m.group(1)))}), "
                                   f"got {name!r}")
    return desc, CHIPS[GENERATIONS[m.group(1)]]


def devices(name):
    """The compile-only devices of a TPU topology (no TPU needed), and their chip. Needs libtpu."""
    desc, chip = describe(name)
    # Without these, libtpu asks the GCE metadata server which TPU this host is and prints warnings that it
    # cannot tell; they describe the host, not the target (a TPU VM sets its own).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip.generation}-8")
    # Compiling touches no TPU, so several planners may run at once (libtpu otherwise locks /tmp/libtpu_lockfile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        topology = topologies.get_topology_desc(topology_name=desc, platform="tpu",
                                                chip_config_name="megacore" if chip.generation == "v4" else "default")
    except Exception as e:  # libtpu missing, or a shape this generation's slices cannot have
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (libtpu is not installed: pip install libtpu)" if importlib.util.find_spec("libtpu") is None else ""
        raise UnknownTopologyError(f"--topology={name}: libtpu cannot make {desc}: {first}{hint}") from None
    return topology.devices, chip


def physical_axes(mesh):
    """For each mesh axis, the ICI dimensions (x, y, z) its devices step along: a ring on one torus dimension is
    what the collective matmuls and all-reduces of that axis want."""
    import numpy as np
    coords = np.array([d.coords for d in mesh.devices.flat]).reshape(mesh.devices.shape + (-1,))
    out = {}
    for i, axis in enumerate(mesh.axis_names):
        if mesh.devices.shape[i] == 1:
            continue
        moved = np.any(np.diff(coords, axis=i) != 0, axis=tuple(range(coords.ndim - 1)))
        out[axis] = "".join("xyz"[k] for k in np.flatnonzero(moved))
    return out
