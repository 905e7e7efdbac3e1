"""The HTTP layer of the modelshrink API answering plain dicts (the benchmarks use it; the typed SDK,
`modelshrink.client`, and the CLI build on it)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


class ApiFailure(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def failure(status: int, body: bytes) -> ApiFailure:
    """The API's error body ({"error": {code, message}}) as an exception."""
    try:
        err = json.loads(body)["error"]
        return ApiFailure(status, err["code"], err["message"])
    except (ValueError, KeyError, TypeError):
        return ApiFailure(status, "http_error", body[:500].decode(errors="replace"))


class EventParser:
    """Server-sent events, fed line by line: `feed` returns (event, data) when a blank line ends one."""

    def __init__(self) -> None:
        self.event, self.data = "message", []

    def feed(self, line: str) -> tuple[str, dict[str, Any]] | None:
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].strip())
        elif not line and self.data:
            found = (self.event, json.loads("\n".join(self.data)))
            self.event, self.data = "message", []
            return found
        return None


def zipped_with_external_data(path: Path, folder: Path) -> Path:
    """An .onnx whose weights sit in external data files beside it, zipped with them (what the API takes)."""
    from service.core.onnx_bundle import pack

    return pack(path, folder / f"{path.stem}.zip")


def external_data_files(path: Path) -> list[str]:
    """The data files an .onnx refers to (relative names beside it); [] for a single-file model.

    Reading the references needs the onnx package, which a client-only install (the SDK) may not
    have: then a model with files beside it that look like its external data is refused here with
    what to do, and any other goes up as it is (the API says so if it does refer to external data)."""
    if path.suffix != ".onnx":
        return []
    from service.core.onnx_bundle import data_files

    try:
        return data_files(path)
    except ImportError:
        pass
    beside = sorted(p.name for p in path.parent.glob(f"{path.name}*") if p.name != path.name and p.is_file())
    if beside:
        raise ValueError(f"{path.name} seems to keep its weights in {', '.join(beside)}: zip the model with them "
                         "(or pip install onnx, and the client zips it for you)")
    return []


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        url = url or os.environ.get("MODELSHRINK_URL", "http://127.0.0.1:8000")
        api_key = api_key or os.environ.get("MODELSHRINK_API_KEY")
        if not api_key:
            raise ValueError("set MODELSHRINK_API_KEY (create one with `modelshrink keys create --tenant NAME`)")
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise failure(response.status_code, response.read())
        return response

    def _upload(self, path: Path, route: str) -> dict[str, Any]:
        with open(path, "rb") as fh:
            return self._check(self.http.post(route, files={"file": (path.name, fh)}, data={"name": path.name})).json()

    def upload_model(self, path: Path) -> dict[str, Any]:
        """Upload an .onnx file; one that keeps its weights in external data files (torch.onnx.export's
        default) goes up zipped with them, as the API expects."""
        if not external_data_files(path):
            return self._upload(path, "/v1/models")
        with tempfile.TemporaryDirectory() as tmp:
            bundle = zipped_with_external_data(path, Path(tmp))
            with open(bundle, "rb") as fh:
                return self._check(self.http.post("/v1/models", files={"file": (bundle.name, fh)}, data={"name": path.name})).json()

    def upload_dataset(self, path: Path) -> dict[str, Any]:
        return self._upload(path, "/v1/datasets")

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self.http.post("/v1/jobs", json=body, headers=headers)).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel")).json()

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (event, data) from the job's server-sent events until the job ends."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as response:
            self._check(response)
            parser = EventParser()
            for line in response.iter_lines():
                found = parser.feed(line)
                if found is not None:
                    yield found
                    if found[0] == "end":
                        return

    def download(self, job_id: str, name: str, dest: Path) -> Path:
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            with open(dest, "wb") as out:
                for chunk in response.iter_bytes(1024 * 1024):
                    out.write(chunk)
        return dest
