"""Two local processes x 2 CPU devices (gloo) train like one process x 4 devices, resume from their multi-host
checkpoint, and save one agreed step when only one of them receives SIGTERM."""
import os
import signal
import socket
import subprocess
import time

from conftest import CONFIGS, REPO, cpu_env, main_cmd
from vit22b.train.metrics import read_metrics

SPEC = f"{CONFIGS}/vit22b_digits.py:runlocal"
# A constant schedule, so that extending total_steps on resume does not change the earlier learning rates.
FLAGS = ("--config.log_every=1", "--config.checkpoint_every=4", "--config.eval_every=8", "--config.input.batch_size=16",
         "--config.schedule.decay_type=constant", "--config.monitors=()")  # monitors: tested elsewhere (CI time)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two(workdir, steps):
    port = free_port()
    # Without the suite's compilation cache: with jax 0.12 on CPU, a resumed run whose process 0 loaded its step
    # from the persistent cache (process 1's key differs, so it compiles) hung in that step's first collective.
    env = {k: v for k, v in cpu_env(2).items() if k != "JAX_COMPILATION_CACHE_DIR"}
    return [subprocess.Popen(main_cmd(SPEC, workdir, *FLAGS, f"--config.total_steps={steps}",
                                      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                      f"--process_id={i}"), cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


def finish(procs):
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def two_processes(workdir, steps):
    return finish(start_two(workdir, steps))


def losses(workdir):
    return [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]


def test_two_processes_match_one_resume_and_agree_on_a_preemption_step(tmp_path):
    single = tmp_path / "single"
    r = subprocess.run(main_cmd(SPEC, single, *FLAGS, "--config.total_steps=80"), cwd=REPO, env=cpu_env(4),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = losses(single)
    multi = tmp_path / "multi"
    outs = two_processes(multi, 8)
    assert "steps 0..8" in outs[0][0] and "steps 0..8" not in outs[1][0]  # only process 0 prints and writes
    assert sorted(os.listdir(multi / "checkpoints")) == ["4", "8"]

    # Same workdir, more steps: resumes from the multi-host checkpoint at 8. A SIGTERM to process 1 alone, once
    # step 11 is logged: JAX's preemption service has both processes save one step, which they agree on, and exit 0.
    procs = start_two(multi, 1000)
    deadline = time.time() + 180
    while len(losses(multi)) < 11 and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = finish(procs)
    assert "Resumed from step 8" in outs[0][1]
    saved = int(outs[0][0].split("Preempted: saved a checkpoint at step ")[1].split(";")[0])
    assert 11 <= saved < len(ref) - 4, saved
    iterator_files = set(os.listdir(multi / "checkpoints" / str(saved) / "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= iterator_files

    outs = two_processes(multi, saved + 4)
    assert f"Resumed from step {saved}" in outs[0][1]
    got = losses(multi)
    assert len(got) == saved + 4
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5 * max(ref), (ref, got)
    def accuracies(workdir):
        return {r["step"]: r["eval/accuracy"] for r in read_metrics(workdir) if "eval/accuracy" in r}
    acc_single, acc_multi = accuracies(single), accuracies(multi)
    common = set(acc_single) & set(acc_multi)
    assert 8 in common and all(acc_single[k] == acc_multi[k] for k in common)
