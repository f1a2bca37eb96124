"""Write local datasets as ArrayRecord files that `input.data = "arrayrecord"` (or a named definition) reads.

  # a folder with one sub-folder per class (JPEG/PNG/... kept as encoded; class ids from sorted folder names)
  python data/make_arrayrecord.py folder --src ~/pets/train --out ~/data/pets --split train
  # multi-label: a CSV of "relative/path.jpg,label label ..." (label names or integer ids) instead of sub-folders
  python data/make_arrayrecord.py folder --src ~/imgs --labels labels.csv --out ~/data/mine --split train
  # numpy arrays: images uint8 [N, H, W(, C)], labels int [N] (or multi-hot [N, K]); raw pixels (or --encoding png)
  python data/make_arrayrecord.py numpy --images x.npy --labels y.npy --out ~/data/mine --split train
  # Fashion-MNIST from Debian's dataset-fashion-mnist package (IDX files; no network)
  python data/make_arrayrecord.py fashion_mnist --out ~/tensorflow_datasets/fashion_mnist

Each call writes one split (fashion_mnist: train and test) and creates or updates OUT/meta.json.
"""
import argparse
import csv
import gzip
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vit22b.input import records  # noqa: E402

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def _images_under(root):
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.join(dirpath, f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(out)


def folder(src, out, split, labels_csv=None, num_shards=1):
    """Images under `src`, labelled by their sub-folder (single-label) or by a CSV (multi-label)."""
    if labels_csv:
        rows = []
        with open(labels_csv, newline="") as f:
            for i, row in enumerate(csv.reader(f)):
                if not row or row[0].startswith("#"):
                    continue
                if len(row) != 2:
                    raise SystemExit(f"{labels_csv}:{i + 1}: expected 'path,labels', got {row!r}")
                rows.append((row[0], row[1].split()))
        names = sorted({n for _, ls in rows for n in ls}, key=lambda n: (not n.isdigit(), int(n) if n.isdigit()
                                                                          else 0, n))
        index = {n: i for i, n in enumerate(names)}
        missing = [p for p, _ in rows if not os.path.isfile(os.path.join(src, p))]
        if missing:
            raise SystemExit(f"{labels_csv}: {len(missing)} listed files are missing under {src}, e.g. {missing[0]}")
        items = [(os.path.join(src, p), [index[n] for n in ls]) for p, ls in rows]
        multi = True
    else:
        names = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
        if not names:
            raise SystemExit(f"{src}: no class sub-folders (or pass --labels FILE.csv)")
        items = [(p, i) for i, n in enumerate(names) for p in _images_under(os.path.join(src, n))]
        multi = False
    if not items:
        raise SystemExit(f"{src}: no images ({sorted(IMAGE_EXTENSIONS)})")

    def examples():
        for path, label in items:
            with open(path, "rb") as f:
                yield f.read(), label, os.path.relpath(path, src)

    count = records.write_split(out, split, examples(), num_shards)
    records.write_meta(out, num_classes=len(names), class_names=names, multi_label=multi, image_shape=None,
                       split=split, count=count)
    return count


def from_arrays(images, labels, out, split, class_names=None, num_shards=1, encoding="raw"):
    """uint8 images [N, H, W(, C)] stored as raw pixels (fast to read) or PNG (smaller files)."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise SystemExit(f"images: expected uint8 [N, H, W] or [N, H, W, C], got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise SystemExit(f"{len(images)} images but {len(labels)} labels")
    multi = labels.ndim == 2
    num_classes = labels.shape[1] if multi else int(labels.max()) + 1
    names = class_names or [str(i) for i in range(num_classes)]
    num_classes = max(num_classes, len(names))

    def examples():
        for i, (image, label) in enumerate(zip(images, labels)):
            lab = np.flatnonzero(label).tolist() if multi else int(label)
            if encoding == "png":
                yield records.png_bytes(image), lab, f"{split}[{i}]"
            else:
                yield image.tobytes(), lab, f"{split}[{i}]", image.shape if image.ndim == 3 else image.shape + (1,)

    count = records.write_split(out, split, examples(), num_shards)
    shape = list(images.shape[1:]) + ([1] if images.ndim == 3 else [])
    records.write_meta(out, num_classes=num_classes, class_names=names, multi_label=multi, image_shape=shape,
                       split=split, count=count)
    return count


def read_idx(path):
    """An IDX file (optionally gzipped), as used by MNIST and Fashion-MNIST, as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise SystemExit(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise SystemExit(f"{path}: {array.size} values for dimensions {dims}")
    return array.reshape(dims)


def fashion_mnist(src, out, num_shards=1):
    counts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        def find(kind):
            for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz",
                         f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"):
                if os.path.exists(os.path.join(src, name)):
                    return os.path.join(src, name)
            raise SystemExit(f"{src}: no {prefix} {kind} IDX file (install Debian's dataset-fashion-mnist package: "
                             f"apt-get install dataset-fashion-mnist)")
        counts[split] = from_arrays(read_idx(find("images")), read_idx(find("labels")).astype(np.int64), out, split,
                                    FASHION_MNIST_CLASSES, num_shards)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("folder")
    f.add_argument("--src", required=True)
    f.add_argument("--labels", help="CSV 'relative/path,label label ...' for multi-label data")
    n = sub.add_parser("numpy")
    n.add_argument("--images", required=True)
    n.add_argument("--labels", required=True)
    n.add_argument("--encoding", choices=("raw", "png"), default="raw")
    m = sub.add_parser("fashion_mnist")
    m.add_argument("--src", default=FASHION_MNIST_DIR)
    for s in (f, n, m):
        s.add_argument("--out", required=True)
        s.add_argument("--num_shards", type=int, default=1)
    for s in (f, n):
        s.add_argument("--split", required=True)
    a = p.parse_args(argv)
    if a.command == "folder":
        counts = {a.split: folder(a.src, a.out, a.split, a.labels, a.num_shards)}
    elif a.command == "numpy":
        counts = {a.split: from_arrays(np.load(a.images), np.load(a.labels), a.out, a.split, None, a.num_shards,
                                       a.encoding)}
    else:
        counts = fashion_mnist(a.src, a.out, a.num_shards)
    print(f"wrote {counts} to {a.out}")


if __name__ == "__main__":
    main()
