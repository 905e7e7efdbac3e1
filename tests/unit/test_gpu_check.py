"""bench/gpu_check.py runs the worker's training path (structured prune with fine-tuning, distillation)
in a process per device; on a machine without CUDA (CI) it must pass on the CPU and say the CUDA part
was skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_passes_on_cpu_and_says_what_it_skipped(tmp_path: Path) -> None:
    env = {**os.environ, "MODELSHRINK_BENCH_RESULTS": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--quick"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())["results"]
    cpu = results["cpu"]
    assert cpu["device"] == "cpu"
    assert all(cpu[step]["seconds"] > 0 and cpu[step]["quality"] is not None for step in ("prune structured 30% + 1 epoch", "distill width 0.5, 1 epoch"))
    import torch

    if not torch.cuda.is_available():
        assert results["cuda"].startswith("skipped")
    assert results["agree"] is True
