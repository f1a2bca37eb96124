"""Orbax checkpoints of the train state, the input iterator position (Grain's Orbax handler) and the run info
(the config and the examples seen, vit22b/train/resume.py).

Orbax writes each step into a temporary folder and renames it when complete, so a run killed at any moment
leaves only whole checkpoints; a restart restores the newest one that restores, moving damaged ones aside.
"""
import json

import grain
import jax
import orbax.checkpoint as ocp

from vit22b import paths


def make_manager(workdir, keep):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(paths.resolve(workdir) / "checkpoints", options=options)


def save(manager, step, state, iterator, run_info):
    """Asynchronous: returns once the arrays are copied off the devices; the write goes on behind. The input
    iterator's position is saved by Grain's own handler, one file per process; RUN_INFO (the config and the input
    position in examples, vit22b/train/resume.py) as JSON."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator),
                              run=ocp.args.JsonSave(run_info))
    manager.save(step, args=args, force=True)


def read_run_info(manager, step):
    """The run info saved with STEP, or None for checkpoints written before it was (or where it is unreadable)."""
    if not (paths.resolve(manager.directory) / str(step) / "run").exists():
        return None
    try:
        return manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]
    except Exception:  # noqa: BLE001 - damage; restore_latest reports it and moves the checkpoint aside
        return None


def newest_run_info(manager):
    """(step, run info) of the newest checkpoint whose run info reads, or None."""
    for step in sorted(manager.all_steps(), reverse=True):
        info = read_run_info(manager, step)
        if info is not None:
            return step, info
    return None


class CheckpointMismatchError(ValueError):
    """A checkpoint holds another model or optimizer than this run builds (a changed config): nothing is moved."""


class NoCheckpointRestoresError(RuntimeError):
    """Every checkpoint in the workdir failed to restore; each was moved aside."""


def restore_latest(manager, abstract_state, make_iterator):
    """(step, state, iterator, run info) from the newest checkpoint that restores, the state placed with
    abstract_state's shardings; None when there is no checkpoint. MAKE_ITERATOR(run_info or None) returns
    (iterator, restore_position): the iterator to resume, moved to the saved position where restore_position.

    A checkpoint that fails to restore (a truncated or missing file, unreadable metadata, an empty folder) is
    reported in one line, moved aside to WORKDIR/damaged_checkpoints/ (never deleted) and the next older one is
    tried. A readable checkpoint whose parameter or optimizer shapes differ from this run's is not damage: that
    raises CheckpointMismatchError and moves nothing."""
    tried = []
    for step in sorted(manager.all_steps(), reverse=True):
        folder = paths.resolve(manager.directory) / str(step)
        try:
            stored = _state_metadata(folder)
        except Exception as e:  # noqa: BLE001 - whatever unreadable metadata raises (Orbax, JSON, OS), it is damage
            stored, problem = None, e
        if stored is not None:
            compare_trees(abstract_state, stored, f"the checkpoint {folder}", CheckpointMismatchError)
            run_info = read_run_info(manager, step)
            iterator, restore_position = make_iterator(run_info)
            try:
                return step, _restore(manager, step, folder, abstract_state, iterator, restore_position), \
                    iterator, run_info
            except Exception as e:  # noqa: BLE001 - a truncated array file fails in TensorStore, Orbax or numpy
                problem = e
                if hasattr(iterator, "close"):
                    iterator.close()
        aside = _move_aside(manager, folder)
        reason = " ".join(str(problem).split())[:300] or type(problem).__name__
        tried.append(f"{folder}: {reason}")
        if jax.process_index() == 0:
            print(f"checkpoint {folder} does not restore ({reason}); moved to {aside}, trying the one before",
                  flush=True)
    if tried:
        raise NoCheckpointRestoresError("no checkpoint restores; tried " + " | ".join(tried))
    return None


def _state_metadata(folder):
    """The stored state's tree of shapes and dtypes, read from its metadata alone."""
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(folder / "state")
    stored = getattr(stored, "item_metadata", stored)
    if stored is None or not jax.tree.leaves(stored):
        raise ValueError("no state metadata")
    return stored


def _restore(manager, step, folder, abstract_state, iterator, restore_position):
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    # Checkpoints written before the Grain handler hold the position as Orbax JSON (data/metadata).
    legacy = folder / "data" / "metadata"
    if restore_position and not legacy.exists():
        items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if restore_position and legacy.exists():
        iterator.set_state(json.loads(legacy.read_text()))
    return restored["state"]


