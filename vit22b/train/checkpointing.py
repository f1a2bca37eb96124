"""Orbax checkpoints of the train state plus the input iterator position (Grain's Orbax handler).

Orbax writes each step into a temporary folder and renames it when complete, so a run killed at any moment
leaves only whole checkpoints; a restart restores the newest one.
"""
import json

import grain
import jax
import orbax.checkpoint as ocp

from vit22b import paths


def make_manager(workdir, keep):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(paths.resolve(workdir) / "checkpoints", options=options)


def save(manager, step, state, iterator):
    """Asynchronous: returns once the arrays are copied off the devices; the write goes on behind. The input
    iterator's position is saved by Grain's own handler, one file per process."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator))
    manager.save(step, args=args, force=True)


def restore_latest(manager, abstract_state, iterator):
    """(step, state) from the newest checkpoint, placed with abstract_state's shardings, with `iterator` moved
    to the saved position; or None."""
    step = manager.latest_step()
    if step is None:
        return None
    # Checkpoints written before the Grain handler hold the position as Orbax JSON (data/metadata).
    legacy = paths.resolve(manager.directory) / str(step) / "data" / "metadata"
    if legacy.exists():
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        iterator.set_state(json.loads(legacy.read_text()))
    else:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(iterator)))
    return step, restored["state"]


def abstract_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_params(path, params, shardings):
    """Parameters from an Orbax params checkpoint (`python -m vit22b.models.convert`), checked against the model:
    a missing, extra or differently shaped parameter is an error that names it."""
    path = paths.resolve(path)
    if not path.is_dir():
        raise FileNotFoundError(f"config.model_init: no checkpoint folder {path}")
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(path)
        stored = getattr(stored, "item_metadata", stored)
        want = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
        have = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(stored)}
        for name in sorted(set(want) | set(have)):
            if name not in have:
                raise ValueError(f"config.model_init: {path} lacks the model parameter {name}")
            if name not in want:
                raise ValueError(f"config.model_init: {path} has {name}, which the model does not")
            if tuple(have[name].shape) != tuple(want[name].shape):
                raise ValueError(f"config.model_init: {name} has shape {tuple(have[name].shape)} in {path}, "
                                 f"the model wants {tuple(want[name].shape)}")
        return ckptr.restore(path, abstract_like(params, shardings))
