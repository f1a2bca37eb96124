"""JFT-style multi-label data (JFT-3B/4B is private): a TFDS dataset named `jft` prepared in ArrayRecord
format under the data directory, with features `image` (encoded) and `labels` (class ids).

ViT-22B's JFT has about 30k classes (big_vision's JFT-3B config: 29,593).
"""
from vit22b.input_pipeline import require_prepared, tfds_source

NUM_CLASSES = 29_593
IMAGE_SHAPE = None  # variable-size images, resized by the pipeline
MULTI_LABEL = True


def load(split, data_dir=None):
    path = require_prepared("jft", data_dir, "JFT is private: prepare it with TFDS in ArrayRecord format there.")
    return tfds_source(path, split, image_key="image", label_key="labels", num_classes=NUM_CLASSES)
