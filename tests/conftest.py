import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def config(name, arg="runlocal", **overrides):
    """Load configs/NAME.py:ARG and apply dotted overrides ('input.batch_size': 16)."""
    from vit22b.config_args import load_config
    c = load_config(f"{CONFIGS / name}.py:{arg}" if arg else f"{CONFIGS / name}.py")
    return override(c, overrides)


def override(c, overrides):
    """Set dotted keys, allowing a value of another type (to build deliberately bad configs)."""
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        with node.ignore_type():
            node[leaf] = value
    return c


def main_cmd(config_spec, workdir, *flags):
    return [sys.executable, "-m", "vit22b.main", f"--config={config_spec}", f"--workdir={workdir}", *flags]


def run_main(config_spec, workdir, *flags, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(main_cmd(config_spec, workdir, *flags), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def repo():
    return REPO
