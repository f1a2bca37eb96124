"""scikit-learn's handwritten digits: 1,797 8x8 grey images (values 0..16), 10 classes, no download.

Split: a fixed stratified 80/20 split (seed 0): 1,437 train, 360 test.
"""
import numpy as np

from vit22b.input.pipeline import ArraySource

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
MULTI_LABEL = False
SPLITS = {"train": 1437, "test": 360}


def load(split, data_dir=None):
    """Returns a random-access source of {'image': float32 [8, 8, 1] in [0, 1], 'label': int32}."""
    del data_dir  # ships inside scikit-learn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    if split not in SPLITS:
        raise ValueError(f"input.split: digits has splits {sorted(SPLITS)}, not {split!r}")
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)[..., None]
    labels = d.target.astype(np.int32)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=SPLITS["test"], random_state=0,
                                           stratify=labels)
    idx = np.sort(idx_train if split == "train" else idx_test)
    return ArraySource(images[idx], labels[idx])

