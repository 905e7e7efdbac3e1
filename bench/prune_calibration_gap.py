"""How much of one-shot pruning's quality holds beyond the calibration data: all-MiniLM-L6-v2 (real
weights) pruned 50% unstructured with no fine-tuning, by magnitude (no data), Wanda and SparseGPT (the
default: second-order updates, each layer's sparsity measured, the kept weights and bias re-solved; with and without each layer's fit weighed by the output's sensitivity, the mask chosen in one pass or in rounds), each scored
as cosine to the original's sentence embeddings on the 300 calibration sentences the step saw and on 100
held-out ones (the same sentences as bench/real_models.py).

    python -m bench.prune_calibration_gap [--sentences 1300] [--methods sparsegpt] [--results NAME]

`--sentences` calibrates on more real sentences (the first 300 and more after the held-out 100): how
much of the gap is the calibration set's size.

Prints a table and writes bench/results/prune_calibration_gap.json. A method whose calibration score
is far above its held-out score fitted the calibration sentences rather than the model (issue 25:
50% one-shot at 0.97 held out)."""

from __future__ import annotations

import io
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

from bench.common import report
from bench.real_models import minilm

ROWS = [("magnitude (l1)", "l1", "layer", {}), ("wanda", "wanda", "layer", {}),
        ("sparsegpt, every position alike (output_weighted false)", "sparsegpt", "global", {"output_weighted": False}),
        ("sparsegpt, output-weighted, mask in one pass (mask_rounds 1)", "sparsegpt", "global", {"mask_rounds": 1}),
        ("sparsegpt (default: output-weighted, mask in 3 rounds)", "sparsegpt", "global", {})]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=300, help="calibration sentences (300: the bench's)")
    parser.add_argument("--methods", default=",".join(dict.fromkeys(row[1] for row in ROWS)), help="importances to run, comma-separated")
    parser.add_argument("--results", help="the JSON's name in bench/results (default prune_calibration_gap[_N])")
    args = parser.parse_args()
    from service.core.specs import PruneStep
    from workers.methods import prune
    from workers.steps import StepContext, StepData
    from workers.trainable.training import score

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="prune-gap-"))
    exp, train, held_out = minilm("torchscript", work, calibration=args.sentences)
    arrays = lambda blob: dict(np.load(io.BytesIO(blob)))  # noqa: E731
    data = StepData(inputs=arrays(train), evaluation=StepData(inputs=arrays(held_out)))
    model = onnx.load(str(exp.path))
    # The step takes its Hessians on at most CALIBRATION_SAMPLES samples: all of them here, to see what more data does.
    prune.CALIBRATION_SAMPLES = max(prune.CALIBRATION_SAMPLES, args.sentences)
    rows = []
    for label, importance, scope, options in [row for row in ROWS if row[1] in args.methods.split(",")]:
        started = time.perf_counter()
        spec = PruneStep(kind="unstructured", amount=0.5, importance=importance, scope=scope, finetune_epochs=0, **options)
        run = prune._Run(model, spec, data, StepContext(work_dir=work))
        prune._unstructured(run)
        calibration = score(run.module, run.inputs, None, run.teacher, run.kind)
        held = run.quality()
        rows.append([label, calibration, held, calibration - held, round(time.perf_counter() - started, 1)])
        print(*rows[-1], flush=True)
    report(args.results or "prune_calibration_gap" + (f"_{args.sentences}" if args.sentences != 300 else ""),
           f"MiniLM 50% unstructured, one-shot, {args.sentences} calibration sentences: cosine on them and on 100 held-out ones",
           ["method", "calibration cosine", "held-out cosine", "gap", "seconds"], rows, {"calibration_sentences": args.sentences})


if __name__ == "__main__":
    main()
