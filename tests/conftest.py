import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# One JAX compilation cache for the whole session, fresh each session (so no test meets a program compiled by an
# earlier run): the xdist workers and every subprocess inherit it through the environment. Many tests compile the
# same programs (each restart of a killed run, both processes of a multi-host run, the same tiny configs).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vit22b-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# The tests check numbers, not speed, and most of their time is XLA:CPU compiling small programs. LLVM at -O0
# compiles them faster (a Swin V2 memory test 73 -> 44 s, the Swin V2 mesh test 140 -> 95 s on a Zen 3; the
# whole suite 20.5 -> 14 min), while steps run slower (the 300 digits steps 50 -> 81 s alone), so the two long
# training runs take `cpu_env(optimized=True)`. XLA's HLO passes, and with them buffer assignment and the programs that
# the structural tests read, are the same at every level. To test the optimised machine code throughout, set
# XLA_FLAGS=--xla_backend_optimization_level=3 before running pytest.
OPTIMIZED_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in OPTIMIZED_XLA_FLAGS:
    os.environ["XLA_FLAGS"] = f"{OPTIMIZED_XLA_FLAGS} --xla_backend_optimization_level=0".strip()


def cpu_env(devices=None, optimized=False):
    """The environment for a test's subprocess: JAX on the CPU, this session's XLA flags (the optimising ones
    with OPTIMIZED, for runs that spend their time in steps rather than in compiling), DEVICES simulated."""
    flags = OPTIMIZED_XLA_FLAGS if optimized else os.environ.get("XLA_FLAGS", "")
    if devices is not None:
        flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)


def config(name, arg="runlocal", **overrides):
    """Load configs/NAME.py:ARG and apply dotted overrides ('input.batch_size': 16)."""
    from vit22b.config_args import load_config
    c = load_config(f"{CONFIGS / name}.py:{arg}" if arg else f"{CONFIGS / name}.py")
    # The monitors' forward pass enlarges every logged step's program; tests that do not look at them (CI time) go
    # without (test_monitors, test_meshes and test_train's training runs keep them).
    overrides.setdefault("monitors", ())
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


def run_main(config_spec, workdir, *flags, timeout=300, optimized=False):
    return subprocess.run(main_cmd(config_spec, workdir, *flags), cwd=REPO, env=cpu_env(optimized=optimized),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def repo():
    return REPO


def data_tool():
    """data/make_arrayrecord.py as a module (it is a script in data/, not part of the package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_arrayrecord", REPO / "data" / "make_arrayrecord.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_idx(path, array):
    """An IDX file (gzipped), the format of MNIST and Fashion-MNIST."""
    import gzip
    import struct
    import numpy as np
    array = np.asarray(array, np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def fake_fashion_mnist(data_dir, train=96, test=40, seed=0):
    """Small Fashion-MNIST-shaped IDX files converted with the real tool into DATA_DIR/fashion_mnist."""
    import numpy as np
    rng = np.random.default_rng(seed)
    src = Path(data_dir) / "idx"
    src.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = np.arange(n) % 10
        images = (rng.uniform(0, 60, (n, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
        write_idx(src / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return data_tool().fashion_mnist(str(src), str(Path(data_dir) / "fashion_mnist"))
