"""Input-pipeline throughput: decoded + augmented images per second for JPEG-encoded data, by worker count.

  python -m vit22b.tools.data_bench                      # 224-px JPEGs, ImageNet training chain, 0 / 1 / 2 workers
  python -m vit22b.tools.data_bench --workers=0,4,8 --pp="decode|resize_small(256)|central_crop(224)|normalize"

Writes --images synthetic photos-like JPEGs (smooth colour fields with noise and edges, --size pixels square)
to an ArrayRecord file, then times the real training pipeline (RecordSource -> decode -> chain -> batch)
over --batches batches after one warm-up batch. Prints one JSON line per worker count.
"""
import io
import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from vit22b.input import pipeline, records

flags.DEFINE_integer("images", 512, "Distinct JPEGs to write.")
flags.DEFINE_integer("size", 224, "Side of the stored JPEGs, pixels.")
flags.DEFINE_integer("batch", 64, "Batch size.")
flags.DEFINE_integer("batches", 8, "Timed batches per worker count (after one warm-up batch).")
flags.DEFINE_string("workers", "0,1,2", "Comma-separated worker-process counts to time.")
flags.DEFINE_integer("threads", 2, "Reader threads (Grain ReadOptions.num_threads) in each process.")
flags.DEFINE_string("pp", "decode|inception_crop(224)|flip_lr|randaug(2, 15)|value_range(-1, 1)",
                    "Preprocess chain to time.")
flags.DEFINE_string("dir", "", "Where to write the JPEGs (default: a temporary folder).")


def _jpeg(rng, size):
    y, x = np.mgrid[:size, :size] / size
    base = np.stack([np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y + rng.uniform()))
                     for _ in range(3)], -1)
    img = 127 + 80 * base + rng.normal(0, 12, (size, size, 3))
    img[:, : size // 3] += rng.uniform(-40, 40)  # an edge
    out = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_jpegs(directory, n, size, seed=0):
    rng = np.random.default_rng(seed)
    records.write_split(directory, "train", ((_jpeg(rng, size), i % 1000, f"img{i}") for i in range(n)))
    records.write_meta(directory, num_classes=1000, class_names=[str(i) for i in range(1000)], multi_label=False,
                       image_shape=[size, size, 3], split="train", count=n)


def measure(source, pp, batch, batches, workers, threads):
    ds = pipeline.train_dataset(source, seed=0, batch_size=batch, pp=pp, num_classes=1000)
    it = pipeline.train_iterator(ds, num_threads=threads, prefetch=2 * batch, num_workers=workers)
    next(it)  # warm-up: worker start-up and the first batch
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    return batch * batches / dt


def main(argv):
    del argv
    f = flags.FLAGS
    with tempfile.TemporaryDirectory() as tmp:
        directory = os.path.join(f.dir or tmp, "jpegs")
        write_jpegs(directory, f.images, f.size)
        source = records.RecordSource(directory, "train")
        for workers in (int(w) for w in f.workers.split(",")):
            ips = measure(source, f.pp, f.batch, f.batches, workers, f.threads)
            print(json.dumps({"workers": workers, "threads": f.threads, "img_per_s": round(ips, 1),
                              "images": f.batch * f.batches, "batch": f.batch, "jpeg_px": f.size, "pp": f.pp,
                              "cpus": os.cpu_count()}), flush=True)


if __name__ == "__main__":
    app.run(main)
