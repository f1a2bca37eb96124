"""Resume under faults: a damaged newest checkpoint is moved aside and the one before resumes; a changed config is
named before anything compiles; an allowed batch-size change continues the same examples; a malformed line of
metrics.jsonl is set aside."""
import json

import numpy as np
import pytest

from conftest import config
from vit22b.train import checkpointing, loop, resume
from vit22b.train.metrics import read_metrics


def tiny(**overrides):
    c = config("vit22b_digits", **{"total_steps": 12, "log_every": 1, "checkpoint_every": 6, "eval_every": 100,
                                   "keep_checkpoints": 3, "input.batch_size": 16, **overrides})
    c.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
    return c


def losses(workdir):
    return [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    loop.run(tiny(), str(workdir))
    return losses(workdir)


def truncate_array_files(folder):
    # Every data file, since which parts of which file a restore reads depends on how the async writes landed.
    for data in (p for p in (folder / "state").rglob("*") if p.is_file() and p.parent.name == "d"):
        data.write_bytes(data.read_bytes()[:16])


def remove_metadata(folder):
    (folder / "state" / "_METADATA").unlink()


def empty(folder):
    import shutil
    shutil.rmtree(folder)
    folder.mkdir()


@pytest.mark.parametrize("damage", [truncate_array_files, remove_metadata, empty])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_one_before_resumes(damage, tmp_path, reference, capsys):
    loop.run(tiny(), str(tmp_path))
    damage(tmp_path / "checkpoints" / "12")
    capsys.readouterr()
    loop.run(tiny(), str(tmp_path))
    out = capsys.readouterr().out
    reports = [line for line in out.splitlines() if "does not restore" in line]
    assert len(reports) == 1 and f"{tmp_path}/checkpoints/12 does not restore (" in reports[0], out
    assert f"moved to {tmp_path}/damaged_checkpoints/12, trying the one before" in reports[0]
    assert "steps 6..12" in out
    assert (tmp_path / "damaged_checkpoints" / "12").is_dir()  # kept, never deleted
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["12", "6"]
    assert losses(tmp_path) == reference  # steps 7..12 recomputed identically


def test_when_no_checkpoint_restores_the_run_stops_with_what_it_tried(tmp_path):
    loop.run(tiny(), str(tmp_path))
    for step in ("6", "12"):
        empty(tmp_path / "checkpoints" / step)
    with pytest.raises(checkpointing.NoCheckpointRestoresError) as e:
        loop.run(tiny(), str(tmp_path))
    assert f"{tmp_path}/checkpoints/12: " in str(e.value) and f"{tmp_path}/checkpoints/6: " in str(e.value)
    assert sorted(p.name for p in (tmp_path / "damaged_checkpoints").iterdir()) == ["12", "6"]


def test_a_changed_config_is_named_key_by_key_before_anything_compiles(tmp_path, monkeypatch):
    loop.run(tiny(total_steps=6), str(tmp_path))
    changed = tiny(total_steps=8, lr=3e-4)  # total_steps may change; lr and the model's width may not
    changed.model.update(width=32, mlp_dim=64)

    def compiles(*args, **kwargs):
        raise AssertionError("compiled before the config check")
    monkeypatch.setattr(loop, "create_train_state", compiles)
    with pytest.raises(resume.ConfigChangedError) as e:
        loop.run(changed, str(tmp_path))
    lines = str(e.value).splitlines()
    assert lines[:3] == [
        f"config.lr: the checkpoint in {tmp_path} was written with 0.001, this run asks for 0.0003",
        f"config.model.mlp_dim: the checkpoint in {tmp_path} was written with 32, this run asks for 64",
        f"config.model.width: the checkpoint in {tmp_path} was written with 16, this run asks for 32"]
    assert lines[3].endswith("--config.allow_config_change=lr,model.mlp_dim,model.width")


def test_an_allowed_batch_size_change_continues_the_same_examples(tmp_path, monkeypatch):
    seen = []
    original = loop.to_device

    def record(batch, mesh):
        if len(batch["image"]) <= 16:  # training batches (evaluation's have 128 examples)
            seen.append(np.asarray(batch["image"]))
        return original(batch, mesh)
    monkeypatch.setattr(loop, "to_device", record)

    loop.run(tiny(total_steps=7), str(tmp_path / "straight"))
    step7 = seen[6]  # 16 examples: the 97th to the 112th of the stream
    seen.clear()
    loop.run(tiny(total_steps=6), str(tmp_path / "changed"))
    with pytest.raises(resume.ConfigChangedError, match="config.input.batch_size: .* written with 16, .* asks for 8"):
        loop.run(tiny(total_steps=8, **{"input.batch_size": 8}), str(tmp_path / "changed"))
    seen.clear()
    loop.run(tiny(total_steps=8, allow_config_change="input.batch_size", **{"input.batch_size": 8}),
             str(tmp_path / "changed"))
    np.testing.assert_array_equal(np.concatenate(seen), step7)
    manager = checkpointing.make_manager(str(tmp_path / "changed"), 3)
    info = checkpointing.read_run_info(manager, 8)
    manager.close()
    assert (info["input_offset"], info["examples_seen"]) == (96, 112)
    assert info["config"]["input"]["batch_size"] == 8


def test_a_malformed_metrics_line_is_set_aside_on_resume(tmp_path, capsys):
    loop.run(tiny(total_steps=6), str(tmp_path))
    metrics = tmp_path / "metrics.jsonl"
    n = len(metrics.read_text().splitlines())
    with metrics.open("a") as f:
        f.write('{"step": 7, "train/lo')  # a write cut short (a full disk)
    capsys.readouterr()
    loop.run(tiny(total_steps=8), str(tmp_path))
    out = capsys.readouterr().out
    assert f"{metrics}:{n + 1}: not a JSON row; moved to {metrics}.malformed" in out, out
    assert (tmp_path / "metrics.jsonl.malformed").read_text() == '{"step": 7, "train/lo\n'
    assert [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r] == list(range(1, 9))


def test_read_metrics_names_the_file_and_line_of_a_malformed_row(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n{oops\n")
    with pytest.raises(ValueError, match=f"{tmp_path}/metrics.jsonl:2: not a JSON row"):
        read_metrics(tmp_path)
