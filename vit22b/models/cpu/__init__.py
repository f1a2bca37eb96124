"""Opt-in XLA:CPU kernels (config.model.impl='cpu'): drop-in replacements for reference layers and for attention,
with the same parameters and values, whose hand-written gradients, residual layouts and batch slicing make the
train step faster on a CPU host. The reference layers (vit22b/models/layers.py) are the default on every backend;
nothing here is traced unless asked for. What each kernel gains, and the ones measured and deleted:
docs/cpu_kernels.md. tests/test_cpu_kernels.py checks each against the reference, values and gradients.
"""
from vit22b.models.cpu import attention, layers

# name in model.impl='cpu:NAME,...' -> the Ops fields it replaces
KERNELS = {
    "dense": {"dense": layers.dense},
    "bias": {"add_bias": layers.add_bias},
    "gelu": {"gelu": layers.gelu},
    "norm": {"normalize": layers.normalize},
    "concat": {"concatenate": layers.concatenate, "split": layers.split},
    "attention": {"attention": attention.attend},
}


def parse(impl):
    """The kernel names of model.impl 'cpu' (all), 'cpu:NAME,NAME' (those) or 'cpu:-NAME,-NAME' (all but those):
    the last two are for measuring kernels against each other (bench --vs_impl)."""
    name, _, names = impl.partition(":")
    if name != "cpu":
        raise ValueError(f"model.impl: {impl!r} is not 'reference', 'cpu' or 'cpu:KERNEL,...'")
    listed = [n for n in names.split(",") if n]
    excluded = {n[1:] for n in listed if n.startswith("-")}
    if excluded and len(excluded) != len(listed):
        raise ValueError(f"model.impl: {impl!r} mixes kernels to use and kernels to leave out")
    unknown = sorted((excluded or set(listed)) - set(KERNELS))
    if unknown:
        raise ValueError(f"model.impl: unknown CPU kernel {unknown[0]!r} in {impl!r}; known: {', '.join(KERNELS)}")
    if excluded or not listed:
        return [n for n in KERNELS if n not in excluded]
    return listed


def kernels(impl):
    """{Ops field: function} for model.impl `impl`."""
    out = {}
    for name in parse(impl):
        out.update(KERNELS[name])
    return out
