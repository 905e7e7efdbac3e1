"""`python -m workers.llm.runtime_probe FOLDER REQUEST.json`: load a GenAI model folder in
onnxruntime-genai, as a user would, and measure it in a process of its own (so its peak memory is
its own): greedy generations of the prompts, prefill latency at the given prompt lengths, decode
tokens/s at batch 1. Prints one JSON object."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _generator(og, model, length: int, min_length: int = 0):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, min_length=min_length, do_sample=False, batch_size=1)
    return og.Generator(model, params)


def measure(folder: Path, request: dict) -> dict:
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    context = int(request["context_length"])
    new_tokens = int(request.get("new_tokens", 32))
    generations = []
    for prompt in request["prompts"]:
        ids = list(tokenizer.encode(prompt))[: context - new_tokens]
        generator = _generator(og, model, len(ids) + new_tokens, len(ids) + new_tokens)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        tokens = [int(t) for t in generator.get_sequence(0)][len(ids):]
        generations.append({"prompt": prompt, "tokens": tokens, "text": tokenizer.decode(tokens)})
        del generator
    prefill = []
    filler = [int(t) for t in request["filler_ids"]]
    for length in request["prefill_lengths"]:
        if length + 1 > context or length > len(filler):
            continue
        times = []
        for _ in range(int(request.get("repeats", 3))):
            generator = _generator(og, model, length + 1)
            start = time.perf_counter()
            generator.append_tokens(filler[:length])
            times.append((time.perf_counter() - start) * 1000)
            del generator
        prefill.append({"prompt_tokens": length, "ms": round(statistics.median(times), 3)})
    decode_tokens = min(int(request.get("decode_tokens", 64)), context - 16)
    speeds = []
    for _ in range(int(request.get("repeats", 3))):
        prompt = filler[:16]
        generator = _generator(og, model, len(prompt) + decode_tokens, len(prompt) + decode_tokens)
        generator.append_tokens(prompt)
        generator.generate_next_token()  # the first token comes with the prefill; decoding is what follows
        start, produced = time.perf_counter(), 0
        while not generator.is_done():
            generator.generate_next_token()
            produced += 1
        speeds.append(produced / max(time.perf_counter() - start, 1e-9))
        del generator
    return {"generations": generations, "prefill": prefill, "decode_tokens_per_s": round(statistics.median(speeds), 3), "peak_memory_bytes": _peak_rss()}


def main() -> None:
    folder, request = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    os.environ.setdefault("OMP_NUM_THREADS", str(request.get("threads", 1)))
    print(json.dumps(measure(folder, request)))


if __name__ == "__main__":
    main()
