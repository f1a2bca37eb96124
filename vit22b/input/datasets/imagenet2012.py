"""ImageNet-1k (ILSVRC 2012; splits train / validation) prepared by TFDS in ArrayRecord format under the data
directory: `tfds build imagenet2012 --file_format=array_record --data_dir=DIR` (the archives are downloaded by
hand from image-net.org and placed in DIR/downloads/manual)."""
from vit22b.input.pipeline import tfds_source

NUM_CLASSES = 1000
IMAGE_SHAPE = None
MULTI_LABEL = False


def load(split, data_dir=None):
    return tfds_source("imagenet2012", split, data_dir, how=(
        f"Prepare it with `tfds build imagenet2012 --file_format=array_record --data_dir={data_dir}` after "
        f"placing the ILSVRC2012 archives in {data_dir}/downloads/manual."))
