"""ImageNet-1k (ILSVRC 2012) prepared by TFDS in ArrayRecord format under the data directory."""
import os

from vit22b.input_pipeline import DatasetNotFoundError, tfds_source

NUM_CLASSES = 1000
IMAGE_SHAPE = None
MULTI_LABEL = False
NAME = "imagenet2012"


def load(split, data_dir=None):
    path = os.path.join(data_dir, NAME)
    if not os.path.isdir(path):
        raise DatasetNotFoundError(
            f"dataset {NAME!r} not found: no directory {path} (data directory {data_dir!r}, from "
            f"--config.input.data_dir or $TFDS_DATA_DIR). Prepare it with `tfds build imagenet2012 "
            f"--file_format=array_record --data_dir=...` (the archives must be downloaded by hand), or point the "
            f"config at another dataset, e.g. --config.input.data=digits.")
    return tfds_source(path, split, image_key="image", label_key="label", num_classes=None)
