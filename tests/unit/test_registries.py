"""Meta-tests that keep the registries complete."""

from __future__ import annotations

import ast
from pathlib import Path

from service.core.specs import STEP_TYPES
from workers.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]


def test_every_step_spec_has_a_method_module_and_back() -> None:
    names = {spec.model_fields["method"].default for spec in STEP_TYPES}
    assert names == set(METHODS)
    for name, module in METHODS.items():
        assert module.name == name and callable(module.apply)


def test_every_method_has_its_docs_page_and_a_readme_example() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in METHODS:
        page = ROOT / "docs" / "methods" / f"{name}.md"
        assert page.is_file(), f"docs/methods/{name}.md is missing"
        assert page.read_text().startswith(f"# {name}\n"), f"{page} does not start with its title"
        assert f'"method": "{name}"' in readme, f"README.md has no example step for {name}"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (functions too), as dotted names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _offenders(folder: str, banned: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {module}" for path in sorted((ROOT / folder).rglob("*.py")) for module in sorted(_imports(path))
            if any(module == b or module.startswith(b + ".") for b in banned)]


def test_layering_by_imports() -> None:
    # The API (and what it shares with the worker) never loads torch; methods never know Celery or FastAPI.
    assert _offenders("service/core", ("torch", "workers", "fastapi")) == []
    assert _offenders("service/api", ("torch", "workers")) == []
    assert _offenders("workers/methods", ("celery", "fastapi", "service.api")) == []


def test_the_cli_loads_no_torch_or_worker_code_on_import() -> None:
    # `modelshrink submit` on a client machine must not load torch or the worker through the CLI module.
    import subprocess
    import sys

    code = "import sys, service.cli; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('workers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert out == "[]", out


def test_the_data_reader_and_step_types_load_no_method() -> None:
    # Methods are imported on first use: what they share (step types, data, measurements) must not pull them all in.
    import subprocess
    import sys

    code = "import sys, workers.data, workers.evaluation, workers.metrics; print(sorted(m for m in sys.modules if m.startswith('workers.methods.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out


MAX_FUNCTION_LINES = 80


def test_no_function_in_the_service_or_the_worker_is_over_80_lines() -> None:
    # Long orchestrators hide what a job does in what order; an applied Alembic migration is history
    # as Alembic wrote it (its upgrade says so) and is left out.
    long = []
    for folder in ("service", "workers", "modelshrink"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
