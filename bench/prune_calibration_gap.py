"""How much of one-shot pruning's quality holds beyond the calibration data: all-MiniLM-L6-v2 (real
weights) pruned 50% unstructured with no fine-tuning, by magnitude (no data), Wanda and SparseGPT (the
default: second-order updates, each layer's sparsity measured, the kept weights re-solved), each scored
as cosine to the original's sentence embeddings on the 300 calibration sentences the step saw and on 100
held-out ones (the same sentences as bench/real_models.py).

    python -m bench.prune_calibration_gap

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

ROWS = [("magnitude (l1)", "l1", "layer"), ("wanda", "wanda", "layer"), ("sparsegpt (default)", "sparsegpt", "global")]


def main() -> None:
    from service.core.specs import PruneStep
    from workers.methods import prune
    from workers.steps import StepContext, StepData
    from workers.trainable.training import score

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="prune-gap-"))
    exp, train, held_out = minilm("torchscript", work)
    arrays = lambda blob: dict(np.load(io.BytesIO(blob)))  # noqa: E731
    data = StepData(inputs=arrays(train), evaluation=StepData(inputs=arrays(held_out)))
    model = onnx.load(str(exp.path))
    rows = []
    for label, importance, scope in ROWS:
        started = time.perf_counter()
        spec = PruneStep(kind="unstructured", amount=0.5, importance=importance, scope=scope, finetune_epochs=0)
        run = prune._Run(model, spec, data, StepContext(work_dir=work))
        prune._unstructured(run)
        calibration = score(run.module, run.inputs, None, run.teacher, run.kind)
        held = run.quality()
        rows.append([label, calibration, held, calibration - held, round(time.perf_counter() - started, 1)])
        print(*rows[-1], flush=True)
    report("prune_calibration_gap", "MiniLM 50% unstructured, one-shot: cosine on the calibration sentences and on held-out ones",
           ["method", "calibration cosine", "held-out cosine", "gap", "seconds"], rows, {})


if __name__ == "__main__":
    main()
