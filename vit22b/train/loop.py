"""The training loop: jitted, sharded, donated train step; periodic exact evaluation; Orbax checkpoints.

`run(config, workdir)` is everything `python -m vit22b.main` does; the pieces (`build_model`,
`create_train_state`, `make_train_step`, `evaluate`) are importable for notebooks.
"""
import math
import os
import signal
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from vit22b import config_check, paths
from vit22b.input import pipeline, preprocess
from vit22b.parallel import sharding
from vit22b.models import simmim as simmim_lib
from vit22b.train import checkpointing, evaluators, monitors, optim, resume, tasks
from vit22b.train.metrics import MetricsWriter


class NonFiniteLossError(FloatingPointError):
    pass


def build_model(config, num_classes):
    """The config's model: a classifier, or with config.simmim its encoder inside SimMIM (vit22b/train/tasks.py)."""
    return tasks.build_model(config, num_classes)


def rules_of(config):
    return tuple(tuple(r) for r in config.get("sharding_rules") or sharding.DEFAULT_RULES)


def abstract_train_state(model, config, mesh, image_shape, rules=None):
    """Shapes and shardings of {params, opt_state, step, rng}, from `jax.eval_shape` (nothing allocated).

    Returns (init_fn, abstract_state, state_shardings, tx, lr_fn); `init_fn()` makes the state from
    `config.seed`. Its random keys are split inside the traced function, so nothing runs eagerly: the planner
    traces this for devices that are not attached (a TPU topology compiled on a CPU host).
    """
    rules = rules_of(config) if rules is None else rules
    dummy = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)

    def keys():
        return jax.random.split(jax.random.PRNGKey(config.seed))

    boxed = jax.eval_shape(lambda x: model.init(keys()[0], x), dummy)["params"]
    tx, lr_fn = optim.make_optimizer(config, sharding.strip_boxes(boxed))

    def init():
        init_rng, train_rng = keys()
        params = nn.meta.unbox(model.init(init_rng, jnp.zeros(dummy.shape, dummy.dtype))["params"])
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
                "rng": train_rng}

    abstract = jax.eval_shape(init)
    p_shardings = sharding.param_shardings(boxed, mesh, rules)
    shardings = {
        "params": p_shardings,
        "opt_state": sharding.opt_state_shardings(abstract["opt_state"], abstract["params"], p_shardings, mesh,
                                                  zero1=config.get("optimizer_sharding", "replicated") == "zero1"),
        "step": sharding.replicated(mesh), "rng": sharding.replicated(mesh)}
    return init, abstract, shardings, tx, lr_fn


def create_train_state(model, config, mesh, image_shape, rules=None):
    """Initialise the train state directly with its shardings (never on one device first).

    Returns (state, state_shardings, tx, lr_fn).
    """
    init, _, shardings, tx, lr_fn = abstract_train_state(model, config, mesh, image_shape, rules)
    state = jax.jit(init, out_shardings=shardings)()
    return state, shardings, tx, lr_fn


def abstract_batch(batch_size, image_shape, num_classes, multi_label=False, config=None):
    """Shapes of one global training batch, as the input pipeline makes it (for lowering without data); with a
    SimMIM `config`, the token masks instead of labels."""
    batch = {"image": jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), jnp.float32),
             "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}
    if config is not None and tasks.is_simmim(config):
        side = image_shape[0] // tasks.model_patch(config)
        return batch | {"simmim_mask": jax.ShapeDtypeStruct((batch_size, side, side), jnp.int32)}
    label = ((batch_size, num_classes), jnp.float32) if multi_label else ((batch_size,), jnp.int32)
    return batch | {"label": jax.ShapeDtypeStruct(*label)}


