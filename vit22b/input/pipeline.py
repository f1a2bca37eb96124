"""Grain input pipelines over dataset definitions: those the package ships (vit22b/input/datasets/NAME.py) and
user-added ones (`data/NAME.py` under the working directory, or `input.data` given as a path to a .py file).

A dataset definition exposes NUM_CLASSES, IMAGE_SHAPE (None if variable) and MULTI_LABEL (or an
`info(data_dir)` function returning them) and `load(split, data_dir)` returning a random-access source of
{'image': encoded bytes or an HWC array, 'label', optionally '_record' (a name for error messages)}.
Sources: in-memory arrays (ArraySource), local ArrayRecord files (vit22b/input/records.py, written by
data/make_arrayrecord.py) and TFDS ArrayRecord preparations (`tfds.data_source`).

Training batches come from a seeded, repeated, per-epoch-reshuffled MapDataset; every example is transformed
by the preprocess chain (vit22b/input/preprocess.py) with an RNG seeded by (seed, position), so a batch depends only
on (seed, position) -- not on worker processes or threads -- and the iterator state saved in the checkpoint is
just that position.
"""
import dataclasses
import importlib
import importlib.util
import math
import os
import re
from pathlib import Path

import grain
import numpy as np
from absl import logging

from vit22b import paths
from vit22b.input import preprocess

SHIPPED = Path(__file__).resolve().parent / "datasets"
USER_DEFS = Path("data")  # relative to the working directory: a clone's data/ folder


class DatasetNotFoundError(FileNotFoundError):
    pass


class SliceSource:
    """Records [start, stop) of another source, for split slices such as 'train[:10%]' (see `load_split`)."""

    def __init__(self, source, start, stop):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.source[self.start + i]

    def read_many(self, indices):
        return read_many(self.source, [self.start + int(i) for i in indices])


def load_split(module, split, data_dir=None):
    """module.load(split), where `split` may be a slice written as TFDS writes them: 'train[:6000]', 'train[:10%]',
    'train[90%:]' (percent bounds rounded to the closest record, as TFDS does). Every dataset slices the same way:
    the records of the whole split, in its stored order."""
    m = re.fullmatch(r"([\w-]+)\[(-?\d*%?):(-?\d*%?)\]", split.strip())
    if m is None:
        if "[" in split:
            raise ValueError(f"input.split: {split!r} is not a split or a slice such as 'train[:10%]' or "
                             f"'train[1000:2000]'")
        return module.load(split, data_dir)
    source = module.load(m.group(1), data_dir)
    n = len(source)

    def bound(text, default):
        if not text:
            return default
        value = round(n * int(text[:-1]) / 100) if text.endswith("%") else int(text)
        return min(max(value + n if value < 0 else value, 0), n)

    start, stop = bound(m.group(2), 0), bound(m.group(3), n)
    if stop <= start:
        raise ValueError(f"input.split: {split!r} selects no records of the {n} in {m.group(1)!r}")
    return SliceSource(source, start, stop)


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
    """The definition named by `input.data`: a shipped one (vit22b/input/datasets/NAME.py), else a user-added
    `data/NAME.py` under the working directory, or a path to a .py file."""
    if name.endswith(".py"):
        path = Path(name).expanduser()
    elif (SHIPPED / f"{name}.py").is_file():
        return importlib.import_module(f"vit22b.input.datasets.{name}")
    else:
        path = USER_DEFS / f"{name}.py"
    if not path.is_file():
        known = sorted({p.stem for d in (SHIPPED, USER_DEFS) for p in d.glob("*.py")
                        if not p.stem.startswith("_") and p.stem != "make_arrayrecord"})
        raise DatasetNotFoundError(f"input.data: no dataset definition {name!r} (looked in {SHIPPED} and "
                                   f"{USER_DEFS.resolve()}); known datasets: {known}")
    spec = importlib.util.spec_from_file_location(f"vit22b_data_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def data_dir(input_cfg):
    """`input.data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets, as a string (TFDS takes it so)."""
    return os.fspath(paths.resolve(input_cfg.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
                                   or "~/tensorflow_datasets"))


def require_prepared(name, data_dir, how):
    """The folder of a TFDS-prepared dataset, or an error naming the dataset, the folder and what to do."""
    path = paths.resolve(data_dir) / name
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"dataset {name!r} not found: no directory {path} (data directory {data_dir!r}, from "
            f"--config.input.data_dir or $TFDS_DATA_DIR). {how} Or point the config at another dataset, e.g. "
            f"--config.input.data=digits (definitions: vit22b/input/datasets/*.py).")
    return path


