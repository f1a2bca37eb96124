"""JFT-style multi-label data (JFT-3B/4B is private): a TFDS dataset named `jft` prepared in ArrayRecord
format under the data directory, with features `image` (encoded) and `labels` (class ids).

ViT-22B's JFT has about 30k classes (big_vision's JFT-3B config: 29,593).
"""
import os

from vit22b.input_pipeline import DatasetNotFoundError, tfds_source

NUM_CLASSES = 29_593
IMAGE_SHAPE = None  # variable-size images, resized by the pipeline
MULTI_LABEL = True
NAME = "jft"


def load(split, data_dir=None):
    path = os.path.join(data_dir, NAME)
    if not os.path.isdir(path):
        raise DatasetNotFoundError(
            f"dataset {NAME!r} not found: no directory {path} (data directory {data_dir!r}, from "
            f"--config.input.data_dir or $TFDS_DATA_DIR). JFT is private: prepare it with TFDS in ArrayRecord "
            f"format there, or point the config at another dataset, e.g. --config.input.data=digits "
            f"(datasets are defined in data/*.py).")
    return tfds_source(path, split, image_key="image", label_key="labels", num_classes=NUM_CLASSES)
