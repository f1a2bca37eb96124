"""Grain input pipelines over the dataset definitions in the repository's `data/` folder.

A dataset definition `data/NAME.py` exposes NUM_CLASSES, IMAGE_SHAPE (None if variable), MULTI_LABEL and
`load(split, data_dir)` returning a random-access source of {'image': float32 HWC in [0, 1], 'label'}.
Training batches come from a seeded, repeated, per-epoch-reshuffled MapDataset, so a batch depends only on
(seed, position): the iterator state saved in the checkpoint is just that position.
"""
import importlib.util
import math
import os
from pathlib import Path

import grain
import numpy as np

DATA_DEFS = Path(__file__).resolve().parents[1] / "data"


class DatasetNotFoundError(FileNotFoundError):
    pass


class ArraySource:
    """A random-access source over in-memory arrays."""

    def __init__(self, images, labels):
        if len(images) != len(labels):
            raise ValueError(f"ArraySource: {len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def dataset_module(name):
    """Import data/NAME.py by path (the definitions are data, not part of the installed package)."""
    path = DATA_DEFS / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in DATA_DEFS.glob("*.py") if not p.stem.startswith("_"))
        raise DatasetNotFoundError(f"input.data: no dataset definition {path}; known datasets: {known}")
    spec = importlib.util.spec_from_file_location(f"vit22b_data_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def data_dir(input_cfg):
    return (input_cfg.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
            or os.path.expanduser("~/tensorflow_datasets"))


def require_prepared(name, data_dir, how):
    """The folder of a TFDS-prepared dataset, or an error naming the dataset, the folder and what to do."""
    path = os.path.join(data_dir, name)
    if not os.path.isdir(path):
        raise DatasetNotFoundError(
            f"dataset {name!r} not found: no directory {path} (data directory {data_dir!r}, from "
            f"--config.input.data_dir or $TFDS_DATA_DIR). {how} Or point the config at another dataset, e.g. "
            f"--config.input.data=digits (datasets are defined in data/*.py).")
    return path


def tfds_source(path, split, image_key, label_key, num_classes=None):
    """A TFDS-prepared ArrayRecord dataset read without TensorFlow through `tfds` data sources."""
    import tensorflow_datasets as tfds
    versions = sorted(p for p in Path(path).iterdir() if p.is_dir())
    if not versions:
        raise DatasetNotFoundError(f"no prepared version under {path}")
    source = tfds.builder_from_directory(str(versions[-1])).as_data_source(split=split)

    class _Source:
        def __len__(self):
            return len(source)

        def __getitem__(self, i):
            ex = source[i]
            label = np.asarray(ex[label_key])
            if num_classes is not None:  # multi-label: class ids -> multi-hot
                label = np.zeros(num_classes, np.float32)
                label[np.asarray(ex[label_key])] = 1.0
            return {"image": np.asarray(ex[image_key], np.float32) / 255.0, "label": label}

    return _Source()


def _resize(image, size):
    """Resize to size x size (bilinear) when the stored image differs; digits etc. pass through."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    from PIL import Image
    channels = [np.asarray(Image.fromarray(image[..., c]).resize((size, size), Image.BILINEAR))
                for c in range(image.shape[-1])]
    return np.stack(channels, axis=-1)


def make_preprocess(image_size):
    def preprocess(ex):
        image = _resize(np.asarray(ex["image"], np.float32), image_size)
        return {"image": image * 2.0 - 1.0, "label": ex["label"]}  # model inputs live in [-1, 1]
    return preprocess


def _shard(ds, process_index, process_count):
    return ds[process_index::process_count] if process_count > 1 else ds


def train_dataset(source, *, seed, batch_size, image_size, process_index=0, process_count=1):
    """This process's part of each global batch: the global example order (seeded, reshuffled every epoch)
    does not depend on the number of processes, and each example is read by exactly one process."""
    if batch_size % process_count:
        raise ValueError(f"input.batch_size: {batch_size} is not divisible by {process_count} processes")
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat().map(make_preprocess(image_size))
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    return ds[process_index::process_count] if process_count > 1 else ds


def train_iterator(dataset, num_threads=2, prefetch=8):
    """A checkpointable iterator (get_state / set_state) with threaded prefetch."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options))


def eval_batches(source, *, batch_size, image_size, process_index=0, process_count=1):
    """Every example exactly once: the last batch is padded and carries mask == 0 on the padding.

    All processes yield the same number of batches, so collectives inside the eval step line up.
    """
    ds = _shard(grain.MapDataset.source(source), process_index, process_count).map(make_preprocess(image_size))
    local_bs = batch_size // process_count
    num_batches = math.ceil(math.ceil(len(source) / process_count) / local_bs)
    for b in range(num_batches):
        items = [ds[i] for i in range(b * local_bs, min((b + 1) * local_bs, len(ds)))]
        n = len(items)
        if n == 0:
            items = [ds[0]]  # shape donor only; fully masked
        image = np.stack([it["image"] for it in items])
        label = np.stack([np.asarray(it["label"]) for it in items])
        pad = local_bs - len(items)
        yield {
            "image": np.concatenate([image, np.zeros((pad,) + image.shape[1:], image.dtype)]),
            "label": np.concatenate([label, np.zeros((pad,) + label.shape[1:], label.dtype)]),
            "mask": np.concatenate([np.ones(n, np.float32), np.zeros(local_bs - n, np.float32)]),
        }
