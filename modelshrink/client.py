"""Typed clients for the modelshrink API, sync and async, answering the response models the OpenAPI
file is generated from (service.api.schemas), so a field the service documents is a typed attribute here.

    from modelshrink.client import Client
    client = Client("http://127.0.0.1:8000", api_key)
    model = client.upload_model("model.onnx"); data = client.upload_dataset("calib.npz")
    job = client.wait(client.submit(model.id, [{"method": "quantize", "mode": "auto"}], dataset_id=data.id).id)
    client.download(job.id, "model.small.onnx")

`AsyncClient` has the same methods, awaited. Errors raise `ApiFailure(status, code, message)`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx

from service.api.schemas import DatasetPublic, JobPublic, ModelPublic, SearchesPublic, SearchPublic
from service.client import ApiFailure, EventParser, external_data_files, failure, zipped_with_external_data

__all__ = ["ApiFailure", "AsyncClient", "Client"]

# Called with each event before the end: ("progress" or "status", the job's or search's data).
OnProgress = Callable[[str, dict[str, Any]], None]


def _settings(url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    url = url or os.environ.get("MODELSHRINK_URL", "http://127.0.0.1:8000")
    api_key = api_key or os.environ.get("MODELSHRINK_API_KEY")
    if not api_key:
        raise ValueError("pass api_key or set MODELSHRINK_API_KEY (create one with `modelshrink keys create --tenant NAME`)")
    return url, {"Authorization": f"Bearer {api_key}"}


def _job_body(model_id: str, steps: list[dict[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    return {"model_id": model_id, "steps": steps, **{k: v for k, v in options.items() if v is not None}}


def _search_body(model_id: str, objective: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"model_id": model_id, "objective": objective, **{k: v for k, v in options.items() if v is not None}}


def _headers(idempotency_key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": idempotency_key} if idempotency_key else {}


def _kind(object_id: str) -> str:
    return "searches" if object_id.startswith("srch_") else "jobs"


class Client:
    """Blocking client (httpx.Client)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        base, headers = _settings(url, api_key)
        self.http = httpx.Client(base_url=base, headers=headers, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _json(self, method: str, route: str, **kwargs: Any) -> Any:
        response = self.http.request(method, route, **kwargs)
        if response.status_code >= 400:
            raise failure(response.status_code, response.content)
        return response.json()

    def _upload(self, path: Path, route: str) -> Any:
        with open(path, "rb") as fh:
            return self._json("POST", route, files={"file": (path.name, fh)}, data={"name": path.name})

    def upload_model(self, path: str | Path) -> ModelPublic:
        """An .onnx file; one with external data files beside it goes up zipped with them."""
        path = Path(path)
        if not external_data_files(path):
            return ModelPublic.model_validate(self._upload(path, "/v1/models"))
        with tempfile.TemporaryDirectory() as tmp:
            bundle = zipped_with_external_data(path, Path(tmp))
            with open(bundle, "rb") as fh:
                return ModelPublic.model_validate(self._json("POST", "/v1/models", files={"file": (bundle.name, fh)}, data={"name": path.name}))

    def upload_dataset(self, path: str | Path) -> DatasetPublic:
        return DatasetPublic.model_validate(self._upload(Path(path), "/v1/datasets"))

    def submit(self, model_id: str, steps: list[dict[str, Any]], *, dataset_id: str | None = None, eval_dataset_id: str | None = None,
               measure: dict[str, Any] | None = None, limits: dict[str, Any] | None = None, webhook_url: str | None = None,
               idempotency_key: str | None = None) -> JobPublic:
        body = _job_body(model_id, steps, {"dataset_id": dataset_id, "eval_dataset_id": eval_dataset_id, "measure": measure, "limits": limits, "webhook_url": webhook_url})
        return JobPublic.model_validate(self._json("POST", "/v1/jobs", json=body, headers=_headers(idempotency_key)))

    def job(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._json("GET", f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    def search(self, model_id: str, objective: str, *, dataset_id: str | None = None, eval_dataset_id: str | None = None,
               max_accuracy_drop: float | None = None, min_fidelity: float | None = None, budget_minutes: float | None = None,
               methods: list[str] | None = None, seed: int | None = None, measure: dict[str, Any] | None = None,
               webhook_url: str | None = None, idempotency_key: str | None = None) -> SearchPublic:
        """Start a search across methods; `wait_search` follows it to its end."""
        body = _search_body(model_id, objective, {
            "dataset_id": dataset_id, "eval_dataset_id": eval_dataset_id, "max_accuracy_drop": max_accuracy_drop, "min_fidelity": min_fidelity,
            "budget_minutes": budget_minutes, "methods": methods, "seed": seed, "measure": measure, "webhook_url": webhook_url})
        return SearchPublic.model_validate(self._json("POST", "/v1/searches", json=body, headers=_headers(idempotency_key)))

    def get_search(self, search_id: str) -> SearchPublic:
        return SearchPublic.model_validate(self._json("GET", f"/v1/searches/{search_id}"))

    def list_searches(self, status: str | None = None, limit: int = 50) -> SearchesPublic:
        params = {"limit": limit, **({"status": status} if status else {})}
        return SearchesPublic.model_validate(self._json("GET", "/v1/searches", params=params))

    def cancel_search(self, search_id: str) -> SearchPublic:
        return SearchPublic.model_validate(self._json("POST", f"/v1/searches/{search_id}/cancel"))

    def events(self, object_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event, data) from a job's or a search's server-sent events until it ends (the last is
        ("end", the final job or search as JSON)); `data["progress"]` has fraction, step and message."""
        with self.http.stream("GET", f"/v1/{_kind(object_id)}/{object_id}/events", timeout=None) as response:
            if response.status_code >= 400:
                raise failure(response.status_code, response.read())
            parser = EventParser()
            for line in response.iter_lines():
                found = parser.feed(line)
                if found is not None:
                    yield found
                    if found[0] == "end":
                        return
        raise ApiFailure(502, "stream_ended", f"the event stream of {object_id} ended before it did")

    def _follow(self, object_id: str, on_progress: OnProgress | None) -> dict[str, Any]:
        for event, data in self.events(object_id):
            if event == "end":
                return data
            if on_progress is not None:
                on_progress(event, data)
        raise ApiFailure(502, "stream_ended", f"the event stream of {object_id} ended before it did")

    def wait(self, job_id: str, on_progress: OnProgress | None = None) -> JobPublic:
        """Follow the job's events until it ends; the final job. `on_progress(event, data)` sees
        every event before the end (e.g. `lambda e, d: print(d["progress"]["message"])`)."""
        return JobPublic.model_validate(self._follow(job_id, on_progress))

    def wait_search(self, search_id: str, on_progress: OnProgress | None = None) -> SearchPublic:
        return SearchPublic.model_validate(self._follow(search_id, on_progress))

    def report_html(self, object_id: str) -> str:
        """The self-contained report page of a job or a search (by its id)."""
        response = self.http.get(f"/v1/{_kind(object_id)}/{object_id}/report.html")
        if response.status_code >= 400:
            raise failure(response.status_code, response.content)
        return response.text

    def download(self, job_id: str, dest: str | Path, name: str = "model.onnx") -> Path:
        dest = Path(dest)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
            if response.status_code >= 400:
                raise failure(response.status_code, response.read())
            with open(dest, "wb") as out:
                for chunk in response.iter_bytes(1024 * 1024):
                    out.write(chunk)
        return dest


class AsyncClient:
    """The same API for asyncio (httpx.AsyncClient): every method awaited."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> None:
        base, headers = _settings(url, api_key)
        self.http = httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _json(self, method: str, route: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, route, **kwargs)
        if response.status_code >= 400:
            raise failure(response.status_code, response.content)
        return response.json()

    async def _upload(self, path: Path, route: str, name: str | None = None) -> Any:
        # httpx's async client wants the file's bytes (a sync file object would block the loop).
        return await self._json("POST", route, files={"file": (path.name, path.read_bytes())}, data={"name": name or path.name})

    async def upload_model(self, path: str | Path) -> ModelPublic:
        path = Path(path)
        if not external_data_files(path):
            return ModelPublic.model_validate(await self._upload(path, "/v1/models"))
        with tempfile.TemporaryDirectory() as tmp:
            return ModelPublic.model_validate(await self._upload(zipped_with_external_data(path, Path(tmp)), "/v1/models", path.name))

    async def upload_dataset(self, path: str | Path) -> DatasetPublic:
        return DatasetPublic.model_validate(await self._upload(Path(path), "/v1/datasets"))

    async def submit(self, model_id: str, steps: list[dict[str, Any]], *, dataset_id: str | None = None, eval_dataset_id: str | None = None,
                     measure: dict[str, Any] | None = None, limits: dict[str, Any] | None = None, webhook_url: str | None = None,
                     idempotency_key: str | None = None) -> JobPublic:
        body = _job_body(model_id, steps, {"dataset_id": dataset_id, "eval_dataset_id": eval_dataset_id, "measure": measure, "limits": limits, "webhook_url": webhook_url})
        return JobPublic.model_validate(await self._json("POST", "/v1/jobs", json=body, headers=_headers(idempotency_key)))

    async def job(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(await self._json("GET", f"/v1/jobs/{job_id}"))

    async def cancel(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(await self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    async def search(self, model_id: str, objective: str, *, dataset_id: str | None = None, eval_dataset_id: str | None = None,
                     max_accuracy_drop: float | None = None, min_fidelity: float | None = None, budget_minutes: float | None = None,
                     methods: list[str] | None = None, seed: int | None = None, measure: dict[str, Any] | None = None,
                     webhook_url: str | None = None, idempotency_key: str | None = None) -> SearchPublic:
        body = _search_body(model_id, objective, {
            "dataset_id": dataset_id, "eval_dataset_id": eval_dataset_id, "max_accuracy_drop": max_accuracy_drop, "min_fidelity": min_fidelity,
            "budget_minutes": budget_minutes, "methods": methods, "seed": seed, "measure": measure, "webhook_url": webhook_url})
        return SearchPublic.model_validate(await self._json("POST", "/v1/searches", json=body, headers=_headers(idempotency_key)))

    async def get_search(self, search_id: str) -> SearchPublic:
        return SearchPublic.model_validate(await self._json("GET", f"/v1/searches/{search_id}"))

    async def list_searches(self, status: str | None = None, limit: int = 50) -> SearchesPublic:
        params = {"limit": limit, **({"status": status} if status else {})}
        return SearchesPublic.model_validate(await self._json("GET", "/v1/searches", params=params))

    async def cancel_search(self, search_id: str) -> SearchPublic:
        return SearchPublic.model_validate(await self._json("POST", f"/v1/searches/{search_id}/cancel"))

    async def events(self, object_id: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """As Client.events, as an async iterator."""
        async with self.http.stream("GET", f"/v1/{_kind(object_id)}/{object_id}/events", timeout=None) as response:
            if response.status_code >= 400:
                raise failure(response.status_code, await response.aread())
            parser = EventParser()
            async for line in response.aiter_lines():
                found = parser.feed(line)
                if found is not None:
                    yield found
                    if found[0] == "end":
                        return
        raise ApiFailure(502, "stream_ended", f"the event stream of {object_id} ended before it did")

    async def _follow(self, object_id: str, on_progress: OnProgress | None) -> dict[str, Any]:
        async for event, data in self.events(object_id):
            if event == "end":
                return data
            if on_progress is not None:
                on_progress(event, data)
        raise ApiFailure(502, "stream_ended", f"the event stream of {object_id} ended before it did")

    async def wait(self, job_id: str, on_progress: OnProgress | None = None) -> JobPublic:
        return JobPublic.model_validate(await self._follow(job_id, on_progress))

    async def wait_search(self, search_id: str, on_progress: OnProgress | None = None) -> SearchPublic:
        return SearchPublic.model_validate(await self._follow(search_id, on_progress))

    async def report_html(self, object_id: str) -> str:
        response = await self.http.get(f"/v1/{_kind(object_id)}/{object_id}/report.html")
        if response.status_code >= 400:
            raise failure(response.status_code, response.content)
        return response.text

    async def download(self, job_id: str, dest: str | Path, name: str = "model.onnx") -> Path:
        dest = Path(dest)
        async with self.http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
            if response.status_code >= 400:
                raise failure(response.status_code, await response.aread())
            with open(dest, "wb") as out:
                async for chunk in response.aiter_bytes(1024 * 1024):
                    out.write(chunk)
        return dest
