"""Any dataset written by data/make_arrayrecord.py: `--config.input.data=arrayrecord
--config.input.data_dir=OUT`, where OUT holds meta.json and the split shards. Classes, multi-label and image
shape come from meta.json."""
import os

from vit22b.input import records
from vit22b.input.pipeline import DatasetNotFoundError

HOW = ("Write it with `python data/make_arrayrecord.py folder|numpy|fashion_mnist --out DIR ...` and pass "
       "--config.input.data_dir=DIR.")


def _dir(data_dir):
    if not data_dir or not os.path.isfile(os.path.join(data_dir, "meta.json")):
        raise DatasetNotFoundError(f"input.data_dir: no meta.json in {data_dir!r}. {HOW}")
    return data_dir


def info(data_dir):
    meta = records.read_meta(_dir(data_dir))
    return {"num_classes": meta["num_classes"], "image_shape": meta.get("image_shape"),
            "multi_label": meta["multi_label"]}


def load(split, data_dir=None):
    path = _dir(data_dir)
    splits = records.read_meta(path)["splits"]
    if split not in splits:
        raise DatasetNotFoundError(f"input.split: {path} has splits {sorted(splits)}, not {split!r}. {HOW}")
    return records.RecordSource(path, split)
