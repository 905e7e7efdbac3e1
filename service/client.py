"""A small HTTP client for the modelshrink API (used by the CLI and the benchmarks)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


class ApiFailure(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


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
        return self._upload(path, "/v1/models")

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
