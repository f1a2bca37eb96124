"""Device meshes with named axes, logical-axis rules, and the shardings of the train state.

The mesh always has three axes, `data` (batch), `fsdp` (batch, and parameters' embed dimension: 2-D /
fully-sharded parameters) and `model` (heads, MLP and fused projection columns), given by the CLI-friendly
`config.mesh = "data:2,fsdp:2,model:2"` (-1 = the rest; unnamed axes have size 1). Model code names its
dimensions; `config.sharding_rules` (or DEFAULT_RULES) maps those names to mesh axes. A dimension that a mesh
axis does not divide stays unsharded on that axis rather than failing.
"""
import contextlib

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "model")
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"), ("heads", "model"), ("fused", "model"),
    ("length", None), ("kv", None), ("classes", None), ("layers", None),
    # Activations' feature and spatial dimensions stay whole; pinning them keeps XLA's sharding propagation
    # from choosing layouts on its own (which gave wrong Swin V2 gradients on a 2x2x2 mesh, XLA CPU 0.10.2).
    ("act_embed", None), ("height", None), ("width", None),
)


def parse_mesh(spec, num_devices):
    """'data:2,model:4' -> {'data': 2, 'fsdp': 1, 'model': 4}; one size may be -1 (the rest)."""
    sizes = {a: 1 for a in AXES}
    rest = None
    for part in (p.strip() for p in (spec or "data:-1").split(",") if p.strip()):
        name, _, size = part.partition(":")
        if name not in AXES:
            raise ValueError(f"mesh: unknown axis {name!r} in {spec!r}; axes are {AXES}")
        try:
            n = int(size)
        except ValueError:
            raise ValueError(f"mesh: size of axis {name!r} must be an integer, got {size!r}") from None
        if n == -1:
            if rest is not None:
                raise ValueError(f"mesh: only one axis may be -1 in {spec!r}")
            rest = name
        elif n < 1:
            raise ValueError(f"mesh: size of axis {name!r} must be positive or -1, got {n}")
        sizes[name] = n
    fixed = int(np.prod([s for a, s in sizes.items() if a != rest]))
    if rest is not None:
        if num_devices % fixed:
            raise ValueError(f"mesh: {num_devices} devices cannot be split as {spec!r}")
        sizes[rest] = num_devices // fixed
    if int(np.prod(list(sizes.values()))) != num_devices:
        raise ValueError(f"mesh: {spec!r} uses {int(np.prod(list(sizes.values())))} devices, "
                         f"but there are {num_devices}")
    return sizes


def make_mesh(spec="data:-1", devices=None):
    """A (data, fsdp, model) mesh with Auto axis types, so XLA places the collectives (jax.make_mesh orders the
    devices for the hardware's interconnect)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = parse_mesh(spec, len(devices))
    shape, types = tuple(sizes[a] for a in AXES), (AxisType.Auto,) * len(AXES)
    try:
        return jax.make_mesh(shape, AXES, devices=devices, axis_types=types)
    except (ValueError, NotImplementedError):
        # A 3-D torus whose dimensions no axis size matches (fsdp:8,model:8 on v4's 4x4x4): jax.make_mesh splits
        # physical dimensions between mesh axes only on v5e; a split keeps each axis on neighbouring chips.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return jax.sharding.Mesh(grid, AXES, axis_types=types)


@contextlib.contextmanager
def activate(mesh, rules=DEFAULT_RULES):
    """Mesh and logical rules for tracing: makes the models' activation constraints take effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
        yield


def batch_sharding(mesh):
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh):
    return NamedSharding(mesh, P())


def fit_spec(spec, shape, mesh):
    """Drop mesh axes that do not divide their dimension (e.g. 3 heads over a model axis of 2)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for a in names:
            if dim % (int(np.prod([mesh.shape[k] for k in kept])) * mesh.shape[a]) == 0:
                kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def strip_boxes(tree):
    """nn.meta.unbox without its sharding constraint (which abstract shapes under a mesh cannot take)."""
    is_box = lambda b: isinstance(b, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda b: b.unbox(apply_constraint=False) if is_box(b) else b, tree, is_leaf=is_box)


def param_shardings(boxed_params, mesh, rules=DEFAULT_RULES):
    """Shardings for a tree of `nn.LogicallyPartitioned` (possibly abstract) parameters."""
    specs = nn.get_partition_spec(boxed_params)
    mesh_specs = nn.logical_to_mesh(specs, list(rules))
    shapes = strip_boxes(boxed_params)
    return jax.tree.map(lambda s, x: NamedSharding(mesh, fit_spec(s, x.shape, mesh)), mesh_specs, shapes,
                        is_leaf=lambda s: isinstance(s, P))


def opt_state_shardings(abstract_opt_state, abstract_params, p_shardings, mesh, zero1=False):
    """Optimizer-state leaves that mirror a parameter (Adam moments, momentum) take its sharding; others
    (factored second moments, counters) are replicated. With `zero1`, every leaf is additionally split over
    the `data` axis on its first free dimension that `data` divides (ZeRO stage 1, as Swin V2 trained)."""
    by_path = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        by_path[jax.tree_util.keystr(path)] = (leaf.shape, p_shardings_leaf(p_shardings, path))

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        spec = P()
        for ppath, (shape, sh) in by_path.items():
            if key.endswith(ppath) and tuple(leaf.shape) == tuple(shape):
                spec = sh.spec
                break
        if zero1 and leaf.ndim:
            used = {a for s in spec for a in ((s,) if isinstance(s, str) else (s or ()))}
            if "data" not in used:
                full = list(spec) + [None] * (leaf.ndim - len(spec))
                for i, (dim, s) in enumerate(zip(leaf.shape, full)):
                    if s is None and dim % mesh.shape["data"] == 0 and mesh.shape["data"] > 1:
                        full[i] = "data"
                        break
                spec = P(*full)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def p_shardings_leaf(tree, path):
    node = tree
    for k in path:
        node = node[getattr(k, "key", getattr(k, "idx", k))]
    return node
