"""ImageNet-V2 (10,000 test images, ImageNet-1k's classes; split 'test') prepared by TFDS in ArrayRecord format
(`tfds build imagenet_v2 --file_format=array_record`); evaluate an ImageNet model with
--config.input.eval_split=test on this dataset."""
from vit22b.input.pipeline import tfds_source

NUM_CLASSES = 1000
IMAGE_SHAPE = None
MULTI_LABEL = False


def load(split, data_dir=None):
    return tfds_source("imagenet_v2", split, data_dir)
