"""python -m vit22b.main --config=configs/FILE.py[:ARGS] --workdir=DIR [--config.key=value ...] [--dry_run]"""
import os
import socket

from absl import app, flags
from ml_collections import config_flags

from vit22b.parallel import tpu  # tables only: no JAX import

config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':ARGS' for get_config(ARGS).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard events and config.json go here: a "
                    "local path, a file:// URL, or gs:// / s3:// where that filesystem is installed.")
flags.DEFINE_bool("dry_run", False, "Plan only: compile the train step for config.mesh on simulated CPU devices "
                  "(or for a TPU slice with --topology), print parameters, FLOPs and per-device memory, write "
                  "WORKDIR/plan.json.")
flags.DEFINE_bool("roofline", True, "With --topology: also count every layer's FLOPs and bytes for a roofline bound on "
                  "step time (compiles two or more smaller unrolled copies of the model: minutes for the largest).")
flags.DEFINE_integer("dry_run_devices", 0, "Devices to simulate for --dry_run (default: the mesh's size).")
flags.DEFINE_float("memory_per_device_gib", 0.0, "With --dry_run: say whether the step fits this much memory "
                   "(default with --topology: the chip's HBM).")
flags.DEFINE_string("topology", None, "With --dry_run: compile for this TPU topology with libtpu instead of simulated "
                    "CPU devices, e.g. v4:4x4x8, v5p:8x8x8, v5e:16x16, v6e:16x16, or a slice name such as v4-256.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])

# Launchers whose environment jax.distributed.initialize() reads by itself.
AUTO_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed():
    """jax.distributed in every run, a single process included: its preemption service turns a SIGTERM to any
    process into one step that all processes save (vit22b/train/loop.py)."""
    import jax
    f = flags.FLAGS
    explicit = f.coordinator_address is not None
    auto = any(os.environ.get(k) for k in AUTO_ENV) and int(os.environ.get("SLURM_NTASKS", "2")) > 1
    if not (explicit or auto):
        jax.distributed.initialize(f"127.0.0.1:{_free_port()}", num_processes=1, process_id=0)
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(f.coordinator_address, num_processes=f.num_processes, process_id=f.process_id)
    else:
        jax.distributed.initialize()


def _simulate_devices(config):
    """Before JAX starts: as many CPU devices as the target mesh has."""
    n = flags.FLAGS.dry_run_devices
    if not n:
        sizes = [int(p.split(":")[1]) for p in config.get("mesh", "data:1").split(",") if ":" in p]
        if any(s < 1 for s in sizes):
            raise app.UsageError("--dry_run with a -1 mesh axis needs --dry_run_devices")
        n = 1
        for s in sizes:
            n *= s
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    if flags.FLAGS.topology and not flags.FLAGS.dry_run:
        raise app.UsageError("--topology plans a TPU program: it needs --dry_run")
    if flags.FLAGS.topology and flags.FLAGS.dry_run_devices:
        raise app.UsageError("--dry_run_devices simulates CPU devices; with --topology the devices are the slice's")
    if flags.FLAGS.dry_run and flags.FLAGS.topology:
        try:  # a bad name stops here, before JAX starts
            tpu.describe(flags.FLAGS.topology)
        except tpu.UnknownTopologyError as e:
            raise SystemExit(f"error: {e}") from None
        os.environ["JAX_PLATFORMS"] = "cpu"  # the host's backend; the TPU devices come from libtpu's topology
    elif flags.FLAGS.dry_run:
        _simulate_devices(config)
    if not flags.FLAGS.dry_run:
        _init_distributed()
    from vit22b import config_check
    from vit22b.input import pipeline
    from vit22b.train import checkpointing, loop, resume  # after flag parsing, so --help stays fast
    try:
        if flags.FLAGS.dry_run:
            from vit22b.parallel import planner
            planner.print_plan(planner.plan(config, flags.FLAGS.workdir, flags.FLAGS.memory_per_device_gib,
                                            flags.FLAGS.topology, flags.FLAGS.roofline))
            return
        loop.run(config, flags.FLAGS.workdir)
    except (config_check.ConfigError, pipeline.DatasetNotFoundError, pipeline.BadRecordError,
            loop.NonFiniteLossError, resume.ConfigChangedError, checkpointing.CheckpointMismatchError,
            checkpointing.NoCheckpointRestoresError, tpu.UnknownTopologyError) as e:
        raise SystemExit("\n".join(f"error: {line}" for line in str(e).splitlines())) from None
    except loop.Interrupted as e:
        print(e, flush=True)
        raise SystemExit(130) from None


def _parse_flags(argv):
    """absl's parsing, with ml_collections' error for an unknown override key (a KeyError carrying its
    did-you-mean suggestion, wrapped in an AttributeError that absl would print as a traceback) as one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f"error: {e}") from None
    except (AttributeError, KeyError) as e:
        message = e
        while isinstance(message, BaseException) and message.args:
            message = message.args[0]
        bad, *hint = str(message).splitlines()
        bad = bad.strip("'")
        spec = next((a[2:].split("=")[0] for a in argv[1:]
                     if a.startswith("--config.") and bad in a.split("=")[0].split(".")), f"config.{bad}")
        raise SystemExit(f"error: {spec}: no such key{'; ' + ' '.join(hint) if hint else ''}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
