"""Every error code the service answers with, in one list: the API documents it in the OpenAPI schema
(`ErrorBody.code`), and a test checks that each code the source can raise is listed here.

A step that torch or ONNX Runtime cannot run on the client's model fails with `<method>_failed`
(e.g. `prune_failed`); those are listed per method from the method registry.
"""

from __future__ import annotations

# HTTP errors (4xx/5xx answers), by the status they come with.
API_CODES: dict[str, str] = {
    "unauthorized": "401: missing or unknown API key",
    "not_found": "404: unknown id, or another tenant's",
    "conflict": "409: the request conflicts with the resource's state (e.g. cancelling a finished job)",
    "idempotency_key_reused": "409: the Idempotency-Key was used with a different request body",
    "payload_too_large": "413: the body or upload exceeds the configured limit",
    "invalid_input": "422: a bad request (the message says what)",
    "invalid_request": "422: the body or query does not match the schema; `message` summarises (field, what was wrong, the closest known field), `detail` lists every violation",
    "invalid_model": "422: the upload is not a valid ONNX model",
    "model_not_runnable": "422: ONNX Runtime cannot load or run the model",
    "model_too_large": "422: the model needs more memory than the check allows, or is over the size limit",
    "model_crashed": "422: checking the model crashed the checker process",
    "model_check_timeout": "422: checking the model took longer than allowed",
    "unsupported_input_type": "422: the model has an input type the service cannot feed",
    "unsupported_format": "422: not ONNX (e.g. a PyTorch archive, refused because loading it runs code)",
    "pickled_weights": "422: a checkpoint with pickle-based weights (pytorch_model.bin, .pt): loading them runs code",
    "code_not_allowed": "422: a checkpoint with code files or a config asking for remote code (auto_map)",
    "invalid_checkpoint": "422: a checkpoint whose config, index or safetensors headers are inconsistent or out of bounds",
    "unsupported_architecture": "422: a checkpoint architecture the LLM export cannot handle (the supported ones listed)",
    "tokenizer_missing": "422: a checkpoint without tokenizer files",
    "unsafe_archive": "422: a zipped upload with paths, links, sizes or members that are not allowed",
    "external_data_not_supported": "422: external data that is not inside the uploaded archive",
    "invalid_text": "422: a text dataset that is not UTF-8, holds NUL bytes or malformed .jsonl lines, or no text",
    "labels_out_of_range": "422: dataset labels outside the model's classes",
    "invalid_student": "422: the distillation student does not fit the teacher",
    "invalid_webhook": "422: the webhook URL is not an http(s) URL the service may call",
    "webhook_host_not_allowed": "422: the webhook host resolves to a private or disallowed address",
    "limit_too_high": "422: a job limit above the service's cap",
    "quota_exceeded": "429: the tenant has as many queued/running jobs as allowed",
    "too_many_streams": "429: too many open event streams",
    "service_unavailable": "503: a dependency (database, broker) is unreachable",
    "broker_unavailable": "503: the job was stored but the broker could not be reached",
    "check_queue_full": "503: too many uploads are being checked; retry after the Retry-After delay",
    "storage_quota_exceeded": "507: the tenant's stored models and datasets are at their cap",
    "internal_error": "500: a fault of the service (never for something a client sent)",
    "method_not_allowed": "405: the path does not take this HTTP method",
    "http_error": "another HTTP error from the framework (the status says which)",
    "presigned_unavailable": "a presigned download URL was asked of a service that keeps artifacts on disk",
}

# Job failures: job.error.code of a failed or cancelled job.
JOB_CODES: dict[str, str] = {
    "job_failed": "the job failed (generic)",
    "compression_failed": "a method could not do its work (generic)",
    "cancelled": "the user cancelled the job",
    "timed_out": "the job ran longer than its time limit",
    "resource_limit": "the job used more memory than its limit",
    "job_crashed": "the job's process ended abnormally",
    "worker_lost": "the workers running the job stopped too many times",
    "input_deleted": "the model or dataset was deleted before the job ran",
    "dataset_required": "the step needs the job's dataset",
    "labels_required": "the step needs labels in the dataset",
    "invalid_output": "the compressed model failed validation",
    "non_finite": "the compressed model answers NaN or infinity where the original did not",
    "llm_export_failed": "the checkpoint could not be exported to an ONNX Runtime GenAI decoder (the builder's last message)",
    "export_failed": "the trained model could not be written back to ONNX",
    "unsupported_operator": "the model uses operators the trainable converter does not support (all listed)",
    "conversion_mismatch": "the converted model disagrees with ONNX Runtime (the first diverging node named)",
    "unknown_layer": "a layer named in the step does not exist (the model's layers listed)",
    "invalid_hint": "a distillation hint names a layer that does not exist",
    "accuracy_budget_exceeded": "pruning could not stay within max_accuracy_drop",
    "structured_pruning_unsupported": "structured pruning cannot narrow this architecture's layers",
    "structured_pruning_failed": "torch-pruning could not prune this graph",
    "importance_unsupported": "the chosen pruning importance cannot be measured on this model's outputs (Taylor on embeddings)",
    "head_pruning_unsupported": "no attention heads can be removed from this graph (separate query/key/value projections are needed)",
    "nothing_to_cluster": "no layer large enough to cluster",
    "nothing_to_prune": "no MatMul/Gemm/Conv weight to prune",
    "nothing_to_quantize": "nothing in the model the chosen quantization applies to",
    "nothing_to_fuse": "ONNX Runtime's transformer optimizer fused nothing (a fusion candidate only)",
    "quantization_target_missed": "no quantization candidate met the quality target (the candidate table in the message)",
    "search_target_missed": "no candidate of a search met its constraint (the closest candidates in the message and in `closest`)",
    "search_no_candidates": "a search's `methods` left no recipe to try",
    "quantize_failed": "no quantization candidate could be built or run",
    "bundle_mismatch": "the Huffman bundle does not decode to the model",
    "nothing_to_factorise": "no layer gets smaller when factorised at that rank",
    "nothing_to_replace": "no standard K x K convolution to make depthwise-separable",
    "not_a_classifier": "the method needs a classifier's [batch, classes] logits",
    "too_large_for_method": "the step cannot work on a model over 2 GB (it needs the model as one protobuf message); quantize can",
    "nothing_to_exit": "no layer early enough for an exit",
    "early_exit_target_missed": "no confidence threshold keeps the accuracy within budget while samples exit early",
}


def all_codes(method_names: list[str]) -> dict[str, str]:
    """Every code with its meaning, including `<method>_failed` for each method."""
    failed = {f"{name}_failed": f"the {name} step could not process this model (what torch or ONNX Runtime refused, host paths cut)"
              for name in method_names}
    return {**API_CODES, **JOB_CODES, **failed}
