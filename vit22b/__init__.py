"""vit22b: ViT-22B and Swin Transformer V2 in JAX/Flax.

`python -m vit22b.main --config=configs/FILE.py` trains (main.py, a thin CLI). The package by concern:
models/ (the families, layers, attention, weight converters), parallel/ (meshes, logical rules, collective rings,
the planner), train/ (loop, optimizers, losses, checkpoints, metrics), input/ (Grain pipeline, preprocessing,
ArrayRecord, shipped dataset definitions) and tools/ (benchmarks, memory report, CPU-host helpers).
config_args.py parses `--config=FILE.py:ARGS`; config_check.py validates a config before anything compiles.
"""
