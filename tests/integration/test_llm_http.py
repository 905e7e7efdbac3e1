"""A decoder LLM through the HTTP API: a tiny random Llama checkpoint (transformers, safetensors,
its own tokenizer) zipped and uploaded, a text dataset, an int4 job run by a real worker (export with
the ONNX Runtime GenAI builder, GPTQ, measurement), and the artifact loaded in onnxruntime-genai."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from service.core.job_metrics import checked
from service.core.settings import Settings
from tests.conftest import authed_client, fast_settings
from tests.integration.test_job_lifecycle import follow
from tests.llm_checkpoints import checkpoint_files, tiny_llama_zip, zipped

pytestmark = pytest.mark.integration

TEXT = "\n\n".join(f"Paragraph {i}: the json module encodes and decodes JSON documents; pathlib joins paths. " * 3 for i in range(40))


def test_tiny_llama_int4_end_to_end(tmp_path: Path, start_worker) -> None:
    import onnxruntime_genai as og

    settings: Settings = fast_settings(tmp_path, lease_ttl_s=10.0, visibility_timeout_s=600.0)
    start_worker(settings)
    with authed_client(settings) as client:
        uploaded = client.post("/v1/models", files={"file": ("tiny-llama.zip", tiny_llama_zip())})
        assert uploaded.status_code == 201, uploaded.text
        model = uploaded.json()
        assert model["format"] == "hf_causal_lm" and model["llm"]["architecture"] == "LlamaForCausalLM"
        assert (model["llm"]["layers"], model["llm"]["kv_heads"], model["llm"]["vocabulary"]) == (2, 2, 512)
        text = client.post("/v1/datasets", files={"file": ("calib.txt", TEXT.encode())})
        assert text.status_code == 201, text.text
        assert text.json()["kind"] == "text" and text.json()["samples"] == 40

        # Steps and data that do not apply to a checkpoint are refused before anything is queued.
        refused = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"method": "prune", "amount": 0.5}]})
        assert refused.status_code == 422 and "one quantize step" in refused.json()["error"]["message"]
        refused = client.post("/v1/jobs", json={"model_id": model["id"], "steps": [{"method": "quantize", "mode": "int8_static"}]})
        assert refused.status_code == 422 and "int4_weight_only" in refused.json()["error"]["message"]

        body = {"model_id": model["id"], "dataset_id": text.json()["id"], "steps": [{"method": "quantize", "mode": "int4_weight_only"}],
                "measure": {"window": 64, "eval_tokens": 512}}
        job, events = follow(client, client.post("/v1/jobs", json=body).json()["id"])
        assert job["status"] == "succeeded", job["error"]
        metrics = job["metrics"]
        checked(metrics, strict=True)  # every key the LLM path writes is one the schema declares
        original, compressed = metrics["original"]["llm"], metrics["compressed"]["llm"]
        assert metrics["compression_ratio"] > 3, metrics["compression_ratio"]
        assert original["perplexity"] > 1 and compressed["perplexity"] > 1
        assert 0 <= compressed["next_token_agreement"] <= 1 and 0 <= compressed["generation_agreement"] <= 1
        assert original["decode_tokens_per_s"] > 0 and compressed["prefill"][0]["prompt_tokens"] == 128
        assert len(compressed["generations"]) == 4
        report = metrics["step_reports"][0]
        assert report["chosen"] == "int4_weight_only/gptq" and report["lm_head"]["bits"] == 4
        assert {row["bits"] for row in report["layers"]} == {4} and all(row["algorithm"] == "gptq" for row in report["layers"])
        assert metrics["evaluation"]["data"].startswith("dataset")
        assert any(e.get("progress", {}).get("step") == "export" for e in events)

        package = client.get(f"/v1/jobs/{job['id']}/artifacts/model.zip")
        assert package.status_code == 200
        page = client.get(f"/v1/jobs/{job['id']}/report.html")
        assert page.status_code == 200 and "perplexity" in page.text
    folder = tmp_path / "genai"
    with zipfile.ZipFile(io.BytesIO(package.content)) as zf:
        zf.extractall(folder)
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    runtime = og.Model(str(folder))
    tokenizer = og.Tokenizer(runtime)
    params = og.GeneratorParams(runtime)
    params.set_search_options(max_length=24, min_length=24, do_sample=False)
    generator = og.Generator(runtime, params)
    generator.append_tokens(tokenizer.encode("The json module"))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 24


def test_hostile_checkpoints_are_refused_over_http(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path)
    with authed_client(settings) as client:
        for files, code in [
            (checkpoint_files() | {"pytorch_model.bin": b"\x80\x04"}, "pickled_weights"),
            (checkpoint_files() | {"modeling_evil.py": b"import os"}, "code_not_allowed"),
            ({k: v for k, v in checkpoint_files().items() if not k.startswith("tokenizer")}, "tokenizer_missing"),
        ]:
            answer = client.post("/v1/models", files={"file": ("ckpt.zip", zipped(files))})
            assert answer.status_code == 422 and answer.json()["error"]["code"] == code, answer.text
        bad_text = client.post("/v1/datasets", files={"file": ("t.txt", b"caf\xe9 latin-1")})
        assert bad_text.status_code == 422 and bad_text.json()["error"]["code"] == "invalid_text"
        assert client.get("/v1/models").json()["count"] == 0


def test_a_search_over_a_checkpoint_keeps_the_smallest_within_its_perplexity_target(tmp_path: Path, start_worker) -> None:
    settings: Settings = fast_settings(tmp_path, lease_ttl_s=10.0, visibility_timeout_s=600.0)
    start_worker(settings)
    with authed_client(settings) as client:
        model_id = client.post("/v1/models", files={"file": ("tiny-llama.zip", tiny_llama_zip())}).json()["id"]
        text_id = client.post("/v1/datasets", files={"file": ("calib.txt", TEXT.encode())}).json()["id"]
        base = {"model_id": model_id, "dataset_id": text_id, "objective": "size", "budget_minutes": 20, "measure": {"window": 64, "eval_tokens": 512}}
        # An ONNX model's constraints, and recipes that do not apply, are refused with the reason.
        for bad, words in (({"min_fidelity": 0.99}, "max_perplexity_increase"), ({"methods": ["distill"]}, "quantize recipes only")):
            refused = client.post("/v1/searches", json=base | bad)
            assert refused.status_code == 422 and words in refused.json()["error"]["message"], refused.text

        created = client.post("/v1/searches", json=base | {"max_perplexity_increase": 0.2})
        assert created.status_code == 202, created.text
        assert created.json()["request"]["max_perplexity_increase"] == 0.2 and created.json()["rungs"] >= 1
        final, _ = follow(client, created.json()["id"], kind="searches")
        assert final["status"] == "succeeded", final
        candidates = final["candidates"]
        assert {c["recipe"] for c in candidates} == {"llm-auto", "llm-int4-gptq", "llm-int4-gptq-lm-head-int8", "llm-int4-rtn", "llm-int8"}
        assert all(c["status"] == "succeeded" and c["rung"] == 0 for c in candidates), [(c["recipe"], c["error"]) for c in candidates]
        points = {c["job_id"]: c["metrics"] for c in candidates}
        for candidate in candidates:  # each point is its job's own perplexity and decode speed
            job = client.get(f"/v1/jobs/{candidate['job_id']}").json()
            llm = job["metrics"]["compressed"]["llm"]
            assert points[candidate["job_id"]]["perplexity_increase"] == pytest.approx(llm["perplexity_increase"], abs=1e-6)
            assert points[candidate["job_id"]]["meets_constraint"] == (llm["perplexity_increase"] <= 0.2)
            assert points[candidate["job_id"]]["fidelity"] is None and points[candidate["job_id"]]["accuracy"] is None
        feasible = [p for p in points.values() if p["meets_constraint"]]
        assert feasible, points
        assert points[final["best"]]["compression_ratio"] >= max(p["compression_ratio"] for p in feasible) / 1.01
        int8 = next(points[c["job_id"]] for c in candidates if c["recipe"] == "llm-int8")
        int4 = next(points[c["job_id"]] for c in candidates if c["recipe"] == "llm-int4-gptq")
        assert int4["compression_ratio"] > 1.4 * int8["compression_ratio"]
        assert final["best"] in final["pareto"] and set(final["pareto"]) <= set(points)
        page = client.get(f"/v1/searches/{final['id']}/report.html")
        assert page.status_code == 200 and "perplexity within +20%" in page.text and 'class="pareto"' in page.text
        assert page.text.count("<tr>") == len(candidates) + 1
