"""Config validation that runs before any data loading or compilation; errors name the field."""
import re

import jax

from vit22b import models
from vit22b.input import preprocess
from vit22b.parallel import sharding
from vit22b.train import losses, monitors, optim, resume

TOP_KEYS = {
    "seed", "total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
    "model_name", "model", "input", "loss", "label_smoothing",
    "optimizer", "optimizer_kw", "lr", "wd", "wd_mults", "grad_clip_norm", "schedule", "model_init",
    "mesh", "sharding_rules", "optimizer_sharding", "allow_config_change", "grad_accum_steps", "layer_decay",
    "simmim", "evals", "monitors", "z_loss",
}
INPUT_KEYS = {"data", "data_dir", "split", "eval_split", "batch_size", "eval_batch_size", "image_size",
              "num_threads", "prefetch", "num_workers", "pp_train", "pp_eval", "mixup", "on_bad_record"}
MIXUP_KEYS = {"mixup_alpha", "cutmix_alpha", "prob", "switch_prob"}
POSITIVE_INTS = ("total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                 "grad_accum_steps", "input.batch_size", "input.eval_batch_size", "input.image_size")


class ConfigError(ValueError):
    pass


def _get(config, dotted):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _check(cond, field, msg):
    if not cond:
        raise ConfigError(f"config.{field}: {msg}")


def validate(config, num_devices=None):
    """Raise ConfigError naming the first bad field. Returns the resolved model constructor kwargs.

    num_devices: the devices `config.mesh` is laid over (default: this process's JAX devices)."""
    for key in config:
        _check(key in TOP_KEYS, key, f"unknown key; known top-level keys: {sorted(TOP_KEYS)}")
    for key in ("total_steps", "model", "input", "loss", "optimizer", "lr", "schedule"):
        _check(key in config, key, "is required")
    for key in resume.allowed_changes(config):
        try:
            _get(config, key)
        except (KeyError, AttributeError):
            raise ConfigError(f"config.allow_config_change: {key!r} is not a key of this config") from None
    for key in config.input:
        _check(key in INPUT_KEYS, f"input.{key}", f"unknown key; known input keys: {sorted(INPUT_KEYS)}")
    for key in ("data", "batch_size", "image_size"):
        _check(key in config.input, f"input.{key}", "is required")
    for field in POSITIVE_INTS:
        try:
            value = _get(config, field)
        except KeyError:
            continue
        _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, field,
               f"must be a positive integer, got {value!r}")

    for field in ("pp_train", "pp_eval"):
        try:
            preprocess.parse(config.input.get(field), f"input.{field}")
        except ValueError as e:
            raise ConfigError(f"config.{e}") from None
    _check(config.input.get("on_bad_record", "skip") in ("skip", "error"), "input.on_bad_record",
           f"expected 'skip' or 'error', got {config.input.get('on_bad_record')!r}")
    for key in config.input.get("mixup") or {}:
        _check(key in MIXUP_KEYS, f"input.mixup.{key}", f"unknown key; known mixup keys: {sorted(MIXUP_KEYS)}")
    workers = config.input.get("num_workers", 0)
    _check(isinstance(workers, int) and workers >= 0, "input.num_workers", f"must be >= 0, got {workers!r}")
    _check(config.loss in losses.LOSSES, "loss", f"unknown loss {config.loss!r}; expected one of {losses.LOSSES}")
    ls = config.get("label_smoothing", 0.0)
    _check(0.0 <= ls < 1.0, "label_smoothing", f"must be in [0, 1), got {ls}")
    _check(config.lr > 0, "lr", f"must be positive, got {config.lr}")
    z = config.get("z_loss", 0.0)
    _check(isinstance(z, (int, float)) and z >= 0, "z_loss", f"must be a coefficient >= 0 (0: off), got {z!r}")
    _check(not z or config.loss == "softmax_xent", "z_loss",
           f"applies to loss='softmax_xent' (log Z of the softmax), not {config.loss!r}")
    _check(not z or not config.get("simmim"), "z_loss", "applies to classification logits, not to SimMIM")
    try:
        monitors.check(config)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    decay = config.get("layer_decay") or 0.0
    _check(0.0 <= decay <= 1.0, "layer_decay", f"must be in (0, 1] (0: off), got {decay}")
    _check(config.get("optimizer_sharding", "replicated") in ("replicated", "zero1"), "optimizer_sharding",
           f"expected 'replicated' or 'zero1', got {config.get('optimizer_sharding')!r}")
    try:
        mesh = sharding.parse_mesh(config.get("mesh", "data:-1"),
                                   jax.device_count() if num_devices is None else num_devices)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    n = mesh["data"] * mesh["fsdp"]
    _check(config.input.batch_size % n == 0, "input.batch_size",
           f"{config.input.batch_size} is not divisible by the {n} devices of the data and fsdp axes")
    accum, batch = config.get("grad_accum_steps", 1), config.input.batch_size
    _check(batch % accum == 0, "grad_accum_steps", f"input.batch_size {batch} does not split into {accum} microbatches")
    _check(batch // accum % n == 0, "grad_accum_steps", f"microbatches of {batch // accum} (input.batch_size {batch} "
           f"/ {accum}) do not split evenly over the {n} devices of the data and fsdp axes")
    try:  # both raise ValueErrors that start with the field name
        optim.base_optimizer(config.optimizer, dict(config.get("optimizer_kw", {})))
        optim.make_schedule(config.schedule, config.total_steps)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    for i, rule in enumerate(config.get("wd_mults", ()) or ()):
        _check(len(rule) == 2, f"wd_mults[{i}]", f"expected (regex, multiplier), got {rule!r}")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ConfigError(f"config.wd_mults[{i}]: bad regex {rule[0]!r}: {e}") from None

    try:
        kw = models.resolve(config.get("model_name", "vit"), config.model, num_classes=1,
                            image_size=config.input.image_size)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    for i, spec in enumerate(config.get("evals") or ()):
        from vit22b.train import evaluators
        try:
            evaluators.options(spec)
        except ValueError as e:
            raise ConfigError(f"config.evals[{i}].{e}") from None
    if config.get("simmim"):
        from vit22b.train import tasks
        try:
            tasks.check(config)
        except ValueError as e:
            raise ConfigError(f"config.{e}") from None
    if kw.get("parallel_linear") == "collective":  # whole heads per device (and so whole feature chunks)
        _check(kw["num_heads"] % mesh["model"] == 0, "model.num_heads",
               f"{kw['num_heads']} heads cannot be split over the {mesh['model']} devices of the model axis "
               f"(model.parallel_linear = 'collective')")
    return kw