def microbatches(batch, accum):
    """The batch as [accum, batch / accum, ...]: microbatch j takes examples j, j + accum, ... The batch axis stays
    sharded as it came, every device giving each microbatch its share (a contiguous split would put each
    microbatch on a few devices)."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1), batch)


def make_train_step(model, tx, lr_fn, config, state_shardings, mesh, norms=True, monitor=()):
    """The jitted step; trace, lower and call it inside `sharding.activate(mesh, rules)`.

    Its metrics are loss, grad_norm and lr, plus param_norm and update_norm when `norms`. Those two cost two
    extra passes over the parameters, and the update tree is then written out instead of fused into the
    parameter update: 65 ms of a 2.8 s ViT-B/16 bf16 step on 2 CPU cores. So `run` uses the variant
    without them between log steps. `monitor`: names from config.monitors, measured on the first microbatch
    before the update (vit22b/train/monitors.py) and returned under metrics["monitor"]; `run` asks for them on
    logged steps only."""
    smoothing = config.get("label_smoothing", 0.0)
    accum = config.get("grad_accum_steps", 1)

    def loss_and_grads(params, batch, rng):
        # The batch loss is sum(example losses) / normaliser(sum(weights)) (vit22b/train/tasks.py; records the
        # pipeline could not decode weigh 0); each microbatch adds its sum over the whole batch's normaliser, so
        # the sum of their gradients is the whole batch's.
        count = tasks.normaliser(config, tasks.batch_weight(model, batch, config))

        def loss_fn(params, micro, rng):
            sums, _, _ = tasks.example_losses(model, params, micro, config, train=True, rng=rng, smoothing=smoothing)
            return sums.sum() / count

        if accum == 1:
            return jax.value_and_grad(loss_fn)(params, batch, rng)
        micro = microbatches(batch, accum)

        def add(total, xs):
            mb, j = xs
            loss, grads = jax.value_and_grad(loss_fn)(params, mb, jax.random.fold_in(rng, j))
            return jax.tree.map(jnp.add, total, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        loss, grads = jax.lax.scan(add, zeros, (micro, jnp.arange(accum)))[0]  # summed in float32
        return loss, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    def step_fn(state, batch):
        rng = jax.random.fold_in(state["rng"], state["step"])
        loss, grads = loss_and_grads(state["params"], batch, rng)
        if monitor:  # microbatch 0 as loss_and_grads splits the batch
            first = batch if accum == 1 else jax.tree.map(lambda x: x[0], microbatches(batch, accum))
            monitored = monitors.compute(model, state["params"], first, config, monitor)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state["step"])}
        if norms:
            metrics.update(param_norm=optax.tree.norm(params), update_norm=optax.tree.norm(updates))
        if monitor:
            metrics["monitor"] = monitored
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
        return new_state, metrics

    data = sharding.batch_sharding(mesh)
    return jax.jit(step_fn, in_shardings=(state_shardings, data), out_shardings=(state_shardings,
                   sharding.replicated(mesh)), donate_argnums=0)


def make_eval_step(model, config, param_shardings, mesh):
    def eval_fn(params, batch):
        return tasks.eval_sums(model, params, batch, config)

    return jax.jit(eval_fn, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def to_device(batch, mesh):
    s = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(s, np.asarray(v)) for k, v in batch.items()}


def evaluate(eval_step, params, source, config, mesh, info, first_batch=None):
    """Over every example of `source` exactly once: top-1 accuracy and mean loss (SimMIM: the reconstruction
    loss). `first_batch`: a list that receives the first batch's model inputs (for SimMIM's picture)."""
    totals = {}
    bad = 0
    for batch in pipeline.eval_batches(source, **pipeline_kwargs(config, info, "eval")):
        bad += int(batch.pop("bad").sum())
        inputs = _model_inputs(batch, config)
        if first_batch is not None and not first_batch:
            first_batch.append(inputs)
        out = jax.device_get(eval_step(params, to_device(inputs, mesh)))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    bad = _sum_over_processes(bad)
    if int(totals["count"]) + bad != len(source):
        raise RuntimeError(f"evaluation saw {totals['count']} examples and {bad} bad records; the split has "
                           f"{len(source)}")
    return tasks.eval_metrics(config, totals) | {"eval/bad_records": bad}


def _model_inputs(batch, config):
    return {k: v for k, v in batch.items() if k in tasks.input_keys(config)}


def _sum_over_processes(n):
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils
    return int(np.sum(multihost_utils.process_allgather(np.int64(n))))


def load_data(config):
    """Dataset info plus train/eval sources; a missing dataset fails here, before any compilation.

    Returns (info, train_source, eval_source or None, model input shape (H, W, C))."""
    module = pipeline.dataset_module(config.input.data)
    ddir = pipeline.data_dir(config.input)
    info = pipeline.dataset_info(module, ddir)
    train_source = pipeline.load_split(module, config.input.get("split", "train"), ddir)
    eval_split = config.input.get("eval_split")
    eval_source = pipeline.load_split(module, eval_split, ddir) if eval_split else None
    size = config.input.image_size  # the preprocess chain brings images to this size
    return info, train_source, eval_source, (size, size, info.channels)


def pipeline_kwargs(config, info, split="train"):
    """The input-pipeline arguments a config asks for, for training or evaluation."""
    inp = config.input
    pp = inp.get("pp_train" if split == "train" else "pp_eval") or pipeline.default_pp(
        inp.image_size, info.channels)
    if tasks.is_simmim(config):  # each example's mask, drawn from its (seed, position) as every random choice
        pp = f"{pp}|{tasks.mask_op(config)}"
    kw = dict(pp=pp, num_classes=info.num_classes, multi_label=info.multi_label,
              on_bad_record=inp.get("on_bad_record", "skip"),
              process_index=jax.process_index(), process_count=jax.process_count())
    if split == "train":
        kw.update(seed=config.seed, batch_size=inp.batch_size,
                  mix=dict(inp.mixup) if inp.get("mixup") else None)
    else:
        kw.update(batch_size=inp.get("eval_batch_size", inp.batch_size))
    return kw


def _check_finite(pending):
    for step, m in pending:
        for key in ("loss", "grad_norm"):
            if not np.isfinite(m[key]):
                raise NonFiniteLossError(
                    f"train/{key} is {m[key]} at step {step}; stopping. The last good checkpoint is kept.")


class Interrupted(Exception):
    """Ctrl-C: the run saved a checkpoint and stopped (the CLI exits with status 130)."""


def _sigint_as_preemption():
    """Where JAX's preemption service runs (the CLI starts jax.distributed, one process included), Ctrl-C takes the
    preemption path: a SIGTERM to this process, so that every process saves the same step. A second Ctrl-C
    interrupts at once. Returns (an Event set on Ctrl-C, the previous handler or None)."""
    event = threading.Event()
    if not jax.distributed.is_initialized() or threading.current_thread() is not threading.main_thread():
        return event, None

    def on_sigint(*_):
        event.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGTERM)

    return event, signal.signal(signal.SIGINT, on_sigint)


def run(config, workdir):
    """Train (or resume) according to `config` in `workdir`. Returns the last metrics logged."""
    config_check.validate(config)
    info, train_source, eval_source, image_shape = load_data(config)
    mesh = sharding.make_mesh(config.get("mesh", "data:-1"))
    with sharding.activate(mesh, rules_of(config)):
        return _train(config, workdir, mesh, info, train_source, eval_source, image_shape)


def check_pipeline_output(config, info, source, image_shape, split):
    """The preprocess chain must produce the model's input shape; say so before anything compiles."""
    kw = pipeline_kwargs(config, info, split)
    ex = pipeline.placeholder_for(source, preprocess.parse(kw["pp"]), info.num_classes, info.multi_label)
    if tuple(ex["image"].shape) != tuple(image_shape):
        field = "input.pp_train" if split == "train" else "input.pp_eval"
        raise config_check.ConfigError(
            f"config.{field}: {kw['pp']!r} makes images of shape {tuple(ex['image'].shape)}, but the model takes "
            f"{tuple(image_shape)} (input.image_size, and {image_shape[2]} channels of dataset "
            f"{config.input.data!r})")


