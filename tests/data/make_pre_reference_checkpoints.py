"""Writes tests/data/pre_reference/: tiny models' parameters as `python -m vit22b.models.convert` writes them (Orbax
params checkpoints for config.model_init), with inputs, logits and the seed-0 initialisation, computed by the code
before the reference layers replaced the CPU kernels (commit 55b95a6). tests/test_checkpoint_compat.py restores
them into today's code. Run from the repository root: python tests/data/make_pre_reference_checkpoints.py
"""
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vit22b import models

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pre_reference")
# name: (model_name, model config, image size, classes)
CASES = {
    "vit22b_design": ("vit", dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4), 16, 5),
    "vit_classic": ("vit", dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4, block="sequential",
                                qk_norm=False, qkv_bias=True, norm="layernorm", head="token", scan=False), 16, 5),
    "swinv2": ("swinv2", dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, drop_path_rate=0.0,
                          pretrained_window_sizes=(3, 0)),
               32, 5),
}


def flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    for name, (family, cfg, size, classes) in CASES.items():
        model = models.build(family, cfg, classes, size)
        images = jax.random.uniform(jax.random.PRNGKey(1), (2, size, size, 3), jnp.float32, -1, 1)
        init = nn.meta.unbox(model.init(jax.random.PRNGKey(0), images[:1])["params"])
        # Perturb every parameter so that no path is an identity (Swin's zero-initialised block norms, unit scales,
        # zero biases and the zero classifier).
        leaves, treedef = jax.tree.flatten(init)
        keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
        params = treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
        logits = model.apply({"params": params}, images)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(OUT, name, "params"), params)
        np.savez(os.path.join(OUT, name, "expected.npz"), images=np.asarray(images), logits=np.asarray(logits),
                 **{"init" + k: v for k, v in flat(init).items()})
        print(name, logits.shape, float(jnp.abs(logits).mean()))


if __name__ == "__main__":
    main()
