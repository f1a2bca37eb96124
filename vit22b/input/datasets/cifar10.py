"""CIFAR-10 (32x32, 10 classes; splits train / test) prepared by TFDS in ArrayRecord format."""
from vit22b.input.pipeline import tfds_source

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
MULTI_LABEL = False


def load(split, data_dir=None):
    return tfds_source("cifar10", split, data_dir)
