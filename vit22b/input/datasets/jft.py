"""JFT-style multi-label data (JFT-3B/4B is private): a TFDS dataset named `jft` prepared in ArrayRecord
format under the data directory, with features `image` (encoded) and `labels` (class ids, made multi-hot by
the pipeline).

ViT-22B's JFT has about 30k classes (big_vision's JFT-3B config: 29,593).
"""
from vit22b.input.pipeline import tfds_source

NUM_CLASSES = 29_593
IMAGE_SHAPE = None  # variable-size images, resized by the preprocess chain
MULTI_LABEL = True


def load(split, data_dir=None):
    return tfds_source("jft", split, data_dir, label_key="labels",
                       how="JFT is private: prepare it with TFDS in ArrayRecord format there.")
