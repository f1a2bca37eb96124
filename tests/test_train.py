"""The training loop: learning, exact resume after SIGKILL (workdir as a URL), SIGTERM and Ctrl-C checkpoints,
non-finite loss stops, checkpoints of the earlier layout, metrics on an object store."""
import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import CONFIGS, REPO, config, cpu_env, main_cmd, run_main
from vit22b.parallel import sharding
from vit22b.train import checkpointing, loop, monitors
from vit22b.train.metrics import MetricsWriter, read_metrics

TOTAL = 80
FLAGS = (f"--config.total_steps={TOTAL}", "--config.log_every=1", "--config.checkpoint_every=10",
         "--config.eval_every=1000", "--config.input.batch_size=16")
SPEC = f"{CONFIGS}/vit22b_digits.py:runlocal"


def start(workdir):
    # The workdir as a file:// URL: every path goes through etils.epath (vit22b/paths.py).
    return subprocess.Popen(main_cmd(SPEC, f"file://{workdir}", *FLAGS), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cpu_env())


def logged_steps(workdir):
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return sum(1 for line in f if '"train/loss"' in line)
    except FileNotFoundError:
        return 0


def run_until(workdir, min_steps, sig):
    """Start a run, wait until it has logged `min_steps` steps, then send `sig`."""
    p = start(workdir)
    deadline = time.time() + 240
    while logged_steps(workdir) < min_steps and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, f"run ended before step {min_steps}: {p.stderr.read()[-2000:]}"
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    return p.returncode, out, err


def losses(workdir):
    rows = [r for r in read_metrics(workdir) if "train/loss" in r]
    return [r["step"] for r in rows], [r["train/loss"] for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    p = start(workdir)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    steps, values = losses(workdir)
    assert steps == list(range(1, TOTAL + 1))
    return values


def test_sigkill_at_any_moment_resumes_to_the_identical_loss_sequence(tmp_path, reference):
    rng = np.random.default_rng(0)
    # Kill twice at random steps (also while an async checkpoint may be in flight), then finish.
    for lo, hi in ((5, 35), (40, 75)):
        code, _, _ = run_until(tmp_path, int(rng.integers(lo, hi)), signal.SIGKILL)
        assert code == -signal.SIGKILL
    p = start(tmp_path)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    steps, values = losses(tmp_path)
    assert steps == list(range(1, TOTAL + 1))
    assert values == reference  # bitwise: JSON keeps every float32 digit


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, reference):
    code, out, err = run_until(tmp_path, 23, signal.SIGTERM)
    assert code == 0, err[-3000:]
    saved = int(out.split("Preempted: saved a checkpoint at step ")[1].split(";")[0])
    assert 23 <= saved < TOTAL  # saved where it stopped (usually between the periodic steps)
    listing = sorted(os.listdir(tmp_path / "checkpoints"))
    assert str(saved) in listing, (listing, err[-3000:])
    assert losses(tmp_path)[0][-1] == saved
    p = start(tmp_path)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and f"Resumed from step {saved}" in err
    assert losses(tmp_path)[1] == reference


def test_ctrl_c_saves_like_a_preemption_and_exits_130_with_one_line(tmp_path):
    code, out, err = run_until(tmp_path, 10, signal.SIGINT)
    assert code == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("Interrupted (SIGINT): saved a checkpoint at step "), out[-2000:]
    saved = int(last.split("step ")[1].split(";")[0])
    assert 10 <= saved < TOTAL and str(saved) in os.listdir(tmp_path / "checkpoints")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = loop.to_device

    def poisoned(batch, mesh):
        calls["n"] += 1
        if calls["n"] == 15:  # the batch of step 15
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return original(batch, mesh)

    monkeypatch.setattr(loop, "to_device", poisoned)
    c = config("vit22b_digits", total_steps=40, log_every=5, checkpoint_every=5, eval_every=100)
    with pytest.raises(loop.NonFiniteLossError, match="train/loss is nan at step 15"):
        loop.run(c, str(tmp_path))
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == 10  # step 15's state was never written
    manager = checkpointing.make_manager(str(tmp_path), 2)
    assert manager.latest_step() == 10
    manager.close()


def test_a_checkpoint_with_the_earlier_iterator_layout_resumes_at_the_same_batch(tmp_path):
    """Checkpoints written before Grain's Orbax handler held the iterator position as Orbax JSON (data/metadata);
    they resume at the same position, and the run continues with the identical losses."""
    c = config("vit22b_digits", total_steps=12, log_every=1, checkpoint_every=6, eval_every=100,
               **{"input.batch_size": 16})
    c.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
    loop.run(c, str(tmp_path))
    reference = losses(tmp_path)
    step_dir = tmp_path / "checkpoints" / "6"
    state = json.loads((step_dir / "data" / "process_0-of-1.json").read_text())
    assert state == {"next_index": 6}  # batches taken
    (step_dir / "data" / "process_0-of-1.json").unlink()
    (step_dir / "data" / "metadata").write_text(json.dumps(state))  # what ocp.args.JsonSave wrote
    shutil.rmtree(step_dir / "run")  # nor did those checkpoints store the config and the examples seen
    shutil.rmtree(tmp_path / "checkpoints" / "12")
    loop.run(c, str(tmp_path))
    assert losses(tmp_path) == reference


