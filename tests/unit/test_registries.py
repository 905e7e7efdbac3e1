"""Meta-tests that keep the registries complete."""

from __future__ import annotations

from pathlib import Path

from service.core.specs import STEP_TYPES
from workers.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]


def test_every_step_spec_has_a_method_module_and_back() -> None:
    names = {spec.model_fields["method"].default for spec in STEP_TYPES}
    assert names == set(METHODS)
    for name, module in METHODS.items():
        assert module.name == name and callable(module.apply)


def test_every_method_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in METHODS:
        assert f'"method": "{name}"' in readme, f"README.md does not document the {name} method"


def test_api_and_methods_never_import_torch_celery_or_fastapi_at_module_level() -> None:
    for path in (ROOT / "service").rglob("*.py"):
        assert "import torch" not in path.read_text(), f"{path} imports torch; the API must not"
    for path in (ROOT / "workers" / "methods").rglob("*.py"):
        text = path.read_text()
        for banned in ("celery", "fastapi"):
            assert f"import {banned}" not in text and f"from {banned}" not in text, f"{path} imports {banned}"


def test_the_data_reader_and_step_types_load_no_method() -> None:
    # Methods are imported on first use: what they share (step types, data, measurements) must not pull them all in.
    import subprocess
    import sys

    code = "import sys, workers.data, workers.evaluation, workers.metrics; print(sorted(m for m in sys.modules if m.startswith('workers.methods.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
