"""`.ci/gpu`, the one prepared device call, run whole on the CPU at smoke sizes (DRY_RUN=1): every part
runs and passes, $OUT holds no more files than a device call brings back, and the summary comes last."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["attention", "tables", "head", "linear-probe", "graph", "shared-prefix", "tests"]


@pytest.mark.slow
def test_the_device_plan_runs_whole_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "COMMIT": "0123abc", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(ROOT / ".ci" / "gpu")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("== ") and " s of a " in line] == \
        [f"== {p}" for p in PARTS]
    assert all(": ok, " in line for line in lines if line.startswith("== ") and " s of a " in line)
    assert "COMMIT=0123abc" in (out / "environment.txt").read_text()
    # a device call brings back at most 8 files; the plan keeps to 5
    assert sorted(p.name for p in out.iterdir()) == ["environment.txt", "gpu.log", "head.json",
                                                     "shared-prefix.json", "tables.json"]
    cases = [r["case"] for name in ("tables", "shared-prefix")
             for r in json.loads((out / f"{name}.json").read_text())["cases"]]
    assert cases and all(c.split("-")[0] in ("coop", "cocoop", "zeroshot") for c in cases)
    table = lines.index("| case | official ms | ours eager ms (speedup) | ours graph ms (speedup) "
                        "| peak GiB official / ours / graph | target |")
    assert table > max(i for i, line in enumerate(lines) if line.startswith("== "))     # the summary last
