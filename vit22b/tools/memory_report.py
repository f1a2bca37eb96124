"""Peak memory of a config's train step from XLA's compiled memory analysis: compile only, never allocate.

  python -m vit22b.tools.memory_report --config=configs/swinv2_imagenet.py:variant=B,img=512,window=32 --batch=8

prints one line per setting: as configured, with per-block remat, with sequential (chunked) window
attention, and with both; `temp` is the activation/workspace memory XLA plans for one step.
"""
import json

import jax

from vit22b import config_check
from vit22b.parallel import planner, sharding


def train_step_memory(config, batch_size, channels=3):
    """Compile the train step of `config` for `batch_size` images; returns XLA's memory analysis in bytes."""
    config_check.validate(config)
    mesh = sharding.make_mesh("data:1", jax.devices()[:1])
    size = config.input.image_size
    m = planner.compile_train_step(config, mesh, batch_size, (size, size, channels), 1000)[0].memory_analysis()
    return {"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
            "generated_code": m.generated_code_size_in_bytes}


SETTINGS = {"as_configured": {}, "remat": {"remat_policy": "full"}, "sequential_attention": {"attn_chunks": 4},
            "remat+sequential_attention": {"remat_policy": "full", "attn_chunks": 4}}


def main(argv):
    del argv
    from absl import flags
    base = flags.FLAGS.config
    for name, overrides in SETTINGS.items():
        c = base.copy_and_resolve_references()
        c.model.update(overrides)
        m = train_step_memory(c, flags.FLAGS.batch)
        print(json.dumps({"setting": name, "batch": flags.FLAGS.batch, **{k: c.model.get(k) for k in overrides},
                          "temp_gib": round(m["temp"] / 2 ** 30, 3), "arguments_gib": round(m["arguments"] / 2 ** 30, 3)}),
              flush=True)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Config file with optional ':ARGS'.", lock_config=False)
    flags.DEFINE_integer("batch", 8, "Images per step to plan for.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
