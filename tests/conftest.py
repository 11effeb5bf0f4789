"""Fixtures shared by the end-to-end tests: the demo benchmark on disk and a small random-init CLIP."""
import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coop_min.clip import CLIP, CLIPConfig
from coop_min.demo import write_benchmark

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
if os.environ.get("PYTEST_XDIST_WORKER"):       # pytest -n N: N worker processes, one core each
    torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

# benchmarks/ (bench.py's modules) is a folder of the checkout, not an installed package. It is
# imported from its own folder so that the checkout's root stays off sys.path: there kernels/ would
# shadow Hugging Face's `kernels` package, which transformers imports.
_spec = importlib.util.spec_from_file_location(
    "benchmarks", ROOT / "benchmarks" / "__init__.py", submodule_search_locations=[str(ROOT / "benchmarks")])
sys.modules["benchmarks"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sys.modules["benchmarks"])


@pytest.fixture(scope="session")
def e2e_setup(tmp_path_factory):
    """{"data": demo benchmark folder, "weights": a 1-layer width-64 CLIP, "root": a scratch folder}."""
    root = tmp_path_factory.mktemp("e2e")
    torch.manual_seed(0)
    config = CLIPConfig(64, 32, 1, 64, 8, 2, 77, 49408, 64, 2, 1)
    weights = root / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in CLIP(config).state_dict().items()}, str(weights),
              metadata={"config": json.dumps(asdict(config))})
    return {"data": str(write_benchmark(root)), "weights": str(weights), "root": root}


def cli(module, setup, *args, nproc=1):
    """The command line of `python -m module` on the e2e setup; nproc > 1 launches it with torchrun."""
    launch = [sys.executable, "-m"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"]
    return [*launch, module, "--data", setup["data"], "--weights", setup["weights"], "--workers", "0", *args]


def metrics_lines(path):
    """metrics.jsonl as dicts, without the wall-clock fields (epoch_time_s) that differ between runs."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "epoch_time_s"} for m in lines]


def assert_passes_under_interpreter(test_file):
    """Runs test_file's tests once more in a subprocess with TRITON_INTERPRET=1, where the Triton
    kernels run in Triton's interpreter on the CPU (from tests/, so the checkout's root stays off
    sys.path), and asserts that they passed."""
    pytest.importorskip("triton")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda", str(test_file)]
    run = subprocess.run(cmd, env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(test_file).parent,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
