"""distill: knowledge distillation of the uploaded model (teacher) into a smaller student, uploaded
or derived; optionally also the same student trained from scratch, to show what distillation bought."""

from __future__ import annotations

import copy
from typing import Any

import onnx
import torch
from torch import nn

from service.core.errors import CompressionFailed, InvalidInput
from service.core.specs import DistillStep
from workers.distillation import students
from workers.fixed_batch import exactly
from workers.distillation.trainer import Data, distill, output_kind
from workers.data import token_vocabularies
from workers.distillation.transformer_depth import drop_in_graph
from workers.steps import StepContext, StepData, StepResult
from workers.trainable.device import training_device
from workers.trainable.from_onnx import OnnxGraphModule, to_torch
from workers.trainable.to_onnx import export, has_dynamic_batch
from workers.trainable.training import predict, quality, reference_outputs, tensors
from workers.trainable.verify import trainable
from workers.trainable.write_back import trained_onnx

name = "distill"
SPEC = DistillStep


def _student(teacher: OnnxGraphModule, spec: DistillStep, example: tuple[torch.Tensor, ...], ctx: StepContext,
             probe: tuple[torch.Tensor, ...]) -> tuple[OnnxGraphModule, dict[str, Any]]:
    if spec.student_model_id:
        if ctx.load_model is None:
            raise CompressionFailed("uploaded students are not available in this context", code="invalid_student")
        student = to_torch(ctx.load_model(spec.student_model_id))
        if len(student.input_names) != len(teacher.input_names):  # the API already compared names and shapes
            raise InvalidInput("the student model's inputs do not match the teacher's", code="invalid_student")
        with torch.no_grad():
            s_out, t_out = student(*example), teacher(*example)
        s_out = s_out[0] if isinstance(s_out, tuple) else s_out
        t_out = t_out[0] if isinstance(t_out, tuple) else t_out
        if s_out.shape != t_out.shape:
            raise InvalidInput(f"the student's output shape {list(s_out.shape)} does not match the teacher's {list(t_out.shape)}", code="invalid_student")
        return student, {"kind": "uploaded", "model_id": spec.student_model_id}
    kind = spec.student.kind
    if kind == "width":
        return students.by_width(teacher, spec.student.width, example), {"kind": "width", "width": spec.student.width}
    if kind == "depth":
        student, dropped = students.by_depth(teacher, spec.student, probe)
        return student, {"kind": "depth", "dropped_layers": dropped}
    student, ranks = students.by_low_rank(teacher, spec.student)
    return student, {"kind": "low_rank", "ranks": ranks}


