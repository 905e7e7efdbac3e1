"""cluster: Deep Compression's weight sharing. Each layer's weights are replaced by the nearest of
2^bits shared values (1-D k-means; a pruned layer keeps its zeros as a reserved zero centroid),
the centroids are optionally fine-tuned with the gradients of their weights summed (Han et al.),
and the ONNX file stores the codebook plus bit-packed indices."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn.utils import parametrize

from service.core.errors import CompressionFailed
from service.core.specs import ClusterStep
from workers.layer_names import require_known
from workers.clustering import bit_allocation, error_feedback, storage
from workers.clustering.kmeans import kmeans_1d
from workers.hessian import Batch, error_to_reference, statistics, supported
from workers.steps import StepContext, StepData, StepResult
from workers.onnx_weights import as_rows, from_rows, weight_layers
from workers.pruning.layers import weighted_layers
from workers.trainable.device import training_device
from workers.trainable.to_onnx import example_input, export, has_dynamic_batch
from workers.trainable.run import TrainableRun
from workers.trainable.write_back import trained_onnx
from workers.trainable.training import finetune_epochs

name = "cluster"
SPEC = ClusterStep
CALIBRATION_SAMPLES = 512  # samples a layer's input Hessian is taken on (gptq assignment)
SPARSE_LAYER = 0.1  # a layer with more zeros than this was pruned: its zeros keep a centroid of their own
SENSITIVITY_SAMPLES = 32  # samples each layer's cost at a number of bits is measured on (bit allocation)


class SharedWeight(nn.Module):
    """Parametrization weight = codebook[labels]: autograd sums each cluster's weight gradients into its centroid."""

    def __init__(self, codebook: np.ndarray, labels: np.ndarray, fixed_zero: bool) -> None:
        super().__init__()
        self.codebook = nn.Parameter(torch.from_numpy(codebook.copy()))
        self.register_buffer("labels", torch.from_numpy(labels.astype(np.int64)))
        self.fixed_zero = fixed_zero

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return self.codebook[self.labels]

    @torch.no_grad()
    def keep_zero(self) -> None:
        if self.fixed_zero:
            self.codebook[0] = 0.0


def _cluster_layer(weight: np.ndarray, bits: int, init: str, seed: int, group_size: int | None = None) -> storage.Clustered:
    """`weight` with its output channels first (torch's layout)."""
    flat = weight.ravel()
    zeros = flat == 0
    if zeros.mean() > SPARSE_LAYER:
        centroids, labels_nz = kmeans_1d(flat[~zeros], 2**bits - 1, init, seed=seed)
        labels = np.zeros(flat.shape, np.int64)
        labels[~zeros] = labels_nz + 1
        codebook = np.concatenate([[0.0], centroids]).astype(np.float32)
        return storage.Clustered(codebook, labels.reshape(weight.shape), bits, sparse=True)
    if group_size and weight.ndim >= 2 and weight.shape[0] > group_size:
        return _cluster_groups(weight, bits, init, seed, group_size)
    codebook, labels = kmeans_1d(flat, 2**bits, init, seed=seed)
    return storage.Clustered(codebook, labels.reshape(weight.shape), bits, sparse=False)


def _cluster_groups(weight: np.ndarray, bits: int, init: str, seed: int, group_size: int) -> storage.Clustered:
    """A codebook per `group_size` consecutive rows (output channels), concatenated: labels index the
    whole array, so training (SharedWeight) and decoding treat it as one codebook."""
    k = 2**bits
    rows = weight.reshape(weight.shape[0], -1)
    labels = np.empty(rows.shape, np.int64)
    codebooks = []
    for group, start in enumerate(range(0, rows.shape[0], group_size)):
        block = rows[start:start + group_size]
        centroids, local = kmeans_1d(block.ravel(), k, init, seed=seed + group)
        # A group with fewer distinct values than k gets fewer centroids: pad so offsets stay group * k.
        codebooks.append(np.pad(centroids, (0, k - len(centroids)), mode="edge"))
        labels[start:start + group_size] = local.reshape(block.shape) + group * k
    return storage.Clustered(np.concatenate(codebooks).astype(np.float32), labels.reshape(weight.shape), bits, sparse=False)


