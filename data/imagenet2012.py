"""ImageNet-1k (ILSVRC 2012) prepared by TFDS in ArrayRecord format under the data directory."""
from vit22b.input_pipeline import require_prepared, tfds_source

NUM_CLASSES = 1000
IMAGE_SHAPE = None
MULTI_LABEL = False


def load(split, data_dir=None):
    path = require_prepared("imagenet2012", data_dir, "Prepare it with `tfds build imagenet2012 "
                            "--file_format=array_record --data_dir=...` (the archives are downloaded by hand).")
    return tfds_source(path, split, image_key="image", label_key="label")
