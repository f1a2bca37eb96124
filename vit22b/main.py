"""python -m vit22b.main --config=configs/FILE.py[:ARGS] --workdir=DIR [--config.key=value ...] [--dry_run]"""
import os

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':ARGS' for get_config(ARGS).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard events and config.json go here: a "
                    "local path, a file:// URL, or gs:// / s3:// where that filesystem is installed.")
flags.DEFINE_bool("dry_run", False, "Plan only: compile the train step for config.mesh on simulated CPU devices, "
                  "print parameters, FLOPs and per-device memory, write WORKDIR/plan.json.")
flags.DEFINE_integer("dry_run_devices", 0, "Devices to simulate for --dry_run (default: the mesh's size).")
flags.DEFINE_float("memory_per_device_gib", 0.0, "With --dry_run: say whether the step fits this much memory.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])

# Launchers whose environment jax.distributed.initialize() reads by itself.
AUTO_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID")


def _init_distributed():
    import jax
    f = flags.FLAGS
    explicit = f.coordinator_address is not None
    auto = any(os.environ.get(k) for k in AUTO_ENV) and int(os.environ.get("SLURM_NTASKS", "2")) > 1
    if not (explicit or auto):
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
    if flags.FLAGS.dry_run:
        _simulate_devices(config)
    if not flags.FLAGS.dry_run:
        _init_distributed()
    from vit22b import config_check
    from vit22b.input import pipeline
    from vit22b.train import loop  # after flag parsing, so --help stays fast
    try:
        if flags.FLAGS.dry_run:
            from vit22b.parallel import planner
            planner.print_plan(planner.plan(config, flags.FLAGS.workdir, flags.FLAGS.memory_per_device_gib))
            return
        loop.run(config, flags.FLAGS.workdir)
    except (config_check.ConfigError, pipeline.DatasetNotFoundError, pipeline.BadRecordError,
            loop.NonFiniteLossError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
