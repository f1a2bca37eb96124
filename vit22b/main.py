"""python -m vit22b.main --config=configs/FILE.py[:ARGS] --workdir=DIR [--config.key=value ...]"""
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':ARGS' for get_config(ARGS).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from vit22b import config_check, input_pipeline, train  # after flag parsing, so --help stays fast
    try:
        train.run(flags.FLAGS.config, flags.FLAGS.workdir)
    except (config_check.ConfigError, input_pipeline.DatasetNotFoundError, train.NonFiniteLossError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
