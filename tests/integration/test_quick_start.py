"""The README's quick start, run as written (only the port differs) against a real `modelshrink serve`."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import onnx
import pytest

from bench.common import free_port
from tests.conftest import ROOT
from tests.integration.test_serve import start, stop

pytestmark = pytest.mark.integration


def quick_start_commands() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quick start"):readme.index("## Running the parts")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return next(b for b in blocks if "modelshrink submit" in b)


def test_the_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    data = tmp_path / "home" / ".modelshrink"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELSHRINK_")}, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path / "home")}
    port = free_port()
    proc, url = start(env, port)  # default data dir: ~/.modelshrink under this HOME, as `keys create` sees it
    try:
        # The commands run where a user would, beside the checkout's .venv and examples/.
        for name in (".venv", "examples"):
            (tmp_path / name).symlink_to(ROOT / name)
        script = "set -euo pipefail\n" + quick_start_commands().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        for output in ("model.int8.onnx", "out.onnx"):
            onnx.checker.check_model(onnx.load(str(tmp_path / output)))
        assert "succeeded" in done.stdout and (data / "modelshrink.db").exists()
        # The first result a newcomer sees is a win: both jobs smaller (measured), neither warns.
        ratios = [float(r) for r in re.findall(r"compression ratio ([\d.]+)x", done.stdout)]
        assert len(ratios) == 2 and min(ratios) > 1.5, done.stdout
        assert "warning:" not in done.stdout, done.stdout
    finally:
        stop(proc)
