"""One Optax chain built from the config: clip -> optimizer -> decoupled weight decay -> layer-wise lr decay
(`config.layer_decay`, for fine-tuning) -> lr schedule.

Weight decay follows the AdamW convention: each step subtracts lr_t * wd * mult * param, where `mult` comes
from the first regex in `config.wd_mults` that fully matches the parameter path ('blocks/in_kernel',
'head/kernel', ...); parameters that no rule matches are not decayed.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = {
    # big_vision's Adafactor: factored second moment with beta2_t = min(0.999, 1 - t^-0.8), eps 1e-30,
    # bf16 momentum 0.9 (an EMA without debiasing), no update clipping.
    "adafactor_bv": dict(decay_rate=0.8, beta2_cap=0.999, min_dim_size_to_factor=32, momentum=0.9,
                         momentum_dtype="bfloat16", eps=1e-30),
    "adamw": dict(b1=0.9, b2=0.999, eps=1e-8, mu_dtype="float32"),
    "sgd": dict(momentum=0.9, nesterov=False),
}
SCHEDULES = {
    "rsqrt": dict(warmup_steps=0, cooldown_steps=0, timescale=10_000),
    "cosine": dict(warmup_steps=0, min_mult=0.0),
    "constant": dict(warmup_steps=0, cooldown_steps=0),
    # After warm-up, the rate times gamma at each step of `boundaries` passed (SimMIM's pretraining: x0.1 at 7/8).
    "multistep": dict(warmup_steps=0, boundaries=(), gamma=0.1),
}


def _options(table, name, given, name_field, options_field):
    if name not in table:
        raise ValueError(f"{name_field}: unknown value {name!r}; expected one of {sorted(table)}")
    unknown = set(given) - set(table[name]) - {"decay_type"}
    if unknown:
        raise ValueError(f"{options_field}.{sorted(unknown)[0]}: not an option of {name!r}; "
                         f"options: {sorted(table[name])}")
    return {**table[name], **{k: v for k, v in given.items() if k != "decay_type"}}


def make_schedule(schedule_cfg, total_steps):
    """Returns step -> multiplier in [0, 1] of the base learning rate (step = updates already applied)."""
    cfg = dict(schedule_cfg)
    kind = cfg.get("decay_type", "constant")
    o = _options(SCHEDULES, kind, cfg, "schedule.decay_type", "schedule")
    warmup, cooldown = o["warmup_steps"], o.get("cooldown_steps", 0)
    if warmup + cooldown > total_steps:
        raise ValueError(f"schedule.warmup_steps + cooldown_steps = {warmup + cooldown} exceeds total_steps "
                         f"= {total_steps}")

    if kind == "rsqrt":  # big_vision's reciprocal square root; optax has none
        def decay(step):
            return 1.0 / jnp.sqrt(1.0 + jnp.asarray(step, jnp.float32) / o["timescale"])
    elif kind == "cosine":
        decay = optax.cosine_decay_schedule(1.0, max(total_steps - warmup, 1), alpha=o["min_mult"])
    elif kind == "multistep":  # boundaries count from the start of the run, as the official epochs do
        bounds = sorted(int(b) for b in o["boundaries"])
        if any(not warmup < b <= total_steps for b in bounds):
            raise ValueError(f"schedule.boundaries: {bounds} must lie after the warm-up ({warmup} steps) and by "
                             f"total_steps = {total_steps}")

        def decay(step):
            passed = sum((jnp.asarray(step) + warmup >= b).astype(jnp.float32) for b in bounds)
            return jnp.asarray(o["gamma"], jnp.float32) ** passed
    else:
        decay = optax.constant_schedule(1.0)
    # Linear warm-up whose first step already trains: (step + 1) / warmup_steps, then the decay from 1.
    warm = optax.linear_schedule(1.0 / warmup, 1.0, warmup - 1) if warmup > 1 else optax.constant_schedule(1.0)
    fn = optax.join_schedules([warm, decay], [warmup]) if warmup else decay
    if not cooldown:
        return fn
    return lambda step: fn(step) * jnp.clip((total_steps - jnp.asarray(step, jnp.float32)) / cooldown, 0.0, 1.0)


def _adafactor_bv(decay_rate, beta2_cap, min_dim_size_to_factor, momentum, momentum_dtype, eps):
    def beta2(step, exponent):
        return jnp.minimum(beta2_cap, 1.0 - (jnp.asarray(step, jnp.float32) + 1.0) ** (-exponent))

    rms = optax.scale_by_factored_rms(decay_rate=decay_rate, min_dim_size_to_factor=min_dim_size_to_factor,
                                      epsilon=eps, decay_rate_fn=beta2)
    mom = (optax.ema(momentum, debias=False, accumulator_dtype=jnp.dtype(momentum_dtype))
           if momentum else optax.identity())
    return optax.chain(rms, mom)


def base_optimizer(name, kw):
    o = _options(OPTIMIZERS, name, kw, "optimizer", "optimizer_kw")
    if name == "adafactor_bv":
        return _adafactor_bv(**o)
    if name == "adamw":
        return optax.scale_by_adam(b1=o["b1"], b2=o["b2"], eps=o["eps"], mu_dtype=jnp.dtype(o["mu_dtype"]))
    return optax.trace(decay=o["momentum"], nesterov=o["nesterov"]) if o["momentum"] else optax.identity()


def path_name(path):
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def wd_multipliers(params, rules):
    """Tree of per-parameter multipliers; a rule that matches no parameter is an error (likely a typo)."""
    compiled = [(re.compile(pattern), float(mult)) for pattern, mult in rules]
    used = [False] * len(compiled)

    def mult(path, _):
        name = path_name(path)
        for i, (rx, m) in enumerate(compiled):
            if rx.fullmatch(name):
                used[i] = True
                return m
        return 0.0

    tree = jax.tree_util.tree_map_with_path(mult, params)
    for (pattern, _), u in zip(rules, used):
        if not u:
            raise ValueError(f"wd_mults: rule {pattern!r} matches no parameter; names look like "
                             f"{[path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)][:6]}")
    return tree


def add_decayed_weights(wd, mults):
    def update(updates, state, params):
        new = jax.tree.map(lambda u, p, m: u + (wd * m) * p if m else u, updates, params, mults)
        return new, state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def clip_by_global_norm(max_norm):
    """optax.clip_by_global_norm's rule (gradients scaled to norm max_norm when their norm exceeds it; the same
    empty state) as one scalar factor, min(1, max_norm / norm), that every tensor is multiplied by. optax
    divides each tensor by a scalar and selects between that and the raw gradient: XLA materialises the
    quotient (a divide is too costly to duplicate into the moment updates), and both moments then read the
    gradient twice. Measured on the CPU for ViT-B/16-sized AdamW: 113 -> 77 ms per update."""
    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / optax.tree_utils.tree_norm(updates))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def layer_ids(params, model_name):
    """Each parameter's layer for layer-wise learning-rate decay, as a tree of arrays that broadcast against the
    parameters (a scanned stack gets one id per block along its leading axis), and the number of blocks n.
    Swin V2, the official grouping (get_swin_layer): patch embedding and mask token 0, block j of stage i
    sum(depths[:i]) + j + 1, a stage's downsampling with its last block, the rest (final norm, head) n + 1.
    ViT, BEiT's: embeddings, class and mask tokens 0, block i i + 1, the rest n + 1."""
    if model_name == "swinv2":
        depths = {}  # blocks per stage: unrolled layers_i_blocks_j, or scanned groups of blocks_k under layers_i_blocks
        for key, sub in params.items():
            m = re.fullmatch(r"layers_(\d+)_blocks(?:_(\d+))?", key)
            if m:
                per_key = 1 if m.group(2) else len(sub) * jax.tree.leaves(sub)[0].shape[0]
                depths[int(m.group(1))] = depths.get(int(m.group(1)), 0) + per_key
        first = {i: sum(depths.get(k, 0) for k in range(i)) for i in depths}
        n = sum(depths.values())

        def swin_id(name, x):
            if name.startswith(("patch_embed", "mask_token")):
                return np.zeros(())
            m = re.match(r"layers_(\d+)_blocks_(\d+)/", name)
            if m:
                return np.array(first[int(m.group(1))] + int(m.group(2)) + 1)
            m = re.match(r"layers_(\d+)_blocks/blocks_(\d+)/", name)
            if m:  # block j = g * group + k for the stack's index g
                i, k = int(m.group(1)), int(m.group(2))
                ids = first[i] + np.arange(x.shape[0]) * len(params[f"layers_{i}_blocks"]) + k + 1
                return ids.reshape((-1,) + (1,) * (x.ndim - 1))
            m = re.match(r"layers_(\d+)_downsample/", name)
            if m:
                return np.array(first[int(m.group(1))] + depths[int(m.group(1))])
            return np.array(n + 1)
        return jax.tree_util.tree_map_with_path(lambda p, x: swin_id(path_name(p), x), params), n
    n = jax.tree.leaves(params["blocks"])[0].shape[0] if "blocks" in params else sum(
        1 for k in params if k.startswith("block_"))

    def vit_id(name, x):
        if name.startswith(("embedding", "pos_embedding", "cls", "mask_token", "pre_norm")):
            return np.zeros(())
        if name.startswith("blocks/"):
            return (np.arange(x.shape[0]) + 1).reshape((-1,) + (1,) * (x.ndim - 1))
        m = re.match(r"block_(\d+)/", name)
        return np.array(int(m.group(1)) + 1 if m else n + 1)
    return jax.tree_util.tree_map_with_path(lambda p, x: vit_id(path_name(p), x), params), n


def scale_by_layer_decay(decay, params, model_name):
    """Updates times decay^(n + 1 - layer): the official layer-wise decay, applied once."""
    ids, n = layer_ids(params, model_name)
    scales = jax.tree.map(lambda i: jnp.asarray(decay ** (n + 1 - i), jnp.float32), ids)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(config, params):
    """Returns (optax transformation, lr(step) function giving the absolute learning rate)."""
    sched = make_schedule(config.schedule, config.total_steps)

    def lr_fn(step):
        return config.lr * sched(step)

    parts = []
    if config.get("grad_clip_norm"):
        parts.append(clip_by_global_norm(config.grad_clip_norm))
    parts.append(base_optimizer(config.optimizer, dict(config.get("optimizer_kw", {}))))
    if config.get("wd"):
        parts.append(add_decayed_weights(config.wd, wd_multipliers(params, config.wd_mults)))
    if config.get("layer_decay"):  # after the weight decay: a layer's learning rate scales both
        parts.append(scale_by_layer_decay(config.layer_decay, params, config.get("model_name", "vit")))
    parts.append(optax.scale_by_schedule(lambda step: -lr_fn(step)))
    return optax.chain(*parts), lr_fn


def count_params(params):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