def _assign_with_feedback(layer: nn.Module, clustered: storage.Clustered, group_size: int | None, batches: list[Batch],
                          module: nn.Module, reference: nn.Module, reference_layer: nn.Module) -> tuple[storage.Clustered, dict[str, float]]:
    """The layer's weights snapped to its k-means codebooks with GPTQ's error feedback on the layer's
    input Hessian, so the layer's output on the input it now gets (through the layers already
    clustered) moves least, then the codebooks re-solved by least squares for those assignments
    (workers/clustering/error_feedback.py). Errors are against the unclustered model's layer output:
    nearest centroid, gptq assignment, and after the codebook refit."""
    weight = layer.weight.detach()
    rows = weight.reshape(weight.shape[0], -1).double()
    k = 2 ** clustered.bits
    grouped = bool(group_size) and weight.dim() >= 2 and weight.shape[0] > group_size  # as _cluster_layer chose
    # Grouped codebooks are padded to k each; a single one may have fewer centroids (few distinct values).
    books = torch.from_numpy(clustered.codebook).reshape(-1, k) if grouped else torch.from_numpy(clustered.codebook)[None, :]
    group = torch.arange(rows.shape[0]) // group_size if grouped else torch.zeros(rows.shape[0], dtype=torch.long)
    stats = statistics(module, layer, batches, reference, reference_layer)
    target = rows  # the layer's own dense output on the input it now gets (why not the original's: hessian.LayerStatistics)
    local, _ = error_feedback.assign(target, books[group], stats.h)
    refitted = error_feedback.refit_codebooks(target, local, books, group, stats.h)
    labels = (local + group[:, None] * k if grouped else local).reshape(weight.shape).numpy()
    books64 = books.double()
    nearest = books64[group].gather(1, error_feedback.nearest(rows, books64[group]))  # a column at a time: rows x k in memory
    errors = {"output_error_nearest": round(error_to_reference(nearest, rows, stats), 6),
              "output_error_assigned": round(error_to_reference(books64[group].gather(1, local), rows, stats), 6),
              "output_error": round(error_to_reference(refitted.double()[group].gather(1, local), rows, stats), 6)}
    codebook = refitted.reshape(-1).numpy().astype(np.float32) if grouped else refitted[0].numpy().astype(np.float32)
    return storage.Clustered(codebook, labels, clustered.bits, sparse=False), errors


def _embedding_tables(model: onnx.ModelProto) -> set[str]:
    """Initializers read as a Gather's data (float): embedding tables, named by initializer in `layer_bits` and `skip_layers`."""
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    return {i.name for i in model.graph.initializer if i.name in gathered and i.data_type == onnx.TensorProto.FLOAT}


def _cluster_embeddings(model: onnx.ModelProto, replacements: dict, spec: ClusterStep) -> list[dict[str, Any]]:
    """Embedding tables (the data input of a Gather, float, large enough) as codebook + indices."""
    tables = _embedding_tables(model)
    rows = []
    for index, init in enumerate(model.graph.initializer):
        if init.name not in tables or init.name in replacements:
            continue
        weight = onnx.numpy_helper.to_array(init)
        if weight.size < spec.min_elements or init.name in spec.skip_layers:
            continue
        bits = spec.layer_bits.get(init.name, spec.bits)
        c = _cluster_layer(weight, bits, spec.init, spec.training.seed + 1000 + index, spec.group_size)
        replacements[init.name] = storage.encode(init.name, c, prefix=f"em{index}")
        rows.append({"layer": init.name, "embedding": True, "shape": list(weight.shape), "bits": bits, "centroids": len(c.codebook),
                     "sparse": c.sparse, "stored_bytes": storage.stored_bytes(c) + 4 * len(c.codebook), "dense_bytes": weight.size * 4})
    return rows


NO_CONVERSION = "nothing is trained, so the ONNX weights were clustered where they are stored (no conversion to torch; the graph is otherwise the one uploaded)"


def _cluster_initializers(model: onnx.ModelProto, spec: ClusterStep, ctx: StepContext) -> StepResult:
    """Nothing to train: cluster the ONNX weights directly (any graph ONNX Runtime runs). Weights are
    clustered output channels first, as on the trainable path, so `group_size` groups the same rows."""
    ctx.progress(0.3, "clustering the ONNX weights directly (nothing to train, no conversion needed)")
    layers = weight_layers(model)
    require_known([*spec.skip_layers, *spec.layer_bits], [*layers, *(_embedding_tables(model) if spec.embeddings else ())])
    inits = {i.name: i for i in model.graph.initializer}
    replacements: dict = {}
    rows = []
    for index, (name, layer) in enumerate(layers.items()):
        stored = onnx.numpy_helper.to_array(inits[layer.initializer])
        if stored.size < spec.min_elements or name in spec.skip_layers:
            continue
        c = _cluster_layer(as_rows(stored, layer), spec.layer_bits.get(name, spec.bits), spec.init, spec.training.seed + index, spec.group_size)
        c = storage.Clustered(c.codebook, from_rows(c.labels, layer), c.bits, c.sparse)
        replacements[layer.initializer] = storage.encode(layer.initializer, c, prefix=f"cl{index}")
        rows.append({"layer": name, "initializer": layer.initializer, "shape": list(stored.shape), "bits": c.bits, "centroids": len(c.codebook),
                     "sparse": c.sparse, "stored_bytes": storage.stored_bytes(c) + 4 * len(c.codebook), "dense_bytes": stored.size * 4})
    if spec.embeddings:
        rows += _cluster_embeddings(model, replacements, spec)
    if not rows:
        raise CompressionFailed("no layer is large enough to cluster (see min_elements)", code="nothing_to_cluster")
    return StepResult(model=storage.replace_initializers(model, replacements), report={
        "bits": spec.bits, "init": spec.init, "path": "onnx_initializers", "why_no_conversion": NO_CONVERSION,
        "layers": rows, "quality_before_finetune": None, "quality_after": None, "finetune_epochs": 0,
    })


