"""vit22b: ViT-22B and Swin Transformer V2 in JAX/Flax."""
from setuptools import find_packages, setup

MIMALLOC = ("cmeel-mimalloc>=3.2,<4; platform_system == 'Linux' and "
            "(platform_machine == 'x86_64' or platform_machine == 'aarch64')")

setup(
    name="vit22b",
    version="0.1.0",
    description="Training the largest vision transformers (ViT-22B, Swin V2) with JAX, Flax, Optax, Orbax and Grain.",
    python_requires=">=3.10",
    packages=find_packages(include=["vit22b", "vit22b.*"]),
    install_requires=[
        "jax>=0.7,<0.13",  # 0.10 on Python 3.11, 0.12 on Python >= 3.12
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.12,<0.3",
        "array-record>=0.8",  # local ArrayRecord datasets (vit22b/input/records.py)
        "pillow>=10",  # image decoding and augmentation (vit22b/input/preprocess.py)
        "tensorflow-datasets>=4.9.9,<5",
        "ml-collections>=1.0,<2",
        "etils[epath]>=1.7",  # every path the run reads or writes (local, gs://, s3://)
        "absl-py>=2.1",
        "numpy>=1.26",
        "scikit-learn>=1.4",  # ships the bundled digits dataset
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    ],
    extras_require={
        # CPU hosts: an allocator that keeps freed memory, for the opt-in `eval "$(python -m vit22b.tools.hugepages)"`
        # (wheels for Linux with glibc >= 2.28 on x86-64 and ARM).
        "cpu": [MIMALLOC],
        "test": [
            MIMALLOC,  # the opt-in's tests
            "pytest>=8",
            "pytest-xdist>=3.5",  # the suite runs on 2 workers (README's test command)
            "setuptools>=70.1",  # tests/test_packaging.py builds the package's wheel offline (bdist_wheel built in)
            "nbformat>=5.9",
            "nbclient>=0.10",
            "ipykernel>=6.29",
            "matplotlib>=3.8",
            # Swin V2 parity with timm; these two torch builds are the ones timm's torchvision import accepts.
            "torch==2.14.1",
            "torchvision==0.29.1",
            "timm>=1.0.15",
            "safetensors>=0.4",
            # The TPU compiler for `--dry_run --topology` (tests/test_tpu_plan.py). jax[tpu] 0.12.1 asks for
            # libtpu 0.0.53, which the package index here lacks; 0.0.52 compiles for TPU topologies beside jax 0.10
            # and 0.12.
            "libtpu==0.0.52; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
    },
)
