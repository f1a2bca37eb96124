"""Training: the loop that `python -m vit22b.main` runs (loop.py: model and state construction, the jitted
train and eval steps, logging, checkpoint cadence, preemption), optimizers and schedules (optim.py), losses
(losses.py), Orbax checkpoints with the input iterator's state (checkpointing.py), and metrics.jsonl plus
TensorBoard events (metrics.py).
"""