def _encode_layers(exported: onnx.ModelProto, clustered: dict[str, storage.Clustered]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each clustered layer's weight found in the export (its dense values, maybe transposed) and
    encoded as codebook + packed indices: (initializer replacements, a report row per layer)."""
    replacements, rows = {}, []
    for index, (layer_name, c) in enumerate(clustered.items()):
        dense = c.codebook[c.labels]
        found = storage.find_initializer(exported, dense)
        if found is None:
            raise CompressionFailed(f"could not locate layer {layer_name}'s weight in the exported model", code="export_failed")
        init_name, transposed = found
        if transposed:
            c = storage.Clustered(c.codebook, c.labels.T.copy(), c.bits, c.sparse)
        replacements[init_name] = storage.encode(init_name, c, prefix=f"cl{index}")
        rows.append({"layer": layer_name, "shape": list(dense.shape), "bits": c.bits, "centroids": len(c.codebook),
                     "sparse": c.sparse, "stored_bytes": storage.stored_bytes(c) + 4 * len(c.codebook), "dense_bytes": dense.size * 4})
    return replacements, rows


def _cluster_chosen(run: TrainableRun, chosen: dict[str, nn.Module], spec: ClusterStep, assignment: str,
                    ctx: StepContext) -> tuple[dict[str, SharedWeight], dict[str, dict[str, float]]]:
    """Each chosen layer clustered in turn (gptq assignment where asked) and its weight replaced by
    a parametrization reading its codebook: (the shared weights, each gptq layer's errors)."""
    shared: dict[str, SharedWeight] = {}
    errors: dict[str, dict[str, float]] = {}
    # gptq's layer errors are measured against the unclustered model's outputs.
    reference = copy.deepcopy(run.module).eval() if assignment == "gptq" else None
    reference_layers = weighted_layers(reference) if reference is not None else {}
    for i, (layer_name, layer) in enumerate(chosen.items()):
        clustered = _cluster_layer(layer.weight.detach().numpy(), spec.layer_bits.get(layer_name, spec.bits), spec.init, spec.training.seed + i, spec.group_size)
        if assignment == "gptq" and not clustered.sparse and supported(layer):
            # Taken now: the layers before this one are clustered already (their parametrizations run).
            clustered, errors[layer_name] = _assign_with_feedback(layer, clustered, spec.group_size, run.calibration_batches(CALIBRATION_SAMPLES),
                                                                  run.module, reference, reference_layers[layer_name])
        shared[layer_name] = SharedWeight(clustered.codebook, clustered.labels, clustered.sparse)
        parametrize.register_parametrization(layer, "weight", shared[layer_name], unsafe=True)
        layer.parametrizations.weight.original.requires_grad_(False)
        ctx.progress(0.3 * (i + 1) / len(chosen), f"clustered {layer_name}", milestone=True)
    return shared, errors


def _groups(rows: int, group_size: int | None) -> int:
    return -(-rows // group_size) if group_size and rows > group_size else 1


@dataclass
class MeasuredCosts:
    """Each layer's measured cost at each number of bits (bit_allocation.measure), and the sizes its
    storage cost depends on: enough to say which bits a budget chooses without the model."""

    curves: dict[str, dict[int, float]]
    sizes: dict[str, tuple[int, int]]  # per layer: weights, rows

    def allocate(self, spec: ClusterStep) -> tuple[dict[str, int], dict[str, Any]]:
        """The bits each layer gets under `spec`'s budget, and each layer's storage cost by bits."""
        costs = {n: (lambda b, s=s: bit_allocation.stored_bits(s[0], _groups(s[1], spec.group_size), b)) for n, s in self.sizes.items()}
        return bit_allocation.allocate(self.curves, costs, spec.budget_bits(), bit_allocation.shared_bits), costs


def _layout(spec: ClusterStep) -> tuple:
    """What measured costs depend on besides the layers: a cache key's first part (`measured`)."""
    return spec.bits, spec.group_size, spec.init, spec.training.seed


def planned_bits(measured: dict[tuple, MeasuredCosts], spec: ClusterStep) -> dict[str, int] | None:
    """The bits per layer `apply(..., spec, ..., measured)` would choose, when `measured` already holds
    the costs it would use (same bits, codebook layout, init and seed, one model); None otherwise. Lets
    a caller trying several budgets skip one whose choice it has already clustered."""
    found = [costs for key, costs in measured.items()
             if key[:-1] == _layout(spec) and not set(key[-1]) & set(spec.layer_bits)]
    return found[0].allocate(spec)[0] if len(found) == 1 else None


def _allocated_bits(run: TrainableRun, chosen: dict[str, nn.Module], tables: list[str], spec: ClusterStep,
                    ctx: StepContext, measured: dict[tuple, MeasuredCosts] | None = None) -> tuple[dict[str, int], dict[str, Any] | None]:
    """Each layer's bits (and each embedding table's) from its measured cost, the clusters taking no
    more room than `bits` everywhere (workers/clustering/bit_allocation.py); layers named in
    layer_bits keep theirs. Returns the bits by name and the report's `bit_allocation`. `measured`
    holds curves already measured on this model (by bits, row groups and layers): a caller trying
    several budgets on one model measures once."""
    weights: dict[str, torch.Tensor] = {n: layer.weight for n, layer in chosen.items() if n not in spec.layer_bits}
    for table in tables:
        buffer = run.module.constant(table)
        if table not in spec.layer_bits and buffer is not None and buffer.numel() >= spec.min_elements:
            weights[table] = buffer
    if len(weights) < 2:
        return {}, None
    # A projection tied to a table (GPT-2's output layer reads the token table transposed) is not
    # clustered itself but reads the clustered table: the table is measured through both.
    tied = [layer.weight for layer in weighted_layers(run.module).values() if not layer.weight.requires_grad]

    def entry(index: int, weight: torch.Tensor) -> tuple:
        kept = weight.detach().clone()
        # nn.Linear's weight is [out, in]: a head computing h @ table^T holds the table as it is.
        readers = [w for w in tied if w is not weight and w.shape == kept.shape and torch.equal(w, kept)]

        def put(value: torch.Tensor) -> None:
            with torch.no_grad():
                for tensor in (weight, *readers):
                    tensor.copy_(value)

        def cluster_at(bits: int) -> None:
            c = _cluster_layer(kept.numpy(), bits, spec.init, spec.training.seed + index, spec.group_size)
            put(torch.from_numpy(c.codebook[c.labels]))
        return cluster_at, lambda: put(kept)

    def progress(index: int, total: int, layer_name: str) -> None:
        ctx.progress(0.05 * index / total, f"measuring each layer's cost at {bits_measured} bits: {index + 1}/{total} ({layer_name})")

    bits_measured = "/".join(map(str, bit_allocation.measured_bits(spec.bits)))
    started = time.perf_counter()
    key = (*_layout(spec), tuple(weights))
    cached = measured.get(key) if measured is not None else None
    found = cached or MeasuredCosts(bit_allocation.measure({n: entry(i, w) for i, (n, w) in enumerate(weights.items())}, spec.bits,
                                                           run.distance_to_original(SENSITIVITY_SAMPLES), progress),
                                    {n: (w.numel(), w.shape[0]) for n, w in weights.items()})
    if measured is not None:
        measured[key] = found
    curves = found.curves
    choice, costs = found.allocate(spec)
    uniform = {n: spec.bits for n in curves}
    report = {"how": f"each layer's bits from its measured cost at {bits_measured} bits (alone, nearest centroids, the distillation loss "
                     f"to the original on {SENSITIVITY_SAMPLES} samples), the clusters taking no more room than {spec.budget_bits():g} bits a weight",
              "budget_bits": spec.budget_bits(),
              "stored_bits_uniform": int(sum(costs[n](spec.bits) for n in curves) + bit_allocation.shared_bits({spec.bits})),
              "stored_bits_allocated": int(sum(costs[n](b) for n, b in choice.items()) + bit_allocation.shared_bits(set(choice.values()))),
              "predicted_loss_uniform": round(bit_allocation.predicted_loss(curves, uniform), 8),
              "predicted_loss_allocated": round(bit_allocation.predicted_loss(curves, choice), 8),
              "seconds": round(time.perf_counter() - started, 1),
              "reused": cached is not None,
              "layers": [{"layer": n, "bits": choice[n], "measured": {str(b): round(v, 8) for b, v in curves[n].items()}} for n in curves]}
    return choice, report


def apply(model: onnx.ModelProto, spec: ClusterStep, data: StepData, ctx: StepContext,
          measured: dict[tuple, MeasuredCosts] | None = None) -> StepResult:
    """The step; `measured` (see _allocated_bits) lets a caller that clusters the same model at several
    average bits (deep_compression's ladder) measure each layer's cost once."""
    if spec.needs_dataset() and not data.available:
        raise CompressionFailed("centroid fine-tuning and gptq assignment work on data: submit the job with a dataset_id", code="dataset_required")
    epochs = finetune_epochs(spec.finetune_epochs, data.available)
    assignment = spec.resolved_assignment(data.available)
    measured_bits = spec.resolved_bit_allocation(data.available) == "measured"
    if not epochs and assignment == "nearest" and not measured_bits:
        return _cluster_initializers(model, spec, ctx)
    ctx.progress(0.0, "clustering weights")
    run = TrainableRun(model, data)  # the original's outputs are taken before any weight is clustered
    module = run.module
    layers = weighted_layers(module)
    require_known([*spec.skip_layers, *spec.layer_bits], [*layers, *(_embedding_tables(model) if spec.embeddings else ())])
    # A tied weight (the output projection reading the token embedding) is left to the embedding: it is
    # clustered there (spec.embeddings) and read through the tie, so it stays stored once.
    chosen = {n: layer for n, layer in layers.items()
              if n not in spec.skip_layers and layer.weight.numel() >= spec.min_elements and layer.weight.requires_grad}
    if not chosen:
        raise CompressionFailed("no layer is large enough to cluster (see min_elements)", code="nothing_to_cluster")
    allocation = None
    if measured_bits:
        tables = [t for t in _embedding_tables(model) if t not in spec.skip_layers] if spec.embeddings else []
        allocated, allocation = _allocated_bits(run, chosen, tables, spec, ctx, measured)
        spec = spec.model_copy(update={"layer_bits": {**allocated, **spec.layer_bits}})

    shared, errors = _cluster_chosen(run, chosen, spec, assignment, ctx)
    before_score = after_score = None
    curve: list[float] = []
    finetune_outcome: dict[str, Any] = {}
    if data.available:
        before_score = run.quality()
        if epochs:
            for s in shared.values():
                s.keep_zero()

            def on_epoch(epoch: int, total: int, loss: float) -> None:
                ctx.progress(0.3 + 0.6 * (epoch + 1) / total, f"fine-tuning centroids: epoch {epoch + 1}/{total}, loss {loss:.4f}", milestone=True)

            # The best epoch on held-out data is kept (the clustered state counts as epoch 0).
            finetune_outcome = run.finetune(epochs, spec.training, on_epoch, after_step=lambda: [s.keep_zero() for s in shared.values()])
            curve = finetune_outcome.pop("losses")
            finetune_outcome.pop("epochs")
        after_score = run.quality()

    clustered_now = {n: storage.Clustered(s.codebook.detach().numpy().astype(np.float32), s.labels.numpy(), spec.layer_bits.get(n, spec.bits), s.fixed_zero) for n, s in shared.items()}
    for layer in chosen.values():
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    ctx.progress(0.92, "exporting with codebooks and packed indices", milestone=True)
    names = module.input_names
    example = tuple(torch.from_numpy(example_input(model, n)) for n in names)
    exported = trained_onnx(model, module, example, lambda: export(module, example, names, module.output_names, has_dynamic_batch(model), fold_constants=False))

    replacements, rows = _encode_layers(exported, clustered_now)
    for row in rows:
        row.update(errors.get(row["layer"], {}))
    if spec.embeddings:
        rows += _cluster_embeddings(exported, replacements, spec)
    result = storage.replace_initializers(exported, replacements)
    report: dict[str, Any] = {
        "bits": spec.bits,
        "init": spec.init,
        "device": str(training_device()),
        "layers": rows,
        "quality_before_finetune": before_score,
        "quality_after": after_score,
        "finetune_loss": curve,
        "finetune_epochs": epochs,
        "assignment": assignment,
        **finetune_outcome,
    }
    if allocation:
        report["bit_allocation"] = allocation
    if errors:
        report["reconstruction"] = {label: round(sum(e[key] for e in errors.values()) / len(errors), 6)
                                    for label, key in (("nearest", "output_error_nearest"), ("gptq", "output_error_assigned"), ("refit", "output_error"))}
    return StepResult(model=result, report=report)

