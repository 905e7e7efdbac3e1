"""Write openapi/openapi.json from the app (a test fails when the file is stale)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from service.api.app import create_app
from service.core.settings import Settings

TARGET = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"


def render() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(Settings(data_dir=Path(tmp)), run_migrations=False)
        return json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
