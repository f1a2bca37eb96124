"""Parameters written by the code before the reference layers (tests/data/pre_reference/, made at commit 55b95a6
by tests/data/make_pre_reference_checkpoints.py) restore through config.model_init's loader into today's models,
which initialise the same tree with the same values and give the same logits."""
import os
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from vit22b import models
from vit22b.train import checkpointing

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
sys.path.insert(0, DATA)
from make_pre_reference_checkpoints import CASES, flat  # noqa: E402


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpoint_from_before_restores_with_identical_logits(name, impl="reference"):  # cpu: test_cpu_kernels
    family, cfg, size, classes = CASES[name]
    stored = np.load(os.path.join(DATA, "pre_reference", name, "expected.npz"))
    model = models.build(family, dict(cfg, impl=impl), classes, size)
    init = nn.meta.unbox(model.init(jax.random.PRNGKey(0), stored["images"][:1])["params"])
    # The same tree, names and seed-0 values as before (to the last bit where compiled with the same XLA flags and
    # jax 0.10; the suite's LLVM -O0, conftest.py, and jax 0.12's initialisers differ in the last bits: 2.4e-6).
    now = flat(init)
    assert sorted("init" + k for k in now) == sorted(k for k in stored.files if k.startswith("init"))
    for key, value in now.items():
        want = stored["init" + key]
        np.testing.assert_allclose(value, want, rtol=5e-6, atol=5e-6 * np.abs(want).max(), err_msg=key)
    shardings = jax.tree.map(lambda x: jax.sharding.make_single_device_sharding(jax.devices()[0]), init)
    params, _ = checkpointing.load_params(os.path.join(DATA, "pre_reference", name, "params"), init, shardings)
    logits = jax.jit(model.apply)({"params": params}, stored["images"])
    np.testing.assert_allclose(logits, stored["logits"], rtol=1e-5, atol=1e-5 * np.abs(stored["logits"]).max())
