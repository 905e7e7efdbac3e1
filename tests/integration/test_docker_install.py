"""The API image's install step, run in a plain venv as the Dockerfile runs it (no container engine
here): the package without its `worker` extra installs, has no torch, and serves the app; the
webhook deliverer (the API image too) imports its Celery tasks without torch."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration
CHECK = """
import importlib.util, sys
assert importlib.util.find_spec("torch") is None, "torch is installed in the API image"
from service.api.app import create_app
from service.core.settings import Settings
app = create_app(Settings(data_dir=sys.argv[1]))
assert "/v1/searches" in app.openapi()["paths"]
import workers.celery_app, workers.tasks  # the webhook deliverer's imports
assert "torch" not in sys.modules
print("ok")
"""


def test_the_api_image_install_step_works_without_torch(tmp_path: Path) -> None:
    dockerfile = (ROOT / "docker" / "api.Dockerfile").read_text()
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    for sources in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for source in sources.split():
            (shutil.copytree if (ROOT / source).is_dir() else shutil.copy)(ROOT / source, app_dir / source)
    install = re.search(r"^RUN pip install (.+?) \\\\?$", dockerfile, re.M)
    assert install, "no pip install step in the API Dockerfile"
    args = [a for a in shlex.split(install.group(1)) if a != "--no-cache-dir"]
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    done = subprocess.run([python, "-m", "pip", "install", "-q", *args], cwd=app_dir, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ran = subprocess.run([python, "-c", CHECK, str(tmp_path / "data")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0 and ran.stdout.strip().endswith("ok"), ran.stderr[-3000:]
