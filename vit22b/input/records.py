"""Local datasets as ArrayRecord files: one record per example, plus `meta.json`.

A dataset directory holds `SPLIT.array_record-NNNNN-of-MMMMM` shards and
  meta.json = {"num_classes", "class_names", "multi_label", "image_shape" (or null), "splits": {name: count}}.
A record is b"VR1" + 4-byte little-endian header length + JSON header {"label", "key", and "shape" for raw
pixels} + the image: the original JPEG/PNG bytes from a folder (decoded by the pipeline, where an undecodable
one is counted rather than lost), or, for arrays, raw uint8 pixels (`shape` in the header; reading them costs
microseconds where decoding a small PNG costs ~60 us) or PNG. Written by `python data/make_arrayrecord.py`.
"""
import io
import json
import os
import struct

import numpy as np
from PIL import Image

from vit22b import paths

MAGIC = b"VR1"


def encode(image_bytes, label, key, shape=None):
    header = {"label": label, "key": key}
    if shape is not None:
        header["shape"] = list(shape)
    header = json.dumps(header).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + bytes(image_bytes)


def decode(record):
    """record bytes -> {'image': encoded bytes, 'label', '_record': key}; ValueError if not a record."""
    record = bytes(record)
    if record[:3] != MAGIC or len(record) < 7:
        raise ValueError("not a vit22b record (bad magic)")
    (n,) = struct.unpack("<I", record[3:7])
    header = json.loads(record[7:7 + n])
    image = record[7 + n:]
    if "shape" in header:
        image = np.frombuffer(image, np.uint8).reshape(header["shape"])
    return {"image": image, "label": header["label"], "_record": header["key"]}


def png_bytes(array):
    """uint8 HxW or HxWxC -> PNG bytes (lossless)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"png_bytes: expected uint8 pixels, got {array.dtype}")
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def shard_paths(directory, split):
    return sorted(os.fspath(p) for p in paths.resolve(directory).glob(f"{split}.array_record-*"))


def write_split(directory, split, examples, num_shards=1):
    """Write (image_bytes, label, key) or (raw_pixels, label, key, shape) tuples as `split` shards, round-robin
    over `num_shards` files; atomic per file (written under a temporary name, then renamed). Returns the number
    of records."""
    from array_record.python.array_record_module import ArrayRecordWriter
    os.makedirs(directory, exist_ok=True)
    for old in shard_paths(directory, split):
        os.remove(old)
    finals = [os.path.join(directory, f"{split}.array_record-{i:05d}-of-{num_shards:05d}") for i in range(num_shards)]
    writers = [ArrayRecordWriter(f + ".tmp", "group_size:1") for f in finals]
    count = 0
    try:
        for example in examples:
            writers[count % num_shards].write(encode(*example))
            count += 1
    finally:
        for w in writers:
            w.close()
    for f in finals:
        os.replace(f + ".tmp", f)
    return count


def write_meta(directory, *, num_classes, class_names, multi_label, image_shape, split, count):
    """Create or update meta.json; a later split must agree with the classes already recorded."""
    path = os.path.join(directory, "meta.json")
    meta = {"num_classes": num_classes, "class_names": class_names, "multi_label": multi_label,
            "image_shape": image_shape, "splits": {}}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for key in ("num_classes", "class_names", "multi_label"):
            if old[key] != meta[key]:
                raise ValueError(f"{path}: {key} of split {split!r} ({meta[key]!r}) differs from the dataset's "
                                 f"({old[key]!r})")
        if old.get("image_shape") != image_shape:
            image_shape = None
        meta = dict(old, image_shape=image_shape)
    meta["splits"][split] = count
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(path + ".tmp", path)
    return meta


def read_meta(directory):
    return json.loads((paths.resolve(directory) / "meta.json").read_text())


class RecordSource:
    """Random access over a split's shards: {'image': encoded bytes, 'label', '_record'}."""

    def __init__(self, directory, split):
        import grain
        self.paths = shard_paths(directory, split)
        if not self.paths:
            raise FileNotFoundError(f"no {split!r} shards ({split}.array_record-*) in {directory}")
        self._source = grain.sources.ArrayRecordDataSource(self.paths)
        self.name = f"{directory}:{split}"

    def __len__(self):
        return len(self._source)

    def _decode(self, i, raw):
        try:
            return decode(raw)
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            return {"image": b"", "label": None, "_record": f"{self.name}[{i}]", "_error": f"unreadable record: {e}"}

    def __getitem__(self, i):
        return self._decode(i, self._source[i])

    def read_many(self, indices):
        """Batched read (ArrayRecord reads the records in parallel)."""
        return [self._decode(i, raw) for i, raw in zip(indices, self._source.__getitems__(list(indices)))]