def _train(config, workdir, mesh, info, train_source, eval_source, image_shape):
    is_main = jax.process_index() == 0
    check_pipeline_output(config, info, train_source, image_shape, "train")
    if eval_source is not None:
        check_pipeline_output(config, info, eval_source, image_shape, "eval")
    model = build_model(config, info.num_classes)
    manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
    newest = checkpointing.newest_run_info(manager)
    if newest is not None:  # before anything compiles
        resume.check(newest[1]["config"], config, paths.resolve(workdir))

    state, shardings, tx, lr_fn = create_train_state(model, config, mesh, image_shape)
    n_params = optim.count_params(state["params"])

    def make_iterator(run_info):
        offset, restore_position = resume.input_start(run_info, config)
        dataset = pipeline.train_dataset(train_source, offset=offset, **pipeline_kwargs(config, info))
        return pipeline.train_iterator(dataset, config.input.get("num_threads", 2), config.input.get("prefetch", 8),
                                       config.input.get("num_workers", 0)), restore_position

    restored = checkpointing.restore_latest(manager, checkpointing.abstract_like(state, shardings), make_iterator)
    if restored is not None:
        start, state, iterator, run_info = restored
        logging.info("Resumed from step %d in %s", start, workdir)
    else:
        start, run_info = 0, None
        iterator, _ = make_iterator(None)
        if config.get("model_init"):
            state["params"], note = checkpointing.load_params(config.model_init, state["params"],
                                                              shardings["params"], model)
            if is_main:
                print(f"Initialised parameters from {config.model_init}" + (f"; {note}" if note else ""), flush=True)
    writer = MetricsWriter(workdir, resumed_step=start, enabled=is_main)
    if tasks.is_simmim(config) and start == 0:  # the mask configuration's AvgDist (SimMIM's guide), once per run
        s = config.simmim
        writer.write(0, {"simmim/avg_dist": simmim_lib.avg_dist(config.input.image_size, s.get("mask_patch_size", 32),
                                                                s.get("mask_ratio", 0.6))})
    if is_main:
        (paths.resolve(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
        print(f"{model.__class__.__name__} with {n_params:,} parameters; {jax.device_count()} devices; "
              f"steps {start}..{config.total_steps}", flush=True)

    train_step = make_train_step(model, tx, lr_fn, config, shardings, mesh, monitor=monitors.kinds(config))
    quiet_step = make_train_step(model, tx, lr_fn, config, shardings, mesh, norms=False)  # compiled on first use
    eval_step = make_eval_step(model, config, shardings["params"], mesh)

    sigint, previous_sigint = _sigint_as_preemption()

    total, batch_size = config.total_steps, config.input.batch_size
    # Where this run's input stream starts, in examples, and how many examples the restored state had seen (a
    # checkpoint from before these were saved implies the same batch size throughout).
    input_offset = resume.input_start(run_info, config)[0]
    examples_seen = run_info["examples_seen"] if run_info else start * batch_size
    stored_config = resume.config_dict(config)
    pending, last = [], {}
    t0, step0 = time.perf_counter(), start
    data_wait, bad_records = 0.0, 0  # seconds blocked on the input pipeline since the last log; bad records read
    try:
        for step in range(start + 1, total + 1):
            t_wait = time.perf_counter()
            batch = next(iterator)
            data_wait += time.perf_counter() - t_wait
            bad_records += int(batch.pop("bad").sum())
            logged = step % config.log_every == 0 or step == total
            state, metrics = (train_step if logged else quiet_step)(state, to_device(_model_inputs(batch, config),
                                                                                      mesh))
            pending.append((step, metrics))
            # A preemption notice (SIGTERM to any process) makes every process stop at the same step, which JAX's
            # preemption service picks after the notice; that step is saved and logged (without the two norms).
            preempted = manager.reached_preemption(step)
            final = step == total or preempted
            do_log = step % config.log_every == 0 or final
            do_eval = eval_source is not None and (step % config.eval_every == 0 or step == total)
            do_ckpt = step % config.checkpoint_every == 0 or final
            if not (do_log or do_eval or do_ckpt):
                continue
            pending = [(s, jax.device_get(m)) for s, m in pending]
            _check_finite(pending)
            if do_log:
                dt = time.perf_counter() - t0
                steps_per_s = (step - step0) / dt
                m = dict(pending[-1][1])
                monitored = monitors.flatten(m.pop("monitor")) if "monitor" in m else {}
                row = {f"train/{k}": v for k, v in m.items()} | monitored
                row.update({"train/steps_per_s": steps_per_s, "train/img_per_s": steps_per_s * batch_size,
                            # a stalled input pipeline shows here: the share of wall time spent waiting for data
                            "train/data_wait_s": data_wait / (step - step0), "train/data_wait_frac": data_wait / dt,
                            "train/bad_records": _sum_over_processes(bad_records)})
                writer.write(step, row)
                last.update(row)
                eta = (total - step) / steps_per_s if steps_per_s else math.inf
                if is_main:
                    print(f"step {step}/{total} loss {m['loss']:.4f} lr {m['lr']:.3g} "
                          f"steps/s {steps_per_s:.2f} img/s {steps_per_s * batch_size:.1f} "
                          f"ETA {_fmt_time(eta)}", flush=True)
                t0, step0, data_wait = time.perf_counter(), step, 0.0
            pending = []
            if do_eval:
                t_eval = time.perf_counter()
                shown = [] if tasks.is_simmim(config) else None
                ev = evaluate(eval_step, state["params"], eval_source, config, mesh, info, shown)
                if config.get("evals"):  # on frozen features: few-shot, linear probe (vit22b/train/evaluators.py)
                    ev.update(evaluators.run(config.evals, model, state["params"], config))
                if shown and is_main:  # original, masked input, reconstruction
                    writer.write_image(step, "eval/reconstruction", tasks.reconstruction_picture(
                        model, jax.device_get(state["params"]), shown[0], config))
                writer.write(step, ev)
                last.update(ev)
                if is_main:
                    accuracy = f"eval/accuracy {ev['eval/accuracy']:.4f} " if "eval/accuracy" in ev else ""
                    print(f"step {step}/{total} {accuracy}eval/loss {ev['eval/loss']:.4f} "
                          f"({len(eval_source)} examples)", flush=True)
                t0 += time.perf_counter() - t_eval  # keep eval time out of the training throughput
            if do_ckpt:
                checkpointing.save(manager, step, state, iterator, dict(
                    config=stored_config, input_offset=input_offset,
                    examples_seen=examples_seen + (step - start) * batch_size))
            if preempted:
                manager.wait_until_finished()
                if sigint.is_set():
                    raise Interrupted(f"Interrupted (SIGINT): saved a checkpoint at step {step}; exiting.")
                if is_main:
                    print(f"Preempted: saved a checkpoint at step {step}; exiting.", flush=True)
                break
    finally:
        if hasattr(iterator, "close"):  # stops mp_prefetch worker processes
            iterator.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)
    last["step"] = int(jax.device_get(state["step"]))
    return last


def _fmt_time(seconds):
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