def tfds_source(name, split, data_dir, image_key="image", label_key="label", how=None):
    """A TFDS dataset prepared in ArrayRecord format, through `tfds.data_source` (no TensorFlow): examples come
    decoded by TFDS ({'image': uint8 HWC, ...}); multi-label class-id lists are made multi-hot by the pipeline."""
    import tensorflow_datasets as tfds
    require_prepared(name, data_dir, how or f"Prepare it with `tfds build {name} --file_format=array_record "
                                            f"--data_dir={data_dir}`.")
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises assorted errors for missing or non-ArrayRecord preparations
        raise DatasetNotFoundError(
            f"dataset {name!r} split {split!r} is not prepared in ArrayRecord format under {data_dir!r} "
            f"({type(e).__name__}: {e}). Prepare it with `tfds build {name} --file_format=array_record "
            f"--data_dir={data_dir}`.") from None

    class _Source:
        def __len__(self):
            return len(source)

        def _example(self, i, ex):
            return {"image": ex[image_key], "label": ex[label_key], "_record": f"{name}:{split}[{i}]"}

        def __getitem__(self, i):
            return self._example(i, source[i])

        def read_many(self, indices):
            try:
                many = source.__getitems__(indices)
            except Exception as e:  # no batched read here (e.g. tfds.testing.mock_data): one at a time
                if not getattr(self, "_warned", False):
                    logging.warning("%s: batched read failed (%s); reading records one by one", name, e)
                    self._warned = True
                many = [source[i] for i in indices]
            return [self._example(i, ex) for i, ex in zip(indices, many)]

    return _Source()


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_shape: tuple = None  # (H, W, C) when every image has it, else None
    multi_label: bool = False

    @property
    def channels(self):
        return self.image_shape[2] if self.image_shape else 3


def dataset_info(module, data_dir=None):
    """A dataset definition's classes and image shape: module constants, or its `info(data_dir)` for definitions
    that read them from the data (vit22b/input/datasets/arrayrecord.py)."""
    if hasattr(module, "info"):
        info = module.info(data_dir)
        return DatasetInfo(info["num_classes"], tuple(info["image_shape"]) if info.get("image_shape") else None,
                           bool(info.get("multi_label", False)))
    return DatasetInfo(module.NUM_CLASSES, module.IMAGE_SHAPE, module.MULTI_LABEL)


def default_pp(image_size, channels=None):
    """The chain used when a config names none: decode, resize to image_size, values in [-1, 1]."""
    return f"decode({channels or ''})|resize({image_size})|value_range(-1, 1)"


class BadRecordError(ValueError):
    pass


def _label(label, num_classes, multi_label, record):
    """int class id, or a multi-hot float vector from class ids / a multi-hot vector; range-checked."""
    if num_classes is None:
        return np.asarray(label)
    label = np.asarray(label)
    if multi_label:
        if label.ndim == 1 and label.shape[0] == num_classes and label.dtype.kind == "f":
            return label.astype(np.float32)
        ids = label.reshape(-1).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise BadRecordError(f"record {record}: class id {int(ids.max() if ids.max() >= num_classes else ids.min())}"
                                 f" out of range [0, {num_classes})")
        hot = np.zeros(num_classes, np.float32)
        hot[ids] = 1.0
        return hot
    if label.ndim != 0 or not 0 <= int(label) < num_classes:
        raise BadRecordError(f"record {record}: label {label.tolist()!r} out of range [0, {num_classes})")
    return np.int32(label)


def example_fn(pp, *, seed, num_classes=None, multi_label=False, on_bad_record="skip", placeholder=None):
    """(position, raw example) -> {'image', 'label', 'mask', 'bad', ...}. The RNG is seeded by (seed, position).

    A record that cannot be decoded (or has the wrong shape) gives a zero `placeholder` with mask 0 and bad 1:
    it is skipped by the loss and counted, never silently lost; with on_bad_record='error' it stops the run.
    """
    chain = preprocess.chain(pp)

    def fn(index, ex):
        rng = np.random.default_rng((seed, index))
        record = ex.get("_record", index)
        label = ex.get("label")
        try:
            if "_error" in ex:
                raise preprocess.DecodeError(ex["_error"])
            label = _label(label, num_classes, multi_label, record)
            out = chain({"image": ex["image"], "label": label}, rng)
            out = dict(out, image=np.asarray(out["image"], np.float32), mask=np.float32(1), bad=np.int32(0))
        except preprocess.DecodeError as e:
            if on_bad_record == "error" or placeholder is None:
                raise BadRecordError(f"record {record}: {e} (input.on_bad_record = 'skip' skips and counts "
                                     f"such records)") from None
            out = dict(placeholder, mask=np.float32(0), bad=np.int32(1))
        return out

    return fn


