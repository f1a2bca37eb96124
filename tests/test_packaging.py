"""How the project is put together: a non-editable install runs the digits job from another folder, configs
share their base instead of repeating it, and the package uses only the public APIs of the libraries."""
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import CONFIGS, REPO, cpu_env

RUN = 6  # the longest run of identical lines two configs may share


def significant_lines(path):
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#")]


def test_no_two_configs_share_a_run_of_six_lines():
    runs = {}
    for path in sorted(CONFIGS.glob("*.py")):
        lines = significant_lines(path)
        for i in range(len(lines) - RUN + 1):
            runs.setdefault(tuple(lines[i:i + RUN]), set()).add(path.name)
    shared = {run: files for run, files in runs.items() if len(files) > 1}
    assert not shared, "configs repeat each other; move this into vit22b/config_base.py:\n" + "\n".join(
        f"{sorted(files)}:\n  " + "\n  ".join(run) for run, files in list(shared.items())[:3])


def test_the_package_uses_no_private_library_modules():
    offenders = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for path in sorted((REPO / "vit22b").rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if "_src" in line]
    assert not offenders, "\n".join(offenders)


def test_a_non_editable_install_runs_the_digits_job_from_another_folder(tmp_path):
    # `pip install .` from a copy of the sources (so the checkout stays clean), into a folder that goes first on
    # the path; the job then runs in a folder with no data/ and no package sources around it.
    source, site, elsewhere = tmp_path / "source", tmp_path / "site", tmp_path / "elsewhere"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info",
                                                                "__pycache__", "tests", "colabs", "docs"))
    elsewhere.mkdir()
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                          "--no-build-isolation", "--target", str(site), str(source)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    shutil.rmtree(source)
    env = dict(cpu_env(), PYTHONPATH=str(site))
    check = subprocess.run([sys.executable, "-c", (
        "import vit22b, vit22b.input.datasets as d, pkgutil\n"
        "from vit22b.input import pipeline\n"
        "names = [m.name for m in pkgutil.iter_modules(d.__path__)]\n"
        "print(vit22b.__file__)\n"
        "print(*[pipeline.dataset_module(n).__name__ for n in names])\n")],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-3000:]
    location, modules = check.stdout.splitlines()
    assert Path(location).is_relative_to(site), location
    shipped = sorted(p.stem for p in (REPO / "vit22b/input/datasets").glob("*.py") if p.stem != "__init__")
    assert sorted(modules.split()) == [f"vit22b.input.datasets.{n}" for n in shipped]

    run = subprocess.run([sys.executable, "-m", "vit22b.main", f"--config={CONFIGS}/vit22b_digits.py:runlocal",
                          "--workdir=wd", "--config.total_steps=6", "--config.log_every=1", "--config.eval_every=6",
                          "--config.checkpoint_every=6"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (elsewhere / "wd" / "checkpoints" / "6").is_dir()
    assert "eval/accuracy" in (elsewhere / "wd" / "metrics.jsonl").read_text()
