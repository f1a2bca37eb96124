"""Input pipeline: evaluation covers every example once; training batches are deterministic and resumable.

(Sharded train steps: tests/test_meshes.py and tests/test_multihost.py.)"""
import numpy as np

from vit22b.input import pipeline


def test_eval_batches_cover_every_example_once_across_processes():
    n = 37
    source = pipeline.ArraySource(np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) / n,
                                        np.arange(n, dtype=np.int32))
    seen, batch_counts = [], []
    for process in range(3):
        batches = list(pipeline.eval_batches(source, batch_size=12, image_size=1, process_index=process,
                                                   process_count=3))
        batch_counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (4, 1, 1, 1)
            seen += list(b["label"][b["mask"] > 0])
    assert len(set(batch_counts)) == 1  # every process runs the same number of eval steps
    assert sorted(seen) == list(range(n))


def test_train_batches_are_deterministic_and_resumable():
    source = pipeline.ArraySource(np.zeros((20, 2, 2, 1), np.float32), np.arange(20, dtype=np.int32))
    ds = pipeline.train_dataset(source, seed=3, batch_size=4, image_size=2)
    it = pipeline.train_iterator(ds)
    first = [next(it)["label"] for _ in range(10)]
    epoch1, epoch2 = np.concatenate(first[:5]), np.concatenate(first[5:])
    assert sorted(epoch1) == sorted(epoch2) == list(range(20))  # each epoch sees every example once
    assert not np.array_equal(epoch1, epoch2)  # and is reshuffled
    it2 = pipeline.train_iterator(ds)
    for _ in range(3):
        next(it2)
    state = it2.get_state()
    it3 = pipeline.train_iterator(ds)
    it3.set_state(state)
    np.testing.assert_array_equal(next(it3)["label"], first[3])
    shards = [pipeline.train_dataset(source, seed=3, batch_size=4, image_size=2, process_index=i,
                                           process_count=2) for i in range(2)]
    labels = [set(np.concatenate([shards[i][j]["label"] for j in range(5)])) for i in range(2)]
    assert not labels[0] & labels[1] and labels[0] | labels[1] == set(range(20))
