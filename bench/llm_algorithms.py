"""int4 algorithms side by side on a real decoder, every one from the same Hessians and scored on the
same held-out text: SmolLM2-135M (bench/llm.py's weights: `offgrid`, and `shipped`), every weight in
int4 blocks of 32 with the tied lm_head and table in int4 (the job's int4_weight_only defaults except
the algorithm): round-to-nearest, GPTQ (act order), AWQ (activation-aware scales, then rounding), and
AWQ's scales followed by GPTQ. Calibration: 8,192 tokens of stdlib docstrings joined as the job
joins them; evaluation: 4,096 tokens of other modules' docstrings in 512-token windows.

    python -m bench.llm_algorithms [--variants offgrid,shipped] [--algorithms rtn,gptq,awq,awq+gptq]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from bench.common import report
from bench.llm import builder, checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="offgrid,shipped")
    parser.add_argument("--algorithms", default="rtn,gptq,awq,awq+gptq")
    args = parser.parse_args()
    import onnx
    import onnxruntime_genai as og

    from workers.llm import awq, calibration, decoder, text, weight_quant
    from workers.llm.export import folder_bytes
    from workers.llm.pipeline import _folder_with
    from workers.quantization import int4

    rows = []
    for variant in args.variants.split(","):
        work = Path("/tmp/modelshrink-bench-llm/algorithms") / variant
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        fp32 = work / "fp32"
        builder(checkpoint(variant), fp32, "fp32")
        head = decoder.head_size(fp32)
        tokenizer = og.Tokenizer(og.Model(str(fp32)))
        separators = text.document_separators(fp32, 2)
        cal = text.to_windows(text.builtin_documents(text.CALIBRATION_MODULES), tokenizer.encode, text.calibration_separator(separators), 512, 8192)
        ev = text.to_windows(text.builtin_documents(text.EVALUATION_MODULES), tokenizer.encode, separators, 512, 4096)
        model = onnx.load(str(fp32 / "model.onnx"))
        reference = decoder.score(decoder.session(fp32, 2), ev, head)
        start = time.perf_counter()
        hessians = calibration.hessians(model, cal, head, work / "augmented", 2)
        hessian_s = time.perf_counter() - start
        lm_head = next(n.name for n in calibration.weight_matmuls(model) if "lm_head" in n.name)
        for algorithm in args.algorithms.split(","):
            start = time.perf_counter()
            plan = weight_quant.Plan(algorithm=algorithm)
            plan.bits[lm_head] = 4
            if algorithm == "awq+gptq":  # AWQ's scales on the folded graph, then GPTQ on the scaled weights and Hessians
                folded, tied = int4.fold_weights(model)
                scaled, _ = awq.apply(folded, hessians, plan.bits_of, plan.block_size, plan.symmetric, keep=set(tied))
                plan.algorithm = "gptq"
                quantized, _ = weight_quant.quantize(folded, plan, scaled)
            else:
                quantized, _ = weight_quant.quantize(model, plan, hessians)
            seconds = time.perf_counter() - start
            folder = _folder_with(fp32, quantized, work / algorithm.replace("+", "-"))
            scored = decoder.score(decoder.session(folder, 2), ev, head)
            rows.append([variant, algorithm, round(folder_bytes(folder) / 1e6, 1), round(scored.perplexity, 3),
                         round(100 * (scored.perplexity / reference.perplexity - 1), 1), round(scored.agreement(reference), 4), round(seconds + hessian_s)])
            print(rows[-1], flush=True)
            shutil.rmtree(folder, ignore_errors=True)
        rows.append([variant, "fp32 (reference)", round(folder_bytes(fp32) / 1e6, 1), round(reference.perplexity, 3), 0.0, 1.0, 0])
    report("llm_algorithms", "SmolLM2-135M int4 (block 32, tied lm_head in int4): algorithms from the same Hessians, held-out perplexity",
           ["weights", "algorithm", "MB", "perplexity", "increase %", "next-token agreement", "seconds (with the Hessian pass)"], rows,
           {"date": time.strftime("%Y-%m-%d"), "calibration_tokens": 8192, "eval_tokens": 4096, "window": 512})


if __name__ == "__main__":
    main()
