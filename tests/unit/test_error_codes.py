"""Every error code the source can raise is in the one documented list (service/core/error_codes.py)."""

from __future__ import annotations

import ast
from pathlib import Path

from service.api.schemas import ERROR_CODES, ErrorBody

ROOT = Path(__file__).resolve().parents[2]


def _codes_in_source() -> dict[str, str]:
    """code -> a file raising it: `code="..."` keywords, `code = "..."` class attributes, {"code": "..."}
    dicts, and the first argument of BundleRefused / the probe's _fail."""
    found: dict[str, str] = {}
    for path in [*(ROOT / "service").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            value = None
            if isinstance(node, ast.keyword) and node.arg == "code":
                value = node.value
            elif isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["code"]:
                value = node.value
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("BundleRefused", "_fail") and node.args:
                value = node.args[0]
            elif isinstance(node, ast.Dict):
                value = next((v for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant) and k.value == "code"), None)
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.setdefault(value.value, str(path.relative_to(ROOT)))
    return found


def test_every_raised_code_is_documented() -> None:
    missing = {code: where for code, where in _codes_in_source().items() if code not in ERROR_CODES}
    assert not missing, f"add these codes to service/core/error_codes.py: {missing}"


def test_the_openapi_schema_enumerates_the_codes() -> None:
    schema = ErrorBody.model_json_schema()["properties"]["code"]
    assert schema["enum"] == sorted(ERROR_CODES)
    assert "quantization_target_missed" in schema["enum"] and "prune_failed" in schema["enum"]
