"""Training: the loop that `python -m vit22b.main` runs (loop.py: model and state construction, the jitted
train and eval steps, logging, checkpoint cadence, preemption), what a run learns (tasks.py: classification or
SimMIM), optimizers and schedules (optim.py, with layer-wise decay), losses (losses.py), evaluators on frozen
features (evaluators.py), Orbax checkpoints with the input iterator's state (checkpointing.py), and
metrics.jsonl plus TensorBoard events and pictures (metrics.py).
"""
