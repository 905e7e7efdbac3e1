"""Torch implementations of the ONNX operators the trainable-model converter accepts.

Each entry takes (inputs, attrs) and returns the node's outputs. Layers with weights (Conv, Gemm,
MatMul with a constant weight, BatchNormalization) are *not* here: the converter turns them into
real nn.Conv2d / nn.Linear / nn.BatchNorm modules, so that optimisers train them and torch-pruning's
dependency graph can narrow them. Both opset 17 and the opset 18+ forms (axes as an input instead
of an attribute) are handled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Op = Callable[[list[Any], dict[str, Any]], list[Any]]


def _axes(inputs: list[Any], attrs: dict[str, Any], index: int = 1) -> list[int] | None:
    if len(inputs) > index and inputs[index] is not None:
        return [int(a) for a in inputs[index].tolist()]
    return attrs.get("axes")


def _reduce(fn: Callable[..., torch.Tensor]) -> Op:
    def op(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
        axes = _axes(inputs, attrs)
        keep = bool(attrs.get("keepdims", 1))
        x = inputs[0]
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, dim=axes, keepdim=keep)]

    return op


def _reshape(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    x, shape = inputs[0], [int(s) for s in inputs[1].tolist()]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    # Keep the batch axis symbolic so the exported model keeps a dynamic batch.
    if shape and shape[0] not in (-1,) and -1 not in shape[1:] and x.dim() > 0 and shape[0] == x.shape[0]:
        return [x.reshape(-1, *shape[1:])]
    return [x.reshape(shape)]


def _flatten(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    # Always 2-D: (product of the dims before axis, product of the rest).
    x, axis = inputs[0], attrs.get("axis", 1)
    axis = axis if axis >= 0 else x.dim() + axis
    if axis == 0:
        return [x.reshape(1, -1)]
    if axis == 1:
        return [torch.flatten(x, start_dim=1) if x.dim() > 1 else x.reshape(-1, 1)]
    rest = 1
    for d in x.shape[axis:]:
        rest *= int(d)
    return [x.reshape(-1, rest) if rest else x.reshape(int(torch.tensor(x.shape[:axis]).prod()), 0)]


def _pool(kind: str) -> Op:
    def op(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
        x = inputs[0]
        kernel = attrs["kernel_shape"]
        nd = len(kernel)
        pads = attrs.get("pads", [0] * 2 * nd)
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise NotImplementedError(f"{kind}Pool auto_pad={attrs['auto_pad']}")
        stride = attrs.get("strides", [1] * nd)
        ceil = bool(attrs.get("ceil_mode", 0))
        if pads[:nd] != pads[nd:]:
            x = F.pad(x, [p for i in reversed(range(nd)) for p in (pads[i], pads[i + nd])], value=float("-inf") if kind == "Max" else 0.0)
            pads = [0] * 2 * nd
        if kind == "Max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
            return [fn(x, kernel, stride, pads[:nd], dilation=attrs.get("dilations", [1] * nd), ceil_mode=ceil)]
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
        return [fn(x, kernel, stride, pads[:nd], ceil_mode=ceil, count_include_pad=bool(attrs.get("count_include_pad", 0)))]

    return op


def _slice(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    x = inputs[0]
    starts, ends = inputs[1].tolist(), inputs[2].tolist()
    axes = inputs[3].tolist() if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = inputs[4].tolist() if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    reversed_axes = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        if st == 0:
            raise NotImplementedError("Slice with a zero step")
        if st < 0:  # torch slices forwards only: gather the indices ONNX's clamping rules pick
            reversed_axes.append((a % x.dim(), _backward_indices(int(s), int(e), int(st), x.shape[a])))
            continue
        index[a] = slice(int(s), None if e >= 2**62 else int(e), int(st))
    out = x[tuple(index)]
    for axis, picked in reversed_axes:
        out = out.index_select(axis, torch.tensor(picked, dtype=torch.long, device=out.device))
    return [out]


def _backward_indices(start: int, end: int, step: int, dim: int) -> list[int]:
    """ONNX Slice with a negative step (e.g. x[::-1], written by padding code that reverses pads):
    negative bounds count from the end, start is clamped to [0, dim-1] and end to [-1, dim-1]."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    start = min(max(start, 0), dim - 1)
    end = min(max(end, -1), dim - 1)
    return list(range(start, end, step))


