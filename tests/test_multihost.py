"""Two local processes x 2 CPU devices (gloo) train like one process x 4 devices, and resume from their
multi-host checkpoint."""
import os
import socket
import subprocess

from conftest import CONFIGS, REPO, cpu_env, main_cmd
from vit22b.train.metrics import read_metrics

SPEC = f"{CONFIGS}/vit22b_digits.py:runlocal"
# A constant schedule, so that extending total_steps on resume does not change the earlier learning rates.
FLAGS = ("--config.log_every=1", "--config.checkpoint_every=4", "--config.eval_every=8", "--config.input.batch_size=16",
         "--config.schedule.decay_type=constant")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(workdir, steps):
    port = free_port()
    # Without the suite's compilation cache: with jax 0.12 on CPU, a resumed run whose process 0 loaded its step
    # from the persistent cache (process 1's key differs, so it compiles) hung in that step's first collective.
    env = {k: v for k, v in cpu_env(2).items() if k != "JAX_COMPILATION_CACHE_DIR"}
    procs = [subprocess.Popen(main_cmd(SPEC, workdir, *FLAGS, f"--config.total_steps={steps}",
                                       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                       f"--process_id={i}"), cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def losses(workdir):
    return [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]


def test_two_processes_match_one_and_resume(tmp_path):
    single = tmp_path / "single"
    r = subprocess.run(main_cmd(SPEC, single, *FLAGS, "--config.total_steps=12"), cwd=REPO, env=cpu_env(4),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    multi = tmp_path / "multi"
    outs = two_processes(multi, 8)
    assert "steps 0..8" in outs[0][0] and "steps 0..8" not in outs[1][0]  # only process 0 prints and writes
    assert sorted(os.listdir(multi / "checkpoints")) == ["4", "8"]
    outs = two_processes(multi, 12)  # same workdir, more steps: resumes from the multi-host checkpoint at 8
    assert "Resumed from step 8" in outs[0][1]
    ref, got = losses(single), losses(multi)
    assert len(ref) == len(got) == 12
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5 * max(ref), (ref, got)
    acc_single = [r["eval/accuracy"] for r in read_metrics(single) if "eval/accuracy" in r]
    acc_multi = [r["eval/accuracy"] for r in read_metrics(multi) if "eval/accuracy" in r]
    assert acc_single == acc_multi