def placeholder_for(source, pp, num_classes=None, multi_label=False, tries=100):
    """Zeros shaped like a processed example, from the first record that decodes (the stand-in for bad ones)."""
    fn = example_fn(pp, seed=0, num_classes=num_classes, multi_label=multi_label, on_bad_record="error")
    for i in range(min(tries, len(source))):
        try:
            ex = fn(0, source[i])
        except BadRecordError:
            continue
        return {k: np.zeros_like(v) for k, v in ex.items()}
    raise BadRecordError(f"none of the first {min(tries, len(source))} records of the dataset can be decoded")


def _pp(pp, image_size, channels):
    return preprocess.parse(pp) if isinstance(pp, str) else (pp or preprocess.parse(default_pp(image_size, channels)))


def train_dataset(source, *, seed, batch_size, image_size=None, pp=None, num_classes=None, multi_label=False,
                  on_bad_record="skip", mix=None, channels=None, process_index=0, process_count=1, offset=0):
    """This process's part of each global batch: the global example order (seeded, reshuffled every epoch)
    does not depend on the number of processes, and each example is read by exactly one process. Every random
    choice depends only on (seed, position), so worker processes and threads do not change a batch.

    pp: a preprocess string (or parsed list); mix: kwargs of `preprocess.mix_batch` (mixup / cutmix), or None;
    offset: the number of examples of that order to skip (a resume with another batch size starts where the
    checkpoint had reached, vit22b/train/resume.py).
    """
    if batch_size % process_count:
        raise ValueError(f"input.batch_size: {batch_size} is not divisible by {process_count} processes")
    if mix and num_classes is None:
        raise ValueError("input.mixup needs the number of classes")
    pp = _pp(pp, image_size, channels)
    placeholder = placeholder_for(source, pp, num_classes, multi_label) if on_bad_record == "skip" else None
    fn = example_fn(pp, seed=seed, num_classes=num_classes, multi_label=multi_label, on_bad_record=on_bad_record,
                    placeholder=placeholder)
    local = batch_size // process_count
    # Batches of record indices, read in bulk (ArrayRecord's batched read is ~25x faster than one at a time).
    order = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat()[offset:]
    order = order.batch(local, drop_remainder=True)

    def make_batch(index, indices):
        batch = _collate([fn(index * local + j, ex) for j, ex in enumerate(read_many(source, indices))])
        if mix:
            batch = preprocess.mix_batch(batch, np.random.default_rng((seed, 1, index)), num_classes, **mix)
        return batch

    ds = order.map_with_index(make_batch)
    return ds[process_index::process_count] if process_count > 1 else ds


def read_many(source, indices):
    """Records at `indices`, with the source's batched read where it has one."""
    indices = [int(i) for i in indices]
    if hasattr(source, "read_many"):
        return source.read_many(indices)
    return [source[i] for i in indices]


def _collate(examples):
    return {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in examples[0]}


def train_iterator(dataset, num_threads=2, prefetch=8, num_workers=0):
    """A checkpointable iterator (get_state / set_state): threads read and transform, `num_workers` processes
    (Grain mp_prefetch) do it in parallel; the batches are the same for any number of either."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    ds = dataset.to_iter_dataset(options)
    if num_workers:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags; notebooks and tests never parse them
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    return iter(ds)


def eval_batches(source, *, batch_size, image_size=None, pp=None, num_classes=None, multi_label=False,
                 on_bad_record="skip", channels=None, process_index=0, process_count=1):
    """Every example exactly once: the last batch is padded and carries mask == 0 on the padding (and on
    records that cannot be decoded, which are counted in 'bad').

    All processes yield the same number of batches, so collectives inside the eval step line up.
    """
    pp = _pp(pp, image_size, channels)
    placeholder = placeholder_for(source, pp, num_classes, multi_label) if on_bad_record == "skip" else None
    fn = example_fn(pp, seed=0, num_classes=num_classes, multi_label=multi_label, on_bad_record=on_bad_record,
                    placeholder=placeholder)
    mine = np.arange(process_index, len(source), process_count)
    local_bs = batch_size // process_count
    num_batches = math.ceil(math.ceil(len(source) / process_count) / local_bs)
    for b in range(num_batches):
        indices = mine[b * local_bs:(b + 1) * local_bs]
        items = [fn(int(i), ex) for i, ex in zip(indices, read_many(source, indices))]
        if not items:  # shape donor only; fully masked
            items = [dict(fn(0, source[0]), mask=np.float32(0), bad=np.int32(0))]
        batch = _collate(items)
        pad = local_bs - len(items)
        yield {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