def test_metrics_and_events_go_to_an_object_store_through_epath():
    """A gs:// workdir, with fsspec's in-memory filesystem standing in for GCS: metrics.jsonl (rewritten whole,
    since objects cannot be appended to) and the TensorBoard event file land there, and a resume drops the rows
    past the restored step."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem
    for protocol in ("gs", "gcs"):  # for this test process only; nothing else here writes to gs://
        fsspec.register_implementation(protocol, MemoryFileSystem, clobber=True)
    workdir = f"gs://bucket/{os.getpid()}/run"
    writer = MetricsWriter(workdir)
    for step in (1, 2, 3):
        writer.write(step, {"train/loss": 1.0 / step})
    writer.close()
    writer = MetricsWriter(workdir, resumed_step=2)
    writer.write(3, {"train/loss": 0.25})
    writer.close()
    assert read_metrics(workdir) == [{"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.5},
                                     {"step": 3, "train/loss": 0.25}]
    events = [k for k in MemoryFileSystem.store if k.startswith(workdir) and "tfevents" in k]
    assert events and all(MemoryFileSystem.store[k].getvalue() for k in events)


def test_digits_training_learns(tmp_path):
    # The command line, with optimised machine code: this test's time is in its 300 steps (see conftest).
    r = run_main(f"{CONFIGS}/vit22b_digits.py:steps=300", tmp_path, "--config.log_every=50",
                 "--config.eval_every=300", "--config.checkpoint_every=300", "--config.schedule.warmup_steps=30",
                 optimized=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(str(tmp_path))
    out = [row for row in rows if "eval/accuracy" in row][-1]
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert train_losses[-1] < 0.2 * train_losses[0]
    assert out["eval/accuracy"] >= 0.9, out
    keys = set().union(*rows)
    assert {"step", "train/loss", "train/lr", "train/grad_norm", "train/img_per_s", "eval/accuracy"} <= keys
    # Steps between logs run without the two norms; every logged row still has them.
    assert [r["step"] for r in rows if "train/loss" in r] == [50, 100, 150, 200, 250, 300]
    assert all(r["train/param_norm"] > 0 and r["train/update_norm"] > 0 for r in rows if "train/loss" in r)
    # The instability monitors (config.monitors, on by default) on every logged row, per block and summarised.
    logged = [r for r in rows if "train/loss" in r]
    for name in ("monitor/max_attn_logit/block_03", "monitor/attn_entropy/map_head", "monitor/residual_rms/block_00",
                 "monitor/mlp_branch_rms/block_02", "monitor/residual_rms_ratio", "monitor/logits/log_z_mean"):
        assert all(np.isfinite(r[name]) for r in logged), name
    assert all(0 < r["monitor/attn_entropy_min"] <= np.log(16) for r in logged)  # 16 tokens: at most ln 16
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
    assert (tmp_path / "checkpoints" / "300").is_dir()
    assert json.loads((tmp_path / "config.json").read_text())["input"]["data"] == "digits"


def tiny_step_setup():
    """A one-block digits ViT on one device and a batch of 16 random images: (config, mesh, model, size, batch)."""
    c = config("vit22b_digits", "runlocal")
    c.model.update(width=16, depth=1, mlp_dim=32, num_heads=2)
    mesh = sharding.make_mesh("data:-1")
    rng = np.random.default_rng(0)
    size = c.input.image_size
    batch = {"image": rng.uniform(-1, 1, (16, size, size, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32), "mask": np.ones(16, np.float32)}
    return c, mesh, loop.build_model(c, 10), size, batch


def test_accumulated_gradients_make_the_whole_batch_update():
    """grad_accum_steps=4 against the whole batch of 16 in one pass (float32, 1e-6 relative): the loss, and each
    parameter's update, with one masked-out (undecodable) record so that the mean is over the 15 others."""
    c, mesh, model, size, batch = tiny_step_setup()
    c.optimizer, c.optimizer_kw, c.lr, c.grad_clip_norm = "sgd", {"momentum": 0.0}, 1.0, 1e9
    batch["mask"][5] = 0.0
    out = {}
    with sharding.activate(mesh, loop.rules_of(c)):
        for accum in (1, 4):
            c.grad_accum_steps = accum
            state, shardings, tx, lr_fn = loop.create_train_state(model, c, mesh, (size, size, 3))
            before = jax.device_get(state["params"])
            step = loop.make_train_step(model, tx, lr_fn, c, shardings, mesh, norms=False)
            after, metrics = jax.device_get(step(state, loop.to_device(batch, mesh)))
            out[accum] = (jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, after["params"], before), metrics)
    (whole, m1), (accumulated, m4) = out[1], out[4]
    assert abs(m4["loss"] - m1["loss"]) <= 1e-6 * abs(m1["loss"])
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(whole)):
        assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b) + 1e-12


def test_the_step_without_norms_makes_the_same_update():
    """The logged step (norms and monitors) and the quiet one: the same update."""
    c, mesh, model, size, batch = tiny_step_setup()
    out = {}
    with sharding.activate(mesh, loop.rules_of(c)):
        for norms in (True, False):
            state, shardings, tx, lr_fn = loop.create_train_state(model, c, mesh, (size, size, 3))
            step = loop.make_train_step(model, tx, lr_fn, c, shardings, mesh, norms=norms,
                                        monitor=monitors.DEFAULT if norms else ())
            out[norms] = jax.device_get(step(state, loop.to_device(batch, mesh)))
    (full_state, full), (quiet_state, quiet) = out[True], out[False]
    assert "monitor/residual_rms/block_00" in monitors.flatten(full.pop("monitor"))
    assert set(full) - set(quiet) == {"param_norm", "update_norm"} and set(quiet) <= set(full)
    assert all(quiet[k] == full[k] for k in quiet)
    for a, b in zip(jax.tree.leaves(full_state), jax.tree.leaves(quiet_state)):
        np.testing.assert_array_equal(a, b)