def _hint_pairs(teacher: OnnxGraphModule, student: OnnxGraphModule, spec: DistillStep, inputs: list[torch.Tensor]) -> list:
    if not spec.hints:
        return []
    t_layers = {teacher.layer_names[k]: m for k, m in teacher.layers.items()}
    s_layers = {student.layer_names[k]: m for k, m in student.layers.items()}
    pairs = []
    for hint in spec.hints:
        if hint.teacher_layer not in t_layers or hint.student_layer not in s_layers:
            raise InvalidInput(f"hint layers must exist: teacher has {sorted(t_layers)}, student has {sorted(s_layers)}", code="invalid_hint")
        captured = []
        handle = t_layers[hint.teacher_layer].register_forward_hook(lambda _m, _i, out, sink=captured: sink.append(out.detach()))
        predict(teacher, inputs)
        handle.remove()
        # predict's fixed-batch filler rows come last: cut back to one row per sample.
        pairs.append((t_layers[hint.teacher_layer], s_layers[hint.student_layer], torch.cat(captured)[: len(inputs[0])]))
    return pairs


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def apply(model: onnx.ModelProto, spec: DistillStep, data: StepData, ctx: StepContext) -> StepResult:
    if not data.available:
        raise CompressionFailed("distillation trains on data: submit the job with a dataset_id (labels optional)", code="dataset_required")
    if spec.compare_baseline and data.labels is None:
        raise CompressionFailed("compare_baseline trains a student on hard labels: the dataset needs a 'labels' array", code="labels_required")
    ctx.progress(0.0, "converting the teacher to a trainable form")
    teacher = trainable(model, data)
    names = teacher.input_names
    held_out = data.evaluation or data
    train_inputs, eval_inputs = tensors(data, names), tensors(held_out, names)

    few = predict(teacher, [x[: data.fixed_batch or 4] for x in train_inputs])
    kind = output_kind(few, set(token_vocabularies(model).values()), teacher.output_names[0], data.labels is not None)
    teacher_train = reference_outputs(teacher, train_inputs, kind, spec.temperature)
    if kind != "classifier" and spec.compare_baseline:
        raise CompressionFailed("compare_baseline trains on class labels: the model's output is not [batch, classes] logits", code="labels_required")
    labels = data.labels if kind == "classifier" else None  # labels are class indices: meaningless for other outputs
    train = Data(train_inputs, labels, teacher_train, kind)
    validation = Data(eval_inputs, held_out.labels if kind == "classifier" else None,
                      teacher_train if data.evaluation is None else reference_outputs(teacher, eval_inputs, kind, spec.temperature), kind)
    metric = "accuracy" if validation.labels is not None else ("agreement_with_teacher" if kind == "classifier" else "cosine_to_teacher")
    teacher_score = quality(validation.teacher, validation.labels, validation.teacher, kind)

    example = tuple(exactly(x, data.fixed_batch) if data.fixed_batch else x[:2] for x in train_inputs)
    # Residual blocks are chosen by what skipping each costs on a slice of the data.
    probe = tuple(exactly(x, data.fixed_batch) if data.fixed_batch else x[:32] for x in train_inputs)
    student, derivation = _student(teacher, spec, example, ctx, probe)
    scratch = copy.deepcopy(student) if spec.compare_baseline else None
    hint_pairs = _hint_pairs(teacher, student, spec, train_inputs)
    share = 0.45 if spec.compare_baseline else 0.9

    def on_epoch(epoch: int, record: dict) -> None:
        ctx.progress(0.05 + share * (epoch + 1) / spec.epochs, f"distilling: epoch {epoch + 1}/{spec.epochs}, loss {record['loss']:.4f}, validation {metric} {record['validation']:.4f}", milestone=True)

    history = distill(student, train, validation, spec, on_epoch, hint_pairs)
    report: dict[str, Any] = {
        "student": derivation,
        "device": str(training_device()),
        "teacher_architecture": students.architecture(teacher),
        "student_architecture": students.architecture(student),
        "teacher_parameters": _params(teacher),
        "student_parameters": _params(student),
        "temperature": spec.temperature,
        "output_kind": kind,
        "loss": {"classifier": "KL(soft targets at T) x T^2, mixed with cross-entropy on labels by alpha",
                 "token_logits": "KL at every position (soft targets at T) x T^2",
                 "features": "1 - cosine + MSE per vector"}[kind],
        "alpha": spec.alpha if labels is not None else 0.0,
        "labels_used": labels is not None,
        "quality_metric": metric,
        "evaluated_on": "evaluation data" if data.evaluation else "training data (no evaluation dataset)",
        "teacher_score": teacher_score,
        "student_score": history.best_score,
        "best_epoch": history.best_epoch,
        "stopped_early": history.stopped_early,
        "curve": history.epochs,
    }
    if scratch is not None:
        students.reinitialise(scratch, spec.training.seed)

        def on_baseline_epoch(epoch: int, record: dict) -> None:
            ctx.progress(0.5 + 0.45 * (epoch + 1) / spec.epochs, f"baseline from scratch: epoch {epoch + 1}/{spec.epochs}, validation {metric} {record['validation']:.4f}", milestone=True)

        baseline = distill(scratch, train, validation, spec, on_baseline_epoch, hard_labels_only=True)
        report["baseline_from_scratch"] = {"score": baseline.best_score, "best_epoch": baseline.best_epoch, "curve": baseline.epochs}
        report["distillation_gain"] = history.best_score - baseline.best_score
    ctx.progress(0.97, "exporting the student to ONNX", milestone=True)
    # A narrowed or factorised copy of the teacher goes back into the user's graph; an uploaded
    # student or a depth student is exported.
    # A transformer depth student goes back into the user's graph with the same blocks dropped there.
    aliases = getattr(student, "block_aliases", None)
    target = drop_in_graph(model, aliases) if aliases else model
    result = trained_onnx(target, student, example, lambda: export(student, example, teacher.input_names, teacher.output_names, has_dynamic_batch(model)))
    return StepResult(model=result, report=report)
