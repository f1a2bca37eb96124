"""Classification losses on float32 logits. Labels are integer class ids or multi-hot vectors."""
import jax
import jax.numpy as jnp
import optax

LOSSES = ("softmax_xent", "sigmoid_xent")


def as_targets(labels, num_classes, label_smoothing=0.0):
    """Integer ids -> one-hot; multi-hot passes through. Smoothing moves mass towards uniform."""
    targets = jax.nn.one_hot(labels, num_classes) if labels.ndim == 1 else labels.astype(jnp.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return targets


def per_example_loss(name, logits, labels, label_smoothing=0.0, z_loss=0.0):
    """z_loss: the coefficient of z_loss * logsumexp(logits)^2 added to softmax_xent (arXiv 2309.14322 §3.1.2: it
    keeps log Z near 0 against the output-logit divergence; 1e-4 there)."""
    targets = as_targets(labels, logits.shape[-1], label_smoothing)
    if name == "softmax_xent":
        loss = optax.softmax_cross_entropy(logits, targets)
        return loss + z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1)) if z_loss else loss
    if name == "sigmoid_xent":  # summed over classes, as in big_vision's JFT training
        return optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=-1)
    raise ValueError(f"loss: unknown loss {name!r}; expected one of {LOSSES}")


def top1_correct(logits, labels):
    """1.0 where the arg-max class is among the labels (top-1 accuracy; prec@1 for multi-label)."""
    targets = as_targets(labels, logits.shape[-1])
    return jnp.take_along_axis(targets, jnp.argmax(logits, axis=-1)[:, None], axis=-1)[:, 0] > 0
