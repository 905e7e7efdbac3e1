"""A small HTTP client for the modelshrink API (used by the CLI and the benchmarks)."""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


class ApiFailure(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def external_data_files(path: Path) -> list[str]:
    """The data files an .onnx refers to (relative names beside it); [] for a single-file model."""
    if path.suffix != ".onnx":
        return []
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load_model(str(path), load_external_data=False)
    locations = set()
    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(locations)


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        url = url or os.environ.get("MODELSHRINK_URL", "http://127.0.0.1:8000")
        api_key = api_key or os.environ.get("MODELSHRINK_API_KEY")
        if not api_key:
            raise ValueError("set MODELSHRINK_API_KEY (create one with `modelshrink keys create --tenant NAME`)")
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                raise ApiFailure(response.status_code, err["code"], err["message"])
            except (ValueError, KeyError, TypeError):
                raise ApiFailure(response.status_code, "http_error", response.text[:500]) from None
        return response

    def _upload(self, path: Path, route: str) -> dict[str, Any]:
        with open(path, "rb") as fh:
            return self._check(self.http.post(route, files={"file": (path.name, fh)}, data={"name": path.name})).json()

    def upload_model(self, path: Path) -> dict[str, Any]:
        """Upload an .onnx file; one that keeps its weights in external data files (torch.onnx.export's
        default) goes up zipped with them, as the API expects."""
        data_files = external_data_files(path)
        if not data_files:
            return self._upload(path, "/v1/models")
        with tempfile.TemporaryDirectory() as tmp:
            bundle = Path(tmp) / f"{path.stem}.zip"
            with zipfile.ZipFile(bundle, "w", zipfile.ZIP_STORED) as zf:  # weights barely compress
                zf.write(path, path.name)
                for data_file in data_files:
                    zf.write(path.parent / data_file, data_file)
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
            event, data = "message", []
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())
                elif not line and data:
                    yield event, json.loads("\n".join(data))
                    if event == "end":
                        return
                    event, data = "message", []

    def download(self, job_id: str, name: str, dest: Path) -> Path:
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            with open(dest, "wb") as out:
                for chunk in response.iter_bytes(1024 * 1024):
                    out.write(chunk)
        return dest
