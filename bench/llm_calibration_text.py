"""How the calibration text's document separator moves int4 GPTQ on a real decoder: SmolLM2-135M
off its 4-bit grid (bench/llm.py's `offgrid` weights), int4 defaults (GPTQ, act order, tied lm_head
in int4), calibrated on 8,192 tokens of stdlib docstrings joined by each separator choice, measured
on 4,096 held-out tokens joined by <|endoftext|> (0) and by <|im_end|> (2, the config's eos).

    python -m bench.llm_calibration_text [--choices eot,eos,both,none]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from bench.common import report
from bench.llm import builder, checkpoint

CHOICES = {"eos": [2], "eot": [0], "both": [2, 0], "none": None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--choices", default="eot,eos,both,none")
    args = parser.parse_args()
    import onnx
    import onnxruntime_genai as og

    from workers.llm import calibration, decoder, text, weight_quant
    from workers.llm.pipeline import _folder_with

    work = Path("/tmp/modelshrink-bench-llm/calibration-text")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fp32 = work / "fp32"
    builder(checkpoint("offgrid"), fp32, "fp32")
    head = decoder.head_size(fp32)
    tokenizer = og.Tokenizer(og.Model(str(fp32)))
    held_out = text.builtin_documents(text.EVALUATION_MODULES)
    evals = {token: text.to_windows(held_out, tokenizer.encode, token, 512, 4096) for token in (0, 2)}
    model = onnx.load(str(fp32 / "model.onnx"))
    original = decoder.session(fp32, 2)
    reference = {token: decoder.score(original, windows, head) for token, windows in evals.items()}
    lm_head = next(n.name for n in calibration.weight_matmuls(model) if "lm_head" in n.name)
    rows = []
    for choice in args.choices.split(","):
        start = time.perf_counter()
        cal = text.to_windows(text.builtin_documents(text.CALIBRATION_MODULES), tokenizer.encode, CHOICES[choice], 512, 8192)
        plan = weight_quant.Plan()
        plan.bits[lm_head] = 4
        quantized, _ = weight_quant.quantize(model, plan, calibration.hessians(model, cal, head, work / "augmented", 2))
        session = decoder.session(_folder_with(fp32, quantized, work / "int4"), 2)
        increase = {token: 100 * (decoder.score(session, windows, head).perplexity / reference[token].perplexity - 1) for token, windows in evals.items()}
        rows.append([choice, str(CHOICES[choice]), round(increase[0], 1), round(increase[2], 1), round(time.perf_counter() - start)])
        print(rows[-1], flush=True)
    report("llm_calibration_text", "SmolLM2-135M off grid, int4 GPTQ: perplexity increase by calibration separator",
           ["calibration joins documents with", "token ids", "increase % on text joined by 0", "increase % on text joined by 2", "seconds"], rows,
           {"date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
