"""The README's commands as a user runs them: a built wheel in a fresh venv, run from a folder
outside the repository and from the root of a fresh clone (where coop_min/ shadows the installed
package), and a vendored copy made with the README's copy step."""
import os
import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _readme_block(heading, language):
    """The first ```language block after `heading` in the README, verbatim."""
    after = README[README.index(heading):]
    return re.search(rf"```{language}\n(.*?)```", after, re.S).group(1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv holding only the wheel of coop_min, its environment, a scratch folder)."""
    tmp = tmp_path_factory.mktemp("install")
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(ROOT)], check=True, cwd=tmp)
    wheel, = wheels.glob("coop_min-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # torch, numpy, pillow and safetensors come from this interpreter's site-packages by path (a .pth
    # line adds a folder without running the .pth files in it, so this checkout's editable install
    # stays invisible); coop_min itself only from the wheel.
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    env = {**os.environ, "COOP_MIN_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return python, env, tmp


def _run(installed, cwd, *args):
    python, env, _ = installed
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _clone(tmp):
    """The checkout's tracked files (as they are in the working tree) in a new folder: a fresh clone."""
    clone = tmp / "clone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in filter(None, files.stdout.split("\0")):
        if (ROOT / rel).is_file():
            (clone / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, clone / rel)
    return clone


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_trains_and_evaluates_from_any_directory(installed):
    work = installed[2] / "elsewhere"
    work.mkdir()
    where = _run(installed, work, "-c", "import coop_min, coop_min.kernels, coop_min.weights; print(coop_min.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(installed[2] / "venv")), where.stdout   # the wheel, not the checkout

    train = _run(installed, work, "-m", "coop_min.train", "--epochs", "1", "--shots", "1", "--output", "run")
    assert train.returncode == 0, train.stderr[-2000:]
    for name in ("config.json", "state.pt", "prompt.safetensors", "results.json"):
        assert (work / "run" / name).is_file(), name
    evaluate = _run(installed, work, "-m", "coop_min.evaluate", "--prompt", "run")
    assert evaluate.returncode == 0 and "test accuracy" in evaluate.stdout, evaluate.stderr[-2000:]
    convert = _run(installed, work, "-m", "coop_min.weights.convert", "--help")
    assert convert.returncode == 0 and "safetensors" in convert.stdout


@pytest.mark.slow
def test_readme_commands_from_the_root_of_a_fresh_clone_and_from_a_vendored_copy(installed):
    clone = _clone(installed[2])
    quick_start = _readme_block("## Quick start in Python", "python")
    # from the clone's root, `python -m` and `python -c` import the clone's coop_min/, not the wheel's
    where = _run(installed, clone, "-c", "import coop_min.kernels as k, coop_min.weights as w; print(k.__file__, w.__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert where.stdout.split() == [str(clone / "kernels" / "__init__.py"), str(clone / "weights" / "__init__.py")]
    train = _run(installed, clone, "-m", "coop_min.train", "--epochs", "1", "--shots", "1", "--output", "run")
    assert train.returncode == 0 and (clone / "run" / "results.json").is_file(), train.stderr[-2000:]
    start = _run(installed, clone, "-c", quick_start)
    assert start.returncode == 0 and start.stdout.startswith("purple circle: "), start.stderr[-2000:]

    vendor = installed[2] / "vendor"
    vendor.mkdir()
    copy_step = _readme_block("## Vendoring", "bash").strip().replace("DEST", str(vendor))
    subprocess.run(copy_step, shell=True, cwd=clone, check=True)
    where = _run(installed, vendor, "-c", "import coop_min.kernels as k; print(k.__file__)")
    assert where.stdout.strip() == str(vendor / "coop_min" / "kernels" / "__init__.py"), where.stderr[-2000:]
    start = _run(installed, vendor, "-c", quick_start)
    assert start.returncode == 0 and start.stdout.startswith("purple circle: "), start.stderr[-2000:]