def _split(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    x, axis = inputs[0], attrs.get("axis", 0)
    if len(inputs) > 1 and inputs[1] is not None:
        sizes = [int(s) for s in inputs[1].tolist()]
    elif "split" in attrs:
        sizes = attrs["split"]
    else:
        parts = attrs.get("num_outputs", attrs.get("_outputs", 1))
        chunk = -(-x.shape[axis] // parts)  # the last part takes what is left
        sizes = [chunk] * (parts - 1) + [x.shape[axis] - chunk * (parts - 1)]
    return list(torch.split(x, sizes, dim=axis))


def _gather(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    x, idx, axis = inputs[0], inputs[1].long(), attrs.get("axis", 0)
    axis = axis if axis >= 0 else axis + x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    # A tuple, not *args: a scalar index on a 1-D input (x.size(0) in `x.view(x.size(0), -1)`) gives shape ().
    return [torch.index_select(x, axis, idx.reshape(-1)).reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))]


def _gather_elements(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    x, idx, axis = inputs[0], inputs[1].long(), attrs.get("axis", 0)
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return [torch.gather(x, axis, idx)]


def _gather_nd(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    x, idx, batch_dims = inputs[0], inputs[1].long(), attrs.get("batch_dims", 0)
    depth = idx.shape[-1]
    batch_shape = tuple(x.shape[:batch_dims])
    flat_x = x.reshape((-1,) + tuple(x.shape[batch_dims:]))
    flat_idx = idx.reshape((-1,) + tuple(idx.shape[batch_dims:]))
    out = []
    for b in range(flat_x.shape[0]):
        positions = flat_idx[b].reshape(-1, depth)
        dims = torch.tensor(flat_x.shape[1:1 + depth], device=positions.device)
        positions = torch.where(positions < 0, positions + dims, positions)
        out.append(flat_x[b][tuple(positions.t())])
    stacked = torch.stack(out)
    return [stacked.reshape(batch_shape + tuple(idx.shape[batch_dims:-1]) + tuple(x.shape[batch_dims + depth:]))]


# ONNX TensorProto data types -> torch dtypes (the ones a model's graph computes with).
TORCH_DTYPES = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 4: torch.uint16, 5: torch.int16, 6: torch.int32, 7: torch.int64,
    9: torch.bool, 10: torch.float16, 11: torch.float64, 12: torch.uint32, 13: torch.uint64, 16: torch.bfloat16,
}


def _dtype(code: int) -> torch.dtype:
    if code not in TORCH_DTYPES:
        raise NotImplementedError(f"tensor data type {code}")
    return TORCH_DTYPES[code]


def _cast(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    # float -> integer truncates toward zero in ONNX as in torch.
    return [inputs[0].to(_dtype(attrs["to"]))]


def _constant_of_shape(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    shape = [int(s) for s in inputs[0].tolist()]
    value = attrs.get("value")
    if value is None:
        return [torch.zeros(shape, dtype=torch.float32, device=inputs[0].device)]
    fill = torch.as_tensor(value).reshape(-1)[0]
    return [torch.full(shape, fill.item(), dtype=fill.dtype, device=inputs[0].device)]


def _expand(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    x, shape = inputs[0], tuple(int(s) for s in inputs[1].tolist())
    return [x.expand(torch.broadcast_shapes(tuple(x.shape), shape))]


def _range(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    start, limit, delta = inputs
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)]


def _cumsum(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    x, axis = inputs[0], int(inputs[1].reshape(-1)[0])
    if attrs.get("reverse", 0):
        x = x.flip(axis)
    out = torch.cumsum(x, dim=axis)
    if attrs.get("exclusive", 0):
        out = out - x
    if attrs.get("reverse", 0):
        out = out.flip(axis)
    return [out.to(x.dtype)]


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Op:
    def op(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
        out = inputs[0]
        for other in inputs[1:]:
            out = fn(out, other)
        return [out]

    return op


def _mean(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    total = _variadic(torch.add)(inputs, attrs)[0]
    return [total / len(inputs)]


def _div(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    a, b = inputs
    if a.dtype.is_floating_point or b.dtype.is_floating_point:
        return [a / b]
    return [torch.div(a, b, rounding_mode="trunc")]  # ONNX integer division truncates


def _is_inf(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    x = inputs[0]
    wanted = torch.zeros_like(x, dtype=torch.bool)
    if attrs.get("detect_positive", 1):
        wanted |= x > 0
    if attrs.get("detect_negative", 1):
        wanted |= x < 0
    return [torch.isinf(x) & wanted]


def _where(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    return [torch.where(inputs[0].bool(), inputs[1], inputs[2])]


def _mod(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    a, b = inputs
    return [torch.fmod(a, b) if attrs.get("fmod", 0) else torch.remainder(a, b)]


def _tile(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    return [inputs[0].repeat(*[int(r) for r in inputs[1].tolist()])]


def _trilu(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    k = int(inputs[1].reshape(-1)[0]) if len(inputs) > 1 and inputs[1] is not None else 0
    return [torch.triu(inputs[0], k) if attrs.get("upper", 1) else torch.tril(inputs[0], k)]


def _arg(fn: Callable[..., torch.Tensor]) -> Op:
    def op(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
        x, axis, keep = inputs[0], attrs.get("axis", 0), bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            flipped = fn(x.flip(axis), dim=axis, keepdim=keep)
            return [x.shape[axis] - 1 - flipped]
        return [fn(x, dim=axis, keepdim=keep)]

    return op


def _einsum(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    return [torch.einsum(attrs["equation"], *inputs)]


def _prod(x: torch.Tensor, dim: list[int], keepdim: bool) -> torch.Tensor:
    for d in sorted((d if d >= 0 else d + x.dim() for d in dim), reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


def _clip(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    lo = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min")
    hi = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max")
    if lo is None and hi is None:
        return [inputs[0]]
    lo = float(lo) if lo is not None else None
    hi = float(hi) if hi is not None else None
    return [torch.clamp(inputs[0], lo, hi)]


def _layer_norm(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = attrs.get("axis", -1)
    axis = axis if axis >= 0 else x.dim() + axis
    eps = attrs.get("epsilon", 1e-5)
    y = F.layer_norm(x, x.shape[axis:], scale, bias, eps)
    if attrs.get("_outputs", 1) == 1:
        return [y]
    # The optional Mean and InvStdDev outputs (kept dims).
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    inv_std = torch.rsqrt(((x - mean) ** 2).mean(dim=dims, keepdim=True) + eps)
    return [y, mean, inv_std]


def _softmax(fn: Callable[..., torch.Tensor]) -> Op:
    return lambda i, a: [fn(i[0], dim=a.get("axis", -1))]


def _unsqueeze(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    x = inputs[0]
    for axis in sorted(_axes(inputs, attrs)):
        x = x.unsqueeze(axis if axis >= 0 else axis + x.dim() + 1)
    return [x]


def _squeeze(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    axes = _axes(inputs, attrs)
    x = inputs[0]
    if axes is None:
        return [x.squeeze()]
    for axis in sorted((a if a >= 0 else a + x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return [x]


def _pad(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
    x = inputs[0]
    pads = inputs[1].tolist() if len(inputs) > 1 else attrs["pads"]
    value = float(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else attrs.get("value", 0.0)
    n = x.dim()
    torch_pads = [int(p) for i in reversed(range(n)) for p in (pads[i], pads[i + n])]
    mode = {"edge": "replicate", "wrap": "circular"}.get(attrs.get("mode", "constant"), attrs.get("mode", "constant"))
    if mode == "constant":
        return [F.pad(x, torch_pads, mode=mode, value=value)]
    # torch pads only the trailing spatial dims in these modes: drop the leading zero pairs.
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    return [F.pad(x, torch_pads, mode=mode)]


_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def _unsigned_safe(op: Op) -> Op:
    """torch has few kernels for uint16/32/64: compute in int64 and cast back (bools stay bools)."""

    def wrapped(inputs: list[Any], attrs: dict[str, Any]) -> list[Any]:
        dtype = next((t.dtype for t in inputs if isinstance(t, torch.Tensor) and t.dtype in _WIDE_UNSIGNED), None)
        if dtype is None:
            return op(inputs, attrs)
        widened = [t.to(torch.int64) if isinstance(t, torch.Tensor) and t.dtype in _WIDE_UNSIGNED else t for t in inputs]
        return [r.to(dtype) if r.dtype == torch.int64 else r for r in op(widened, attrs)]

    return wrapped


OPS: dict[str, Op] = {
    "Identity": lambda i, a: [i[0]],
    "Dropout": lambda i, a: [i[0], torch.ones_like(i[0], dtype=torch.bool)][: a.get("_outputs", 1)],
    "Add": _unsigned_safe(lambda i, a: [i[0] + i[1]]),
    "Sub": _unsigned_safe(lambda i, a: [i[0] - i[1]]),
    "Mul": _unsigned_safe(lambda i, a: [i[0] * i[1]]),
    "Div": _unsigned_safe(_div),
    "Pow": lambda i, a: [torch.pow(i[0], i[1])],
    "Sqrt": lambda i, a: [torch.sqrt(i[0])],
    "Exp": lambda i, a: [torch.exp(i[0])],
    "Log": lambda i, a: [torch.log(i[0])],
    "Neg": lambda i, a: [-i[0]],
    "Abs": lambda i, a: [torch.abs(i[0])],
    "Erf": lambda i, a: [torch.erf(i[0])],
    "Relu": lambda i, a: [F.relu(i[0])],
    "LeakyRelu": lambda i, a: [F.leaky_relu(i[0], a.get("alpha", 0.01))],
    "Sigmoid": lambda i, a: [torch.sigmoid(i[0])],
    "HardSigmoid": lambda i, a: [torch.clamp(i[0] * a.get("alpha", 0.2) + a.get("beta", 0.5), 0, 1)],
    "HardSwish": lambda i, a: [F.hardswish(i[0])],
    "Tanh": lambda i, a: [torch.tanh(i[0])],
    "Gelu": lambda i, a: [F.gelu(i[0], approximate=a.get("approximate", "none"))],
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "Clip": _clip,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda i, a: [i[0].permute(*a["perm"]) if "perm" in a else i[0].permute(*reversed(range(i[0].dim())))],
    "Concat": lambda i, a: [torch.cat(i, dim=a["axis"])],
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Shape": lambda i, a: [torch._shape_as_tensor(i[0])[a.get("start", 0):a.get("end", None)]],
    "Pad": _pad,
    "MaxPool": _pool("Max"),
    "AveragePool": _pool("Average"),
    "GlobalAveragePool": lambda i, a: [i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda i, a: [torch.amax(i[0], dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "ReduceMin": _reduce(torch.amin),
    "ReduceProd": _reduce(lambda x, dim, keepdim: _prod(x, dim, keepdim)),
    "ReduceL2": _reduce(lambda x, dim, keepdim: torch.sqrt(torch.sum(x * x, dim=dim, keepdim=keepdim))),
    "ReduceSumSquare": _reduce(lambda x, dim, keepdim: torch.sum(x * x, dim=dim, keepdim=keepdim)),
    # Shape arithmetic, masks and comparisons: what exporters emit around attention and positions.
    "Cast": _cast,
    "CastLike": lambda i, a: [i[0].to(i[1].dtype)],
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Range": _range,
    "CumSum": _cumsum,
    "Where": _where,
    "Equal": _unsigned_safe(lambda i, a: [torch.eq(i[0], i[1])]),
    "Greater": _unsigned_safe(lambda i, a: [torch.gt(i[0], i[1])]),
    "GreaterOrEqual": _unsigned_safe(lambda i, a: [torch.ge(i[0], i[1])]),
    "Less": _unsigned_safe(lambda i, a: [torch.lt(i[0], i[1])]),
    "LessOrEqual": _unsigned_safe(lambda i, a: [torch.le(i[0], i[1])]),
    "And": lambda i, a: [torch.logical_and(i[0], i[1])],
    "Or": lambda i, a: [torch.logical_or(i[0], i[1])],
    "Xor": lambda i, a: [torch.logical_xor(i[0], i[1])],
    "Not": lambda i, a: [torch.logical_not(i[0])],
    "IsNaN": lambda i, a: [torch.isnan(i[0])],
    "IsInf": _is_inf,
    "Max": _unsigned_safe(_variadic(torch.maximum)),
    "Min": _unsigned_safe(_variadic(torch.minimum)),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "Mod": _unsigned_safe(_mod),
    "Floor": lambda i, a: [torch.floor(i[0])],
    "Ceil": lambda i, a: [torch.ceil(i[0])],
    "Round": lambda i, a: [torch.round(i[0])],
    "Reciprocal": lambda i, a: [torch.reciprocal(i[0])],
    "Sign": lambda i, a: [torch.sign(i[0])],
    "Sin": lambda i, a: [torch.sin(i[0])],
    "Cos": lambda i, a: [torch.cos(i[0])],
    "Softplus": lambda i, a: [F.softplus(i[0])],
    "Elu": lambda i, a: [F.elu(i[0], a.get("alpha", 1.0))],
    "Selu": lambda i, a: [a.get("gamma", 1.0507009873554805) * torch.where(i[0] > 0, i[0], a.get("alpha", 1.6732632423543772) * (torch.exp(i[0]) - 1))],
    "PRelu": lambda i, a: [torch.where(i[0] >= 0, i[0], i[0] * i[1])],
    "Mish": lambda i, a: [F.mish(i[0])],
    "Tile": _tile,
    "Trilu": _trilu,
    "ArgMax": _arg(torch.argmax),
    "ArgMin": _arg(torch.argmin),
    "Einsum": _einsum,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "Size": lambda i, a: [torch.tensor(i[0].numel(), dtype=torch.int64)],
    "LayerNormalization": _layer_norm,
    "MatMul": lambda i, a: [torch.matmul(i[0], i[1])],
}
