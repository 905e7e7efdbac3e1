"""ONNX -> trainable PyTorch module, with our own converter for a documented operator set.

Why not onnx2torch: it reads opset <= 17 only (the dynamo exporter writes 18+), imports torchvision
(whose install replaces the CPU torch with a multi-GB CUDA build here), and turns MatMul+Add into
generic ops that torch-pruning cannot narrow. This converter builds real nn.Conv*/nn.Linear/
nn.BatchNorm* modules for every weighted layer (MatMul with a constant weight plus its bias Add
becomes one nn.Linear), runs every other node through `onnx_ops.OPS`, and names the operator it
cannot handle. Supported operators: the weighted layers above plus everything in `onnx_ops.OPS`.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from service.core.errors import CompressionFailed
from workers.constant_folding import fold
from workers.fixed_batch import fixed_batch_of
from workers.onnx_weights import layer_name, tied_aliases, weight_aliases
from workers.trainable.onnx_ops import OPS

WEIGHTED = {"Conv", "Gemm", "BatchNormalization"}



def _constants(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> tuple[dict[str, np.ndarray], set[int]]:
    """Every constant value by name (initializers, Constant nodes, Identity of a constant) and the
    ids of the nodes folded into them."""
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    folded: set[int] = set()
    for node in nodes:
        if node.op_type == "Constant":
            consts[node.output[0]] = _constant_value(node)
            folded.add(id(node))
        elif node.op_type == "Identity" and node.input[0] in consts:
            # The TorchScript exporter de-duplicates equal initializers through Identity nodes
            # (e.g. a fresh BatchNorm's running_var aliasing its weight).
            consts[node.output[0]] = consts[node.input[0]]
            folded.add(id(node))
    return consts, folded

class UnsupportedModel(CompressionFailed):
    code = "unsupported_operator"


def supported_operators() -> list[str]:
    return sorted(set(OPS) | WEIGHTED | {"Constant"})


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        elif isinstance(value, list):
            value = [v.decode() if isinstance(v, bytes) else v for v in value]
        out[attr.name] = value
    return out


CONSTANT_FORMS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    attrs = _attrs(node)
    if "value" in attrs:
        return np.asarray(attrs["value"])
    for name, dtype in CONSTANT_FORMS.items():
        if name in attrs:
            return np.asarray(attrs[name], dtype=dtype)
    raise UnsupportedModel(f"Constant node '{node.name}' holds a {sorted(attrs)} value; only numeric constants are supported")


def _key(name: str, taken: set[str]) -> str:
    key = re.sub(r"\W", "_", name).strip("_") or "layer"
    key = key if not key[0].isdigit() else f"l_{key}"
    base, n = key, 1
    while key in taken:
        n += 1
        key = f"{base}_{n}"
    taken.add(key)
    return key



def _refuse_unsupported(nodes: list[onnx.NodeProto], folded: set[int]) -> None:
    missing = sorted({n.op_type for n in nodes if id(n) not in folded} - set(OPS) - WEIGHTED - {"MatMul", "Constant"})
    if missing:
        # All of them at once: a user who works around one should not then meet the next.
        raise UnsupportedModel(
            f"operators not supported by the trainable converter: {', '.join(missing)}. quantize still applies "
            f"(it works on the ONNX graph directly); supported by the converter: {', '.join(supported_operators())}"
        )

class OnnxGraphModule(nn.Module):
    """Runs the ONNX graph node by node; weighted layers are submodules in `self.layers`."""

    def __init__(self, model: onnx.ModelProto, aliases: dict[str, str] | None = None, tied: set[str] | None = None) -> None:
        super().__init__()
        graph = model.graph
        # One list of node objects for every pass: protobuf may hand out fresh wrappers on each
        # iteration, so identities (used below to mark fused/folded nodes) must come from one list.
        nodes = list(graph.node)
        self.layers = nn.ModuleDict()
        self.layer_names: dict[str, str] = {}  # module key -> user-facing layer name
        # module key -> where its parameters live in the (folded) ONNX graph, so trained weights can be
        # written back into the original graph (workers.trainable.write_back) instead of re-exported.
        self.sources: dict[str, dict[str, Any]] = {}
        consts, folded = _constants(graph, nodes)
        self.input_names = [i.name for i in graph.input if i.name not in consts]
        self.output_names = [o.name for o in graph.output]
        # A fixed-batch export's shape constants spell its batch out: it runs on exactly that many rows.
        self.fixed_batch = fixed_batch_of(model)
        ranks = self._ranks(model)
        dims = self._dims(model)
        # Reshapes that flatten everything after the batch axis with a constant target such as
        # [-1, 512] (the dynamo exporter's x.flatten(1)): run as flatten, so they follow a pruned
        # width; write_back rewrites their target to [0, -1] in the graph for the same reason.
        self.flatten_reshapes: list[str] = []
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in nodes:
            for name in node.input:
                consumers.setdefault(name, []).append(node)

        _refuse_unsupported(nodes, folded)
        taken: set[str] = set()
        self.plan: list[tuple] = []
        used_consts: set[str] = set()
        skipped: set[int] = set()
        for node in nodes:
            if id(node) in skipped or id(node) in folded:
                continue
            op, attrs = node.op_type, _attrs(node)
            if op == "Conv" and node.input[1] in consts:
                key = _key(layer_name(node.input[1], node, aliases), taken)
                self.layers[key], pre_pad = self._conv(node, attrs, consts)
                self.layer_names[key] = layer_name(node.input[1], node, aliases)
                self.sources[key] = {"kind": "conv", "weight": node.input[1], "bias": node.input[2] if len(node.input) > 2 and node.input[2] else None,
                                     "nodes": [node.output[0]]}
                self.plan.append(("layer", key, [node.input[0]], list(node.output), pre_pad))
            elif op == "Gemm" and node.input[1] in consts and not attrs.get("transA", 0):
                key = _key(layer_name(node.input[1], node, aliases), taken)
                self.layers[key] = self._gemm(node, attrs, consts)
                self.layer_names[key] = layer_name(node.input[1], node, aliases)
                self.sources[key] = {"kind": "gemm", "weight": node.input[1], "bias": node.input[2] if len(node.input) > 2 and node.input[2] else None,
                                     "alpha": attrs.get("alpha", 1.0), "beta": attrs.get("beta", 1.0), "trans_b": bool(attrs.get("transB", 0)),
                                     "nodes": [node.output[0]]}
                self.plan.append(("layer", key, [node.input[0]], list(node.output), None))
            elif op == "MatMul" and node.input[1] in consts and consts[node.input[1]].ndim == 2 and node.input[0] not in consts:
                linear, bias_name, output = self._linear(node, consts, consumers, skipped, node.input[1] in (tied or ()))
                key = _key(layer_name(node.input[1], node, aliases), taken)
                self.layers[key] = linear
                self.layer_names[key] = layer_name(node.input[1], node, aliases)
                self.sources[key] = {"kind": "matmul", "weight": node.input[1], "bias": bias_name,
                                     "nodes": [node.output[0]] + ([output] if bias_name else [])}
                self.plan.append(("layer", key, [node.input[0]], [output], None))
            elif op == "BatchNormalization" and all(n in consts for n in node.input[1:5]):
                key = _key(node.name or f"bn_{node.output[0]}", taken)
                self.layers[key] = self._batchnorm(node, attrs, consts, ranks.get(node.input[0], 4))
                self.layer_names[key] = node.name or key
                self.sources[key] = {"kind": "bn", "scale": node.input[1], "bias": node.input[2], "mean": node.input[3], "var": node.input[4],
                                     "nodes": [node.output[0]]}
                self.plan.append(("layer", key, [node.input[0]], [node.output[0]], None))
            elif op == "Reshape" and node.input[1] in consts and self._is_flatten(consts[node.input[1]], dims.get(node.input[0])):
                self.flatten_reshapes.append(node.output[0])
                self.plan.append(("op", "Flatten", [node.input[0]], list(node.output), {"axis": 1, "_outputs": 1}))
            elif op in OPS:
                attrs["_outputs"] = len(node.output)  # ops with optional outputs compute only what is used
                self.plan.append(("op", op, list(node.input), list(node.output), attrs))
                used_consts.update(i for i in node.input if i in consts)
            else:
                raise UnsupportedModel(
                    f"operator {op} (node '{node.name}') is not supported for training; supported: {', '.join(supported_operators())}"
                )
        self._const_keys = self._register_constants(consts, used_consts, taken)

    def constant(self, name: str) -> torch.Tensor | None:
        """The buffer holding ONNX constant `name` (an embedding table, say) where the graph reads one."""
        key = self._const_keys.get(name)
        return None if key is None else getattr(self, key)

    def _register_constants(self, consts: dict[str, np.ndarray], used: set[str], taken: set[str]) -> dict[str, str]:
        """The constants the plan's ops read, as buffers (they follow the module to a device): name -> buffer key."""
        keys: dict[str, str] = {}
        for name in sorted(used):
            key = _key(f"const_{name}", taken)
            value = consts[name]
            tensor = torch.from_numpy(np.array(value, dtype=np.float32 if value.dtype == np.float64 else value.dtype))
            self.register_buffer(key, tensor, persistent=True)
            keys[name] = key
        return keys

    @staticmethod
    def _linear(node: onnx.NodeProto, consts: dict[str, np.ndarray], consumers: dict[str, list[onnx.NodeProto]], skipped: set[int],
                tied: bool) -> tuple[nn.Linear, str | None, str]:
        """A MatMul by a constant [K, N] weight as nn.Linear, taking in a following Add of a [N]
        constant as its bias (that Add is marked skipped): (linear, bias name, output name)."""
        weight = consts[node.input[1]]
        bias, bias_name, output = None, None, node.output[0]
        users = consumers.get(output, [])
        if len(users) == 1 and users[0].op_type == "Add":
            other = [i for i in users[0].input if i != output]
            if other and other[0] in consts and consts[other[0]].shape == (weight.shape[1],):
                bias, bias_name, output = consts[other[0]], other[0], users[0].output[0]
                skipped.add(id(users[0]))
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight.T.copy()))
            if bias is not None:
                linear.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
        if tied:
            # A tied weight (GPT-2's output projection is the token embedding transposed): kept
            # as it is, so the model still stores the table once (write_back re-ties it).
            linear.weight.requires_grad_(False)
        return linear, bias_name, output

    @staticmethod
    def _is_flatten(target: np.ndarray, in_dims: list[int | None] | None) -> bool:
        target = [int(t) for t in np.asarray(target).reshape(-1)]
        if len(target) != 2 or not in_dims or len(in_dims) < 3 or any(d is None for d in in_dims[1:]):
            return False
        features = int(np.prod(in_dims[1:]))
        batch = {-1, 0} | ({in_dims[0]} if in_dims[0] else set())
        return target[1] == features and target[0] in batch

    @staticmethod
    def _dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - inference fails on some valid graphs: the converter then works without shapes
            return {}
        infos = list(inferred.graph.value_info) + list(inferred.graph.input)
        return {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
                for vi in infos if vi.type.tensor_type.HasField("shape")}

    @staticmethod
    def _ranks(model: onnx.ModelProto) -> dict[str, int]:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - as above
            return {}
        infos = list(inferred.graph.value_info) + list(inferred.graph.input)
        return {vi.name: len(vi.type.tensor_type.shape.dim) for vi in infos if vi.type.tensor_type.HasField("shape")}

    @staticmethod
    def _conv(node: onnx.NodeProto, attrs: dict[str, Any], consts: dict[str, np.ndarray]) -> tuple[nn.Module, list[int] | None]:
        weight = consts[node.input[1]]
        nd = weight.ndim - 2
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise UnsupportedModel(f"Conv '{node.name}' uses auto_pad={attrs['auto_pad']}; export with explicit pads")
        pads = attrs.get("pads", [0] * 2 * nd)
        symmetric = pads[:nd] == pads[nd:]
        groups = attrs.get("group", 1)
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        has_bias = len(node.input) > 2 and node.input[2] != ""
        conv = cls(
            weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
            stride=tuple(attrs.get("strides", [1] * nd)), padding=tuple(pads[:nd]) if symmetric else 0,
            dilation=tuple(attrs.get("dilations", [1] * nd)), groups=groups, bias=has_bias,
        )
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(weight.copy()))
            if has_bias:
                conv.bias.copy_(torch.from_numpy(consts[node.input[2]].copy()))
        pre_pad = None if symmetric else [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])]
        return conv, pre_pad

    @staticmethod
    def _gemm(node: onnx.NodeProto, attrs: dict[str, Any], consts: dict[str, np.ndarray]) -> nn.Module:
        b = consts[node.input[1]] * attrs.get("alpha", 1.0)
        weight = b if attrs.get("transB", 0) else b.T
        bias = None
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in consts:
                raise UnsupportedModel(f"Gemm '{node.name}' with a computed bias is not supported")
            bias = np.broadcast_to(consts[node.input[2]] * attrs.get("beta", 1.0), (weight.shape[0],))
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))
            if bias is not None:
                linear.bias.copy_(torch.from_numpy(np.array(bias, dtype=np.float32)))
        return linear

    @staticmethod
    def _batchnorm(node: onnx.NodeProto, attrs: dict[str, Any], consts: dict[str, np.ndarray], rank: int) -> nn.Module:
        scale, bias, mean, var = (consts[n] for n in node.input[1:5])
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank, nn.BatchNorm2d)
        bn = cls(scale.shape[0], eps=attrs.get("epsilon", 1e-5), momentum=1.0 - attrs.get("momentum", 0.9))
        with torch.no_grad():
            bn.weight.copy_(torch.from_numpy(scale.copy()))
            bn.bias.copy_(torch.from_numpy(bias.copy()))
            bn.running_mean.copy_(torch.from_numpy(mean.copy()))
            bn.running_var.copy_(torch.from_numpy(var.copy()))
        return bn

    def forward(self, *inputs: torch.Tensor, capture: dict[str, Any] | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """`capture`, when given, receives every intermediate value by its ONNX name (for diagnosis)."""
        env: dict[str, Any] = {name: getattr(self, key) for name, key in self._const_keys.items()}
        env.update(zip(self.input_names, inputs))
        env[""] = None
        for kind, target, ins, outs, extra in self.plan:
            args = [env[i] for i in ins]
            if kind == "layer":
                x = args[0]
                if extra is not None:
                    x = nn.functional.pad(x, extra)
                results = [self.layers[target](x)]
            else:
                results = OPS[target](on_one_device(args), extra)
            env.update(zip(outs, results))
        if capture is not None:
            capture.update(env)
        outputs = tuple(env[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


def on_one_device(args: list[Any]) -> list[Any]:
    """An op's tensor inputs on one device. On a GPU, shape arithmetic meets the module's buffers:
    `Shape` gives a CPU tensor (torch keeps sizes on the host) while an int64 constant it is
    concatenated with, or an index it is gathered by, moved to the GPU with the module. torch refuses
    to mix them, so the CPU ones follow the accelerator (a few bytes each)."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor) and a.device.type != "cpu"), None)
    if device is None:
        return args
    return [a.to(device) if isinstance(a, torch.Tensor) and a.device != device else a for a in args]


def to_torch(model: onnx.ModelProto) -> OnnxGraphModule:
    try:
        # fold(): weights stored compactly (sparse gaps, cluster indices) become dense tensors first.
        return OnnxGraphModule(fold(model), weight_aliases(model), set(tied_aliases(model))).eval()  # inference semantics (batch norm running statistics) until trained
    except CompressionFailed:
        raise
    except Exception as exc:
        raise UnsupportedModel(f"the model could not be converted to a trainable form: {str(exc).splitlines()[0][:300]}") from exc
