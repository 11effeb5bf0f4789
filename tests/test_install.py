"""A built wheel, installed into a fresh venv, runs the main commands from a directory outside the
repository: the demo weights are package data and coop_min.weights.convert is installed."""
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_trains_and_evaluates_from_any_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, cwd=tmp_path)
    wheel, = wheels.glob("coop_min-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # torch, numpy, pillow and safetensors come from this interpreter's site-packages by path (a .pth
    # line adds a folder without running the .pth files in it, so this checkout's editable install
    # stays invisible); coop_min itself only from the wheel.
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "COOP_MIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}

    def run(*args):
        return subprocess.run([str(python), *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    where = run("-c", "import coop_min, coop_min.kernels, coop_min.weights; print(coop_min.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(env_dir)), where.stdout           # the wheel, not the checkout

    train = run("-m", "coop_min.train", "--epochs", "1", "--shots", "1", "--output", "run")
    assert train.returncode == 0, train.stderr[-2000:]
    for name in ("config.json", "state.pt", "prompt.safetensors", "results.json"):
        assert (work / "run" / name).is_file(), name
    evaluate = run("-m", "coop_min.evaluate", "--prompt", "run")
    assert evaluate.returncode == 0 and "test accuracy" in evaluate.stdout, evaluate.stderr[-2000:]
    convert = run("-m", "coop_min.weights.convert", "--help")
    assert convert.returncode == 0 and "safetensors" in convert.stdout
