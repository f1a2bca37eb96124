"""Input pipelines: local ArrayRecord files, TFDS data sources, preprocessing, determinism, bad records."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import CONFIGS, REPO, config, cpu_env, data_tool, run_main
from vit22b.input import pipeline, preprocess, records

PP = "decode|inception_crop(16)|flip_lr|randaug(2, 9)|value_range(-1, 1)"
MIX = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5}


def _digit_images(n, size=24):
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.stack([np.asarray(Image.fromarray((d.images[i] * 15).astype(np.uint8)).resize((size, size)))
                       for i in range(n)])
    return np.repeat(images[..., None], 3, axis=-1), d.target[:n].astype(np.int64)


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """64 real digit images whose label is their index (so batches tell which records they hold)."""
    out = tmp_path_factory.mktemp("numbered")
    images, _ = _digit_images(64)
    data_tool().from_arrays(images, np.arange(64), str(out), "train", num_shards=3)
    return str(out)


def _batches(source, n, *, workers=0, state=None, **kw):
    ds = pipeline.train_dataset(source, seed=7, batch_size=8, pp=PP, num_classes=64, mix=MIX, **kw)
    it = pipeline.train_iterator(ds, num_threads=2, prefetch=2, num_workers=workers)
    if state is not None:
        it.set_state(state)
    out = [next(it) for _ in range(n)]
    st = it.get_state()
    if hasattr(it, "close"):
        it.close()
    return out, st


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_folder_of_real_jpeg_and_png_round_trips_and_trains(tmp_path):
    images, labels = _digit_images(40)
    src = tmp_path / "folder"
    for i, (img, lab) in enumerate(zip(images, labels)):
        d = src / f"class_{lab}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    out = tmp_path / "ds"
    r = subprocess.run([sys.executable, "data/make_arrayrecord.py", "folder", "--src", str(src), "--out", str(out),
                        "--split", "train", "--num_shards", "2"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = records.read_meta(str(out))
    assert meta["num_classes"] == 10 and meta["splits"] == {"train": 40} and not meta["multi_label"]
    source = records.RecordSource(str(out), "train")
    decode = preprocess.decode(3)
    by_key = {source[i]["_record"]: source[i] for i in range(len(source))}
    for i, (img, lab) in enumerate(zip(images, labels)):
        ex = by_key[f"class_{lab}/{i:03d}.{'png' if i % 2 else 'jpg'}"]
        assert ex["label"] == meta["class_names"].index(f"class_{lab}")
        got = decode(ex, None)["image"]
        if i % 2:  # PNG is stored as the original bytes: lossless
            np.testing.assert_array_equal(got, img)
        else:
            assert np.abs(got.astype(int) - img).mean() < 8  # JPEG
    # The trainer reads it: --config.input.data=arrayrecord --config.input.data_dir=OUT
    w = tmp_path / "run"
    r = run_main(f"{CONFIGS}/vit22b_digits.py:runlocal", w, "--config.input.data=arrayrecord",
                 f"--config.input.data_dir={out}", "--config.input.eval_split=train", "--config.input.image_size=24",
                 "--config.total_steps=4", "--config.log_every=1", "--config.eval_every=4", "--config.schedule.warmup_steps=1",
                 "--config.input.pp_train=decode(3)|flip_lr|value_range(-1, 1)", "--config.input.batch_size=8")
    # The digits config's eval chain makes 1-channel images: caught before compilation, naming the field.
    assert r.returncode != 0 and "config.input.pp_eval: 'decode(1)|resize(8)|value_range(-1, 1)' makes images " \
        "of shape (8, 8, 1), but the model takes (24, 24, 3)" in r.stderr, r.stderr[-3000:]
    r = run_main(f"{CONFIGS}/vit22b_digits.py:runlocal", w, "--config.input.data=arrayrecord",
                 f"--config.input.data_dir={out}", "--config.input.eval_split=train", "--config.input.image_size=24",
                 "--config.total_steps=4", "--config.log_every=1", "--config.eval_every=4", "--config.schedule.warmup_steps=1",
                 "--config.input.pp_train=decode(3)|flip_lr|value_range(-1, 1)", "--config.input.batch_size=8",
                 "--config.input.pp_eval=decode(3)|value_range(-1, 1)")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy" in x for x in rows)
    logged = [x for x in rows if "train/loss" in x]
    assert all(x["train/bad_records"] == 0 and 0 <= x["train/data_wait_frac"] <= 1 for x in logged)


def test_multi_label_csv(tmp_path):
    images, _ = _digit_images(6)
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.csv").write_text("".join(f"{i}.png,{'cat dog' if i % 2 else 'dog'}\n" for i in range(6)))
    data_tool().folder(str(tmp_path), str(tmp_path / "out"), "train", str(tmp_path / "labels.csv"))
    meta = records.read_meta(str(tmp_path / "out"))
    assert meta["multi_label"] and meta["class_names"] == ["cat", "dog"]
    source = records.RecordSource(str(tmp_path / "out"), "train")
    batch = next(iter(pipeline.eval_batches(source, batch_size=6, pp="decode|value_range(-1, 1)",
                                                  num_classes=2, multi_label=True)))
    np.testing.assert_array_equal(batch["label"].sum(0), [3, 6])  # multi-hot


def test_same_batches_for_any_number_of_workers_and_exact_resume(numbered):
    source = records.RecordSource(numbered, "train")
    ref, _ = _batches(source, 10)  # 10 batches of 8 = one epoch and a quarter
    assert not np.allclose(ref[0]["image"], ref[1]["image"])
    assert ref[0]["label"].shape == (8, 64) and np.allclose(ref[0]["label"].sum(1), 1)  # mixed soft labels
    for workers in (1, 2):
        got, _ = _batches(source, 10, workers=workers)
        _same(got, ref)
    # Resume mid-epoch (after 3 batches), with worker processes: the identical next batches.
    _, state = _batches(source, 3, workers=2)
    resumed, _ = _batches(source, 7, workers=2, state=state)
    _same(resumed, ref[3:])


def test_processes_read_disjoint_complete_shards(numbered):
    source = records.RecordSource(numbered, "train")
    seen = []
    for p in range(2):
        ds = pipeline.train_dataset(source, seed=1, batch_size=16, pp="decode|value_range(-1, 1)",
                                          num_classes=64, process_index=p, process_count=2)
        seen.append(np.concatenate([ds[i]["label"] for i in range(4)]))  # one epoch: 4 global batches
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(64))
    one = pipeline.train_dataset(source, seed=1, batch_size=16, pp="decode|value_range(-1, 1)",
                                       num_classes=64)
    np.testing.assert_array_equal(np.sort(np.concatenate([one[i]["label"] for i in range(4)])), np.arange(64))
    counted = []
    for p in range(2):  # evaluation: every example once, padding masked
        for b in pipeline.eval_batches(source, batch_size=20, pp="decode|value_range(-1, 1)",
                                             num_classes=64, process_index=p, process_count=2):
            counted += b["label"][b["mask"] > 0].tolist()
    assert sorted(counted) == list(range(64))


def _with_bad_records(out):
    images, labels = _digit_images(30)
    good = [(records.png_bytes(img), int(lab), f"ok{i}") for i, (img, lab) in enumerate(zip(images, labels))]
    small = records.png_bytes(np.zeros((5, 5, 3), np.uint8))
    bad = [(b"\xff\xd8 not a jpeg", 1, "corrupt_a"), (small, 2, "wrong_shape"), (b"", 3, "empty")]
    records.write_split(str(out), "train", good[:10] + bad + good[10:])
    records.write_meta(str(out), num_classes=10, class_names=[str(i) for i in range(10)], multi_label=False,
                       image_shape=[24, 24, 3], split="train", count=33)
    return str(out)


def test_bad_records_are_skipped_and_counted_or_stop_the_run(tmp_path):
    source = records.RecordSource(_with_bad_records(tmp_path / "bad"), "train")
    pp = "decode(3, (24, 24))|value_range(-1, 1)"
    ds = pipeline.train_dataset(source, seed=0, batch_size=11, pp=pp, num_classes=10)
    epoch = [ds[i] for i in range(3)]  # 33 records = 3 batches
    assert sum(int(b["bad"].sum()) for b in epoch) == 3
    assert sum(int((b["mask"] == 0).sum()) for b in epoch) == 3
    for b in epoch:
        assert np.all(b["image"][b["mask"] == 0] == 0)
    ev = list(pipeline.eval_batches(source, batch_size=16, pp=pp, num_classes=10))
    assert sum(int(b["bad"].sum()) for b in ev) == 3 and sum(float(b["mask"].sum()) for b in ev) == 30
    strict = pipeline.train_dataset(source, seed=0, batch_size=33, pp=pp, num_classes=10,
                                          on_bad_record="error")
    with pytest.raises(pipeline.BadRecordError, match=r"record (corrupt_a|wrong_shape|empty): "):
        strict[0]
    # Through the trainer: counted in metrics.jsonl, never silently lost.
    w = tmp_path / "run"
    r = run_main(f"{CONFIGS}/vit22b_digits.py:runlocal", w, "--config.input.data=arrayrecord",
                 f"--config.input.data_dir={tmp_path / 'bad'}", "--config.input.eval_split=train",
                 "--config.input.image_size=24", f"--config.input.pp_train={pp}", f"--config.input.pp_eval={pp}",
                 "--config.total_steps=3", "--config.log_every=3", "--config.eval_every=3", "--config.schedule.warmup_steps=1",
                 "--config.input.batch_size=11", "--config.input.eval_batch_size=11")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
    assert [x["train/bad_records"] for x in rows if "train/bad_records" in x] == [3]
    assert [x["eval/bad_records"] for x in rows if "eval/bad_records" in x] == [3]


def test_label_out_of_range_is_an_error_naming_the_record(tmp_path):
    images, _ = _digit_images(4)
    records.write_split(str(tmp_path), "train", [(records.png_bytes(img), lab, f"rec{i}")
                                                 for i, (img, lab) in enumerate(zip(images, [0, 1, 12, 2]))])
    source = records.RecordSource(str(tmp_path), "train")
    ds = pipeline.train_dataset(source, seed=0, batch_size=4, pp="decode|value_range(-1, 1)", num_classes=10)
    with pytest.raises(pipeline.BadRecordError, match=r"record rec2: label 12 out of range \[0, 10\)"):
        ds[0]


def test_tfds_data_source_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    (tmp_path / "cifar10").mkdir()
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        source = pipeline.dataset_module("cifar10").load("train", str(tmp_path))
        assert len(source) == 24
        ds = pipeline.train_dataset(source, seed=0, batch_size=8, pp="decode(3, (32, 32))|flip_lr|value_range",
                                          num_classes=10)
        batch = ds[0]
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].min() >= -1 and batch["bad"].sum() == 0
    assert batch["label"].dtype == np.int32 and batch["label"].max() < 10


def test_missing_tfds_dataset_names_the_folder_and_the_command(tmp_path):
    with pytest.raises(pipeline.DatasetNotFoundError) as e:
        pipeline.dataset_module("imagenet2012").load("train", str(tmp_path))
    assert f"{tmp_path}/imagenet2012" in str(e.value) and "tfds build imagenet2012" in str(e.value)
    with pytest.raises(pipeline.DatasetNotFoundError, match="make_arrayrecord.py fashion_mnist"):
        pipeline.dataset_module("fashion_mnist").load("train", str(tmp_path))


def test_official_swin_eval_transform_matches_torchvision():
    from torchvision import transforms
    rng = np.random.default_rng(0)
    img = (rng.uniform(size=(300, 420, 3)) * 255).astype(np.uint8)
    ours = preprocess.chain(preprocess.parse("decode|resize_small(292, 'bicubic')|central_crop(256)|normalize"))(
        {"image": img, "label": 0}, None)["image"]
    ref = transforms.Compose([transforms.Resize(292, interpolation=transforms.InterpolationMode.BICUBIC),
                              transforms.CenterCrop(256), transforms.ToTensor(),
                              transforms.Normalize(preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)])(
        Image.fromarray(img)).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_augmentations():
    rng = np.random.default_rng(0)
    img = (rng.uniform(size=(60, 90, 3)) * 255).astype(np.uint8)
    crop = preprocess.inception_crop(32)
    outs = [crop({"image": img}, np.random.default_rng(s))["image"] for s in range(5)]
    assert all(o.shape == (32, 32, 3) and o.dtype == np.uint8 for o in outs)
    assert len({o.tobytes() for o in outs}) == 5  # random crops differ
    ra = preprocess.randaug(2, 9)
    a, b = (ra({"image": img}, np.random.default_rng(3))["image"] for _ in range(2))
    np.testing.assert_array_equal(a, b)  # determined by the RNG
    assert not np.array_equal(a, img)
    mask = preprocess.simmim_mask(192, 32, 4, 0.6)({}, np.random.default_rng(0))["simmim_mask"]
    assert mask.shape == (48, 48) and mask.mean() == pytest.approx(22 / 36)  # ceil(0.6 * 36) of 6x6 squares
    assert np.all(mask.reshape(6, 8, 6, 8).std(axis=(1, 3)) == 0)  # constant over each 32-px square
    batch = {"image": rng.uniform(size=(6, 20, 20, 3)).astype(np.float32), "label": np.arange(6),
             "mask": np.ones(6, np.float32)}
    cut = preprocess.mix_batch(batch, np.random.default_rng(1), 10, mixup_alpha=0.0, cutmix_alpha=1.0)
    pasted = (cut["image"] != batch["image"]).any(-1).mean()  # share of pixels taken from the partner
    np.testing.assert_allclose(cut["label"][:, np.arange(6)[::-1]].diagonal(), pasted, atol=1e-6)
    np.testing.assert_allclose(cut["label"].sum(1), 1.0, atol=1e-6)


def test_preprocess_errors_name_the_field():
    with pytest.raises(ValueError, match=r"input.pp_eval: unknown op 'crop\(3\)'"):
        preprocess.parse("decode|crop(3)", "input.pp_eval")
    with pytest.raises(ValueError, match="input.pp_train: bad arguments in 'resize_small"):
        preprocess.parse("resize_small(1, 2, 3, 4)")


def test_data_benchmark_prints_images_per_second(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vit22b.tools.data_bench", "--images=48", "--size=64", "--batch=8",
                        "--batches=3", "--workers=0,1", f"--dir={tmp_path}",
                        "--pp=decode|inception_crop(32)|flip_lr|randaug(2, 9)|value_range(-1, 1)"], cwd=REPO, capture_output=True,
                       text=True, env=cpu_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["workers"] for x in rows] == [0, 1]
    assert all(x["img_per_s"] > 0 and x["images"] == 24 and x["jpeg_px"] == 64 for x in rows)


def test_fashion_mnist_config_is_the_recipe_the_readme_measured():
    # README: 90.24% in 14 min 22 s with exactly these settings (the config test runs it on generated IDX files).
    c = config("vit22b_fashion_mnist", arg="")
    assert (c.input.data, c.model.patch_size, c.model.width, c.model.depth, c.input.batch_size) == (
        "fashion_mnist", 7, 64, 4, 256)
    assert (c.total_steps, c.lr, c.optimizer, c.schedule.decay_type, c.seed) == (5000, 2e-3, "adamw", "cosine", 0)
    assert c.model.block == "parallel" and c.model.head == "map" and c.model.qk_norm
