"""The README's quick start, run as written (only the port differs) against a real `modelshrink serve`,
and its SDK example run by the client alone: the package installed without extras in a fresh venv."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from bench.common import free_port
from tests.conftest import ROOT
from tests.integration.test_serve import start, stop

pytestmark = pytest.mark.integration


def quick_start_commands() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Quick start")
    section = readme[start:readme.index("\n## ", start)]
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


def sdk_example() -> str:
    readme = (ROOT / "README.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "from modelshrink.client import Client" in b)


SERVER_ONLY = ("fastapi", "sqlalchemy", "celery", "onnxruntime", "numpy", "onnx", "torch", "uvicorn", "redis")


def test_the_sdk_installed_alone_runs_the_readme_example(tmp_path: Path) -> None:
    # The package as a pipeline would install it: `pip install modelshrink`, no extras, in a fresh venv.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("service", "workers", "modelshrink"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    done = subprocess.run([python, "-m", "pip", "install", "-q", str(source)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = f"import importlib.util; print([m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m)])"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MODELSHRINK_")}, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path / "home")}
    port = free_port()
    proc, url = start(env, port)
    try:
        key = subprocess.run([str(ROOT / ".venv" / "bin" / "modelshrink"), "keys", "create", "--tenant", "sdk"], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        work = tmp_path / "user"
        work.mkdir()
        (work / "examples").symlink_to(ROOT / "examples")
        script = f"api_key = {key!r}\n" + sdk_example().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        client_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # the venv's installed package, not the checkout
        ran = subprocess.run([python, "-c", script], cwd=work, env=client_env, capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, ran.stderr[-3000:]
        status, size = ran.stdout.split()[:2]
        assert status == "succeeded" and 0 < int(size) < (ROOT / "examples" / "model.onnx").stat().st_size, ran.stdout
        onnx.checker.check_model(onnx.load(str(work / "model.small.onnx")))
        # The client's command is there too, and a server command says which extra it needs.
        cli = subprocess.run([str(tmp_path / "venv" / "bin" / "modelshrink"), "serve"], cwd=work, env=client_env, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 2 and "modelshrink[server]" in cli.stderr, cli.stderr[-2000:]
    finally:
        stop(proc)
