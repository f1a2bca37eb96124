"""Fashion-MNIST (70,000 28x28 grey images, 10 classes: 60,000 train, 10,000 test), converted without network
from the IDX files of Debian's dataset-fashion-mnist package into ArrayRecord files under
DATA_DIR/fashion_mnist (DATA_DIR = --config.input.data_dir or $TFDS_DATA_DIR or ~/tensorflow_datasets):

  apt-get install dataset-fashion-mnist
  python data/make_arrayrecord.py fashion_mnist --out ~/tensorflow_datasets/fashion_mnist
"""
import os

from vit22b.input import records
from vit22b.input.pipeline import DatasetNotFoundError, require_prepared

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
MULTI_LABEL = False
HOW = ("Convert it with `apt-get install dataset-fashion-mnist && python data/make_arrayrecord.py fashion_mnist "
       "--out {}`.")


def load(split, data_dir=None):
    path = require_prepared("fashion_mnist", data_dir, HOW.format(os.path.join(data_dir, "fashion_mnist")))
    if not records.shard_paths(path, split):
        raise DatasetNotFoundError(f"input.split: no {split!r} shards in {path}; splits are 'train' and 'test'. "
                                   + HOW.format(path))
    return records.RecordSource(path, split)
