"""`modelshrink keys create` says where it wrote the key, and warns when that database is new."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from service.cli import app


def test_keys_create_warns_about_a_new_database_and_names_where_the_key_went(tmp_path: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--data-dir", str(tmp_path)])
    assert first.exit_code == 0, first.output
    assert "no service database" in first.stderr and str(tmp_path / "modelshrink.db") in first.stderr
    assert first.stdout.strip().startswith("msk_") and len(first.stdout.strip().splitlines()) == 1
    second = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--data-dir", str(tmp_path)])
    assert second.exit_code == 0 and "warning" not in second.stderr
    assert str(tmp_path / "modelshrink.db") in second.stderr


def test_the_serve_banner_names_the_page_and_the_key_command_for_its_data_dir(tmp_path) -> None:
    from service.cli import serve_banner

    banner = serve_banner("http://127.0.0.1:8123", tmp_path, f"sqlite:///{tmp_path}/modelshrink.db")
    assert "http://127.0.0.1:8123/ui" in banner
    assert f"MODELSHRINK_DATA_DIR={tmp_path} modelshrink keys create --tenant" in banner
