"""Distillation through the HTTP API on real MNIST: LeNet-300-100 teacher -> a derived student with
a quarter of its parameters, with labels (and the from-scratch baseline) and without labels."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.common import report, running_service
from bench.pruning_mnist import run_job
from service.client import Client
from tests import mnist


def main() -> None:
    files = mnist.write_files(Path(tempfile.mkdtemp()), unlabelled=True)
    step = {"method": "distill", "student": {"kind": "width", "width": 0.25}, "epochs": 10, "training": {"lr": 2e-3, "batch_size": 128}}
    env = {"MODELSHRINK_MAX_DATASET_DECOMPRESSED_BYTES": str(2 * 1024**3)}
    with running_service(env) as svc:
        client = Client(svc["url"], svc["key"], timeout=600)
        labelled = run_job(client, files["lenet"], files["train"], files["test"], {**step, "compare_baseline": True})
        unlabelled = run_job(client, files["lenet"], files["train_unlabelled"], files["test"], step)
    rows = []
    for name, job in (("distilled, labels (alpha 0.5, T 4)", labelled), ("distilled, no labels (soft targets only)", unlabelled)):
        m, r = job["metrics"], job["metrics"]["step_reports"][0]
        rows.append([name, f"{100 * (1 - m['original']['accuracy']):.2f}", f"{100 * (1 - m['compressed']['accuracy']):.2f}",
                     f"{r['teacher_parameters']} -> {r['student_parameters']}", m["compression_ratio"],
                     m["compressed"]["fidelity"]["top1_agreement"], m["speedup"], job["wall_s"]])
    baseline = labelled["metrics"]["step_reports"][0]["baseline_from_scratch"]["score"]
    rows.append(["same student from scratch, labels only", "", f"{100 * (1 - baseline):.2f}", "", "", "", "", ""])
    report("distill_mnist", "Distillation of LeNet-300-100 on MNIST through the HTTP API (test split)",
           ["student", "teacher error %", "student error %", "parameters", "size ratio", "agreement", "speedup b1", "job s"], rows,
           {"labelled": labelled["metrics"], "unlabelled": unlabelled["metrics"],
            "unlabelled_over_labelled_accuracy": unlabelled["metrics"]["compressed"]["accuracy"] / labelled["metrics"]["compressed"]["accuracy"]})


if __name__ == "__main__":
    main()
