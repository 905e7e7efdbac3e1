"""The Docker files cannot rot unnoticed (no container engine runs here): the compose file names only
services, build files, volumes and settings that exist, keeps Redis from losing jobs, and the images'
commands are real CLI commands. tests/integration/test_docker_install.py runs the API image's install
step in a plain venv."""

from __future__ import annotations

import re

import yaml
from typer.main import get_command

from service.cli import app
from service.core.settings import Settings
from tests.conftest import ROOT

DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _dockerfiles() -> dict[str, str]:
    return {p.name: p.read_text() for p in DOCKER.glob("*.Dockerfile")}


def test_compose_services_build_from_files_that_exist_and_depend_on_services_that_exist() -> None:
    services = COMPOSE["services"]
    assert {"api", "worker-cpu", "worker-gpu", "webhooks", "redis", "postgres", "s3"} <= set(services)
    for name, service in services.items():
        if "build" in service:
            assert (ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        for other in service.get("depends_on", []):
            assert other in services, f"{name} depends on unknown {other}"
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in COMPOSE["volumes"], f"{name}: volume {volume} not declared"
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis


def test_every_modelshrink_variable_in_compose_is_a_setting() -> None:
    fields = {f"MODELSHRINK_{name.upper()}" for name in Settings.model_fields}
    for name, service in COMPOSE["services"].items():
        for variable in service.get("environment") or {}:
            if variable.startswith("MODELSHRINK_"):
                assert variable in fields, f"{name}: {variable} is not a setting"
    api_env = COMPOSE["services"]["api"]["environment"]
    assert api_env["MODELSHRINK_ARTIFACT_URL"].startswith("s3://") and "MODELSHRINK_ARTIFACT_DIR" not in api_env


def test_images_copy_what_exists_and_run_real_commands() -> None:
    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    for name, text in _dockerfiles().items():
        for sources in re.findall(r"^COPY (.+) \S+$", text, re.M):
            for source in sources.split():
                assert (ROOT / source).exists(), f"{name}: COPY {source}"
        command = re.search(r'^CMD \["modelshrink", "(\w+)"', text, re.M)
        assert command and command.group(1) in commands, name
    for service in COMPOSE["services"].values():
        if service.get("command", [None])[0] == "modelshrink":
            assert service["command"][1] in commands
    api = _dockerfiles()["api.Dockerfile"]
    assert "[worker]" not in api and "torch" not in api.split("RUN pip install", 1)[1].split("\n")[0]
    assert '".[server]"' in api
    assert '".[worker]"' in _dockerfiles()["worker-gpu.Dockerfile"]
