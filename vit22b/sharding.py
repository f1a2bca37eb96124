"""Device mesh, logical-axis rules, and the shardings of the train state.

Model code names its dimensions (batch, length, embed, mlp, heads, kv, fused, classes, layers); the rules
map those names to mesh axes. For now every parameter is replicated and the batch is split over `data`.
"""
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DEFAULT_RULES = (
    ("batch", "data"),
    ("length", None), ("embed", None), ("mlp", None), ("heads", None), ("kv", None),
    ("fused", None), ("classes", None), ("layers", None),
)


def make_mesh(devices=None):
    """A 1-D `data` mesh over all devices (Auto axis types, so XLA places the collectives)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def batch_sharding(mesh):
    return NamedSharding(mesh, P("data"))


def replicated(mesh):
    return NamedSharding(mesh, P())


def param_shardings(boxed_params, mesh, rules=DEFAULT_RULES):
    """Shardings for a tree of `nn.LogicallyPartitioned` (possibly abstract) parameters."""
    specs = nn.get_partition_spec(boxed_params)
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def check_batch(global_batch, mesh):
    n = mesh.shape["data"]
    if global_batch % n:
        raise ValueError(f"input.batch_size: {global_batch} is not divisible by the {n} devices of the data axis")