def _move_aside(manager, folder):
    """Rename FOLDER to WORKDIR/damaged_checkpoints/STEP (or STEP.1, ...): process 0 renames, all wait for it."""
    target_dir = folder.parent.parent / "damaged_checkpoints"
    target = target_dir / folder.name
    n = 0
    while target.exists():
        n += 1
        target = target_dir / f"{folder.name}.{n}"
    if jax.process_index() == 0:
        target_dir.mkdir(parents=True, exist_ok=True)
        folder.rename(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"vit22b moved {folder.name} aside")
    manager.reload()
    return target


def compare_trees(want, have, where, error):
    """Raise ERROR naming the first parameter missing from, extra in, or shaped differently in HAVE (a tree of
    shape metadata) than in WANT."""
    want, have = _by_name(want), _by_name(have)
    for name in sorted(set(want) | set(have)):
        if name not in have:
            raise error(f"{where} lacks {name}, which this run's model has")
        if name not in want:
            raise error(f"{where} has {name}, which this run's model does not")
        if tuple(have[name].shape) != tuple(want[name].shape):
            raise error(f"{name} has shape {tuple(have[name].shape)} in {where}; this run's model wants "
                        f"{tuple(want[name].shape)}")


def _by_name(tree):
    """Leaves by their path as 'params/blocks/in_kernel' (stored metadata turns named tuples into dicts)."""
    def part(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)
    return {"/".join(part(k) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def abstract_like(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


HEADS = ("head", "map_head")  # what a classifier adds to an encoder: fresh where a checkpoint (an encoder's) lacks it


def load_params(path, params, shardings, module=None):
    """The model's parameters from `path`: a params checkpoint (`python -m vit22b.models.convert`) or a run's
    checkpoint step (WORKDIR/checkpoints/STEP, its parameters alone). From a SimMIM run (vit22b/models/simmim.py)
    the encoder is taken, without the mask token and decoder. A classifier head (HEADS) the checkpoint lacks
    entirely (an encoder's) keeps its fresh initialisation; any other missing, extra or differently shaped parameter is an
    error that names it, and so is a setting of `module` that makes the same parameters compute something else
    (the params checkpoint's model file: its pooling, GELU...). Returns (params, a note of what was left fresh)."""
    from vit22b.models.checkpoint_files import MODEL_FILE, SEMANTIC_SETTINGS
    path = paths.resolve(path)
    if not path.is_dir():
        raise FileNotFoundError(f"config.model_init: no checkpoint folder {path}")
    error = lambda message: ValueError(f"config.model_init: {message}")  # noqa: E731
    if module is not None and (path / MODEL_FILE).exists():
        stored = json.loads((path / MODEL_FILE).read_text())["model"]
        for key in SEMANTIC_SETTINGS:
            if key in stored and hasattr(module, key) and stored[key] != getattr(module, key):
                raise error(f"the checkpoint's model.{key} is {stored[key]!r}, this run's {getattr(module, key)!r} "
                            f"(set --config.model.{key}={stored[key]})")
    item, prefix = path, ()
    if (path / "state").is_dir() and (path / "run").is_dir():  # a run's checkpoint step
        item, prefix = path / "state", ("params",)
    with ocp.PyTreeCheckpointer() as ckptr:
        stored = ckptr.metadata(item)
        stored = getattr(stored, "item_metadata", stored)
        for key in prefix:
            stored = stored[key]
        if "encoder" in stored and "encoder" not in params:  # SimMIM: the encoder, without the mask token
            prefix += ("encoder",)
            stored = {k: v for k, v in stored["encoder"].items() if k != "mask_token"}
        fresh = sorted(k for k in HEADS if k in params and k not in stored)
        wanted = {k: v for k, v in params.items() if k not in fresh}
        compare_trees(wanted, stored, str(path), error)
        target = abstract_like(wanted, {k: v for k, v in shardings.items() if k in wanted})
        for key in reversed(prefix):
            target = {key: target}
        restored = ckptr.restore(item, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    for key in prefix:
        restored = restored[key]
    restored = dict(restored, **{k: params[k] for k in fresh})
    return restored, (f"{' and '.join(fresh)} (not in the checkpoint) initialised fresh" if fresh else "")
