"""What may change when a run resumes. Every checkpoint stores the config that shaped it (with the input position in
examples); a resume that asks for another value of a key outside SAFE_TO_CHANGE stops before anything compiles,
naming each key, unless `config.allow_config_change` lists it. A changed `input.batch_size`, so allowed, continues
the same stream of examples.
"""
import json

# Keys that change how often things happen, where they are stored or how the same values are computed and laid out,
# but not the saved state's shapes or the data stream. A prefix covers its sub-keys.
SAFE_TO_CHANGE = (
    "total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "allow_config_change",
    "model_init",  # read only when a run starts from scratch
    "mesh", "sharding_rules", "optimizer_sharding",  # Orbax restores into the new layout
    "input.num_workers", "input.num_threads", "input.prefetch", "input.data_dir",
    "input.eval_split", "input.eval_batch_size", "input.pp_eval",
    "model.impl", "model.attention_impl", "model.remat_policy", "model.attn_chunks",
    "grad_accum_steps",  # the same update from microbatches; the state holds no partial sums
    "monitors",  # measured, not trained on
)
# Keys added after checkpoints were written without them, with the value that means what their absence meant.
ADDED_DEFAULTS = {"z_loss": 0.0}


class ConfigChangedError(ValueError):
    """One line per key whose value differs from the one the checkpoint was written with."""


def config_dict(config):
    """The config as plain JSON data (what a checkpoint stores)."""
    return json.loads(config.to_json_best_effort())


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def allowed_changes(config):
    return tuple(k.strip().removeprefix("config.") for k in config.get("allow_config_change", "").split(",")
                 if k.strip())


def _covered(key, prefixes):
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check(stored, config, where):
    """Raise ConfigChangedError if CONFIG differs from STORED (a config_dict) outside the keys that may change."""
    old, new = ADDED_DEFAULTS | _flat(stored), ADDED_DEFAULTS | _flat(config_dict(config))
    allowed = SAFE_TO_CHANGE + allowed_changes(config)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and not _covered(k, allowed)]
    if changed:
        lines = [f"config.{k}: the checkpoint in {where} was written with {_show(old, k)}, this run asks for "
                 f"{_show(new, k)}" for k in changed]
        lines.append(f"config.allow_config_change: to change these on purpose, "
                     f"--config.allow_config_change={','.join(changed)}")
        raise ConfigChangedError("\n".join(lines))


def _show(flat, key):
    return json.dumps(flat[key]) if key in flat else "(no such key)"


def input_start(run_info, config):
    """(offset, restore_position): the example at which this run's input stream starts, and whether the iterator's
    saved position applies. The position is kept in batches, so after a change of `input.batch_size` the stream
    restarts at the example the checkpoint had reached instead."""
    if run_info is None:
        return 0, True
    if run_info["config"]["input"]["batch_size"] == config.input.batch_size:
        return run_info["input_offset"], True
    return run_info["examples_seen"], False
