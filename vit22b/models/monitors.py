"""Instability monitors inside the models: per-block statistics that the blocks `sow` into Flax collections, computed
only when the caller applies the model with that collection mutable (vit22b/train/monitors.py does so on logged
steps). Otherwise nothing here is traced and the program is unchanged.

- ATTENTION: the largest attention logit (after QK-norm or Swin's cosine scaling, with the position bias, without
  masked entries) and the mean attention entropy in nats (Zhai et al. 2023), both recomputed from q and k in float32
  beside the attention itself, so that they are the same whichever kernel (cuDNN, Pallas) computes the attention;
  under QK-norm also the gain that bounds the logits (`record_qk_gain`).
- RESIDUAL: the RMS of the residual stream after each block and of each branch's contribution to it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION = "monitor_attention"
RESIDUAL = "monitor_residual"
COLLECTIONS = (ATTENTION, RESIDUAL)
# nn.scan's variable_axes for scanned blocks: the sown values stack over the layers as the parameters do.
SCAN_AXES = {"params": 0, ATTENTION: 0, RESIDUAL: 0}


def wanted(module, collection):
    """Whether the current apply asked for this monitor collection; never in init, which makes every collection
    mutable (computing the statistics there would only slow its compilation and return them with the params)."""
    return module.is_mutable_collection(collection) and not module.is_initializing()


def record(module, collection, name, value):
    """Sow a float32 scalar (or small array) of stop-gradient statistics, if this collection was asked for."""
    if wanted(module, collection):
        module.sow(collection, name, jax.lax.stop_gradient(jnp.asarray(value, jnp.float32)))


def rms(x):
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.mean(x * x))


def attention_stats(q, k, *, scale, bias=None, mask=None):
    """(max logit, mean entropy) of softmax(scale * q k^T + bias + mask) over q [B, Lq, H, D] and k [B, Lk, H, D].

    bias: None or [G, H, Lq, Lk] added to batch element i from bias[i % G] (as `attention.attention` takes it).
    mask: None or [G, Lq, Lk] additive (Swin's -100 shift mask): in the softmax, and its entries are left out of
    the max. Entropy -sum p log p = logsumexp(z) - sum p z, averaged over batch, heads and queries."""
    b, lq, h, _ = q.shape
    z = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    groups = max(1 if bias is None else bias.shape[0], 1 if mask is None else mask.shape[0])
    z = z.reshape(b // groups, groups, *z.shape[1:])
    if bias is not None:
        z = z + bias.astype(jnp.float32)
    allowed = None
    if mask is not None:
        allowed = (mask == 0)[:, None]
        z = z + mask.astype(jnp.float32)[:, None]
    max_logit = jnp.max(z if allowed is None else jnp.where(allowed, z, -jnp.inf))
    # On logits shifted by their row's max: unshifted, float32 rounding of logits ~1e7 gave entropies of -27 nats.
    z = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jnp.exp(z - lse[..., None])
    entropy = lse - jnp.sum(p * z, axis=-1)
    return jax.lax.stop_gradient(max_logit), jax.lax.stop_gradient(jnp.mean(entropy))


def record_attention(module, q, k, **kw):
    """`attention_stats` sown as max_attn_logit and attn_entropy, if ATTENTION was asked for."""
    if wanted(module, ATTENTION):
        max_logit, entropy = attention_stats(q, k, **kw)
        record(module, ATTENTION, "max_attn_logit", max_logit)
        record(module, ATTENTION, "attn_entropy", entropy)


def record_qk_gain(module, q_scale, k_scale):
    """Sow max_i |gamma_q,i gamma_k,i|, the QK-norm gains' product: logits are bounded by sqrt(head_dim) times it (RMS
    or LayerNorm without bias), so under QK-norm they can grow only through it."""
    if wanted(module, ATTENTION):
        q_scale, k_scale = nn.meta.unbox((q_scale, k_scale))  # as read from module.variables, maybe still boxed
        gain = jnp.max(jnp.abs(q_scale.astype(jnp.float32) * k_scale.astype(jnp.float32)))
        record(module, ATTENTION, "qk_gain", gain)
