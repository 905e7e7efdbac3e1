"""SmoothQuant (Xiao et al., 2023) for static int8: per input channel k of a matrix product, divide
the activation by s_k and multiply the weight's row k by s_k, with s_k = max|X_k|^alpha / max|W_k|^(1-alpha).
The product is unchanged; the activation's outlier channels shrink, so its int8 range wastes less.

Written here because ONNX Runtime's own `SmoothQuant` option imports Intel Neural Compressor 2.x's
ONNX adaptor (`neural_compressor.adaptor.ox_utils`), which INC 3.x no longer ships.

The 1/s scaling is folded into a LayerNormalization that feeds only smoothed products (transformer
Q/K/V and FFN inputs), and otherwise inserted as a Mul by 1/s stored in a byte per channel (CODE_STEPS).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from workers.activations import probe_session

EPS = 1e-5
SUFFIX = "__smooth"
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SAMPLE_ROWS = 2048  # rows of each activation kept to choose its alpha (the error of one [rows, K] x [K, N] product per alpha)
PRODUCT_ELEMENTS = 4 << 20  # at most this many outputs per simulated product (16 MB of float32)


def _groups(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Activation tensor -> the MatMuls that multiply it by a constant [K, N] weight."""
    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2 and node.input[0] not in inits:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def activation_maxima(model: onnx.ModelProto, feeds: Iterator[dict[str, np.ndarray]], threads: int = 1) -> dict[str, np.ndarray]:
    """Per last-axis channel max |x| of each smoothable activation over the calibration feeds."""
    return collect(model, feeds, threads, rows=0)[0]


def collect(model: onnx.ModelProto, feeds: Iterator[dict[str, np.ndarray]], threads: int = 1,
            rows: int = SAMPLE_ROWS) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(per-channel max |x|, up to `rows` rows of x) of each smoothable activation, in one pass."""

    names = list(_groups(model))
    session = probe_session(model, names, threads)
    maxima: dict[str, np.ndarray] = {}
    samples: dict[str, list[np.ndarray]] = {}
    rng = np.random.default_rng(0)
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            flat = value.reshape(-1, value.shape[-1])
            channel_max = np.abs(flat).max(axis=0)
            maxima[name] = channel_max if name not in maxima else np.maximum(maxima[name], channel_max)
            kept = sum(len(r) for r in samples.get(name, []))
            if kept < rows:
                take = min(rows - kept, len(flat), max(1, rows // 8))
                samples.setdefault(name, []).append(flat[rng.choice(len(flat), take, replace=False)].astype(np.float32))
    return maxima, {name: np.concatenate(parts) for name, parts in samples.items()}


# Where a factor cannot fold into a LayerNormalization it is stored as one signed byte per channel,
# c = round(CODE_STEPS * log2 s), and decoded in the graph (Cast, Mul, Pow: constants, which ONNX
# Runtime folds once at load). Four float bytes per channel cost all-MiniLM-L6-v2's int8 model 64 KB
# (0.3%: bigger than ONNX Runtime's own int8); the weights take the decoded s, so the product is
# unchanged (to float rounding), and s in steps of 2^(1/8) (9%) smooths about as well as the exact value.
CODE_STEPS = 8


def _scale(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    scale = np.where((x_max > 0) & (w_max > 0), np.power(np.maximum(x_max, EPS), alpha) / np.power(np.maximum(w_max, EPS), 1 - alpha), 1.0)
    codes = np.clip(np.round(CODE_STEPS * np.log2(np.clip(scale, EPS, None))), -127, 127)
    return _decoded(codes.astype(np.int8))


def _decoded(codes: np.ndarray) -> np.ndarray:
    """s from its byte codes, in float32 as the graph computes it: 2 ** (c * (1 / CODE_STEPS))."""
    return np.power(np.float32(2.0), codes.astype(np.float32) * np.float32(1.0 / CODE_STEPS)).astype(np.float32)


def _codes(scale: np.ndarray) -> np.ndarray:
    return np.round(CODE_STEPS * np.log2(scale)).astype(np.int8)


# The decoding's two constants, shared by every smoothed activation.
STEP, TWO = f"step{SUFFIX}", f"two{SUFFIX}"


def _decode_nodes(index: int) -> tuple[list[onnx.NodeProto], str, str]:
    """(nodes computing 1/s = 2 ** (-c / CODE_STEPS) from the codes, the codes' name, 1/s's name).
    Short names: with the activation's name in each (90 characters in a BERT export) the graph
    grew by 42 KB on MiniLM, more than the bytes the codes saved. Node names end with SUFFIX, as the
    Mul they feed, so a static quantizer leaves them float."""
    key = f"sq{index}"
    codes, inverse = f"{key}_c", f"{key}_i"
    nodes = [
        helper.make_node("Cast", [codes], [f"{key}_f"], to=onnx.TensorProto.FLOAT, name=f"{key}c{SUFFIX}"),
        helper.make_node("Mul", [f"{key}_f", STEP], [f"{key}_e"], name=f"{key}m{SUFFIX}"),
        helper.make_node("Pow", [TWO, f"{key}_e"], [inverse], name=f"{key}p{SUFFIX}"),
    ]
    return nodes, codes, inverse


def _fake_int8(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w with x on a per-tensor uint8 grid and w on per-column symmetric int8 (ONNX Runtime's int8)."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = (high - low) / 255 or 1.0
    zero = np.round(-low / step)
    xq = (np.clip(np.round(x / step) + zero, 0, 255) - zero) * step
    wstep = np.abs(w).max(axis=0, keepdims=True) / 127
    wstep[wstep == 0] = 1.0
    return xq @ (np.round(w / wstep) * wstep)


def choose_alphas(model: onnx.ModelProto, maxima: dict[str, np.ndarray], samples: dict[str, np.ndarray],
                  grid: tuple[float, ...] = ALPHAS) -> dict[str, float]:
    """Per activation, the migration strength whose int8 product on the calibration rows is closest
    to the float one (INC's per-layer "auto" alpha, measured here in numpy). One alpha for every layer
    is what SmoothQuant's authors tuned per model; on all-MiniLM-L6-v2 with dynamic int8 the held-out
    cosine went 0.982 at 0.5 and 0.996 at 0.75, and 0.85 at 0.3 (measured)."""
    inits = {i.name: i for i in model.graph.initializer}
    chosen = {}
    for activation, matmuls in _groups(model).items():
        x, x_max = samples.get(activation), maxima.get(activation)
        if x is None or x_max is None or x_max.size != inits[matmuls[0].input[1]].dims[0]:
            continue
        w = np.concatenate([numpy_helper.to_array(inits[mm.input[1]]) for mm in matmuls], axis=1).astype(np.float32)
        # Rows cut so one product stays within PRODUCT_ELEMENTS: a language model's output projection
        # (50,257 columns) took a job from 2 GB to 3.8 GB with all 2,048 rows.
        x = x[: max(64, PRODUCT_ELEMENTS // w.shape[1])]
        exact = x @ w
        norm = float(np.square(exact).sum(dtype=np.float64)) or 1.0
        w_max = np.abs(w).max(axis=1)
        errors = {}
        for alpha in grid:
            s = _scale(x_max, w_max, alpha)
            errors[alpha] = float(np.square(_fake_int8(x / s, w * s[:, None]) - exact).sum(dtype=np.float64)) / norm
        chosen[activation] = min(errors, key=lambda a: (errors[a], a))
    return chosen


def smooth(model: onnx.ModelProto, maxima: dict[str, np.ndarray], alpha: float | dict[str, float]) -> tuple[onnx.ModelProto, int]:
    """The smoothed model and how many activations were smoothed; `alpha` one for all, or per activation
    (those without one are left alone)."""
    out = copy.deepcopy(model)
    inits = {i.name: i for i in out.graph.initializer}
    producers = {o: n for n in out.graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for node in out.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    graph_outputs = {o.name for o in out.graph.output}
    inserted, done, scaled = [], 0, set()
    for activation, matmuls in _groups(out).items():
        x_max = maxima.get(activation)
        strength = alpha.get(activation) if isinstance(alpha, dict) else alpha
        if strength is None:
            continue
        # A weight shared with another activation's products would be scaled twice: leave that group alone.
        if x_max is None or x_max.size != inits[matmuls[0].input[1]].dims[0] or any(mm.input[1] in scaled for mm in matmuls):
            continue
        scaled |= {mm.input[1] for mm in matmuls}
        weights = {mm.input[1]: numpy_helper.to_array(inits[mm.input[1]]) for mm in matmuls}
        w_max = np.max([np.abs(w).max(axis=1) for w in weights.values()], axis=0)
        scale = _scale(x_max, w_max, strength)
        for name, weight in weights.items():
            inits[name].CopyFrom(numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), name))
        producer = producers.get(activation)
        foldable = (producer is not None and producer.op_type == "LayerNormalization" and consumers.get(activation) == len(matmuls)
                    and activation not in graph_outputs and all(x in inits for x in producer.input[1:3]) and len(producer.input) >= 3)
        if foldable:
            for name in producer.input[1:3]:
                value = numpy_helper.to_array(inits[name])
                inits[name].CopyFrom(numpy_helper.from_array((value / scale).astype(np.float32), name))
        else:
            if not inserted:
                out.graph.initializer.extend([numpy_helper.from_array(np.array(-1.0 / CODE_STEPS, np.float32), STEP),
                                              numpy_helper.from_array(np.array(2.0, np.float32), TWO)])
            # Short, as the decoding's names: ONNX Runtime's quantizer names its own tensors after this
            # one (_quantized, _scale, _zero_point, ...), so the activation's 90 characters would repeat.
            smoothed = f"sq{len(inserted)}{SUFFIX}"
            decode, codes, factor = _decode_nodes(len(inserted))
            out.graph.initializer.append(numpy_helper.from_array(_codes(scale), codes))
            inserted.append((activation, [*decode, helper.make_node("Mul", [activation, factor], [smoothed], name=f"sq{len(inserted)}{SUFFIX}")]))
            for mm in matmuls:
                mm.input[0] = smoothed
        done += 1
    # Each Mul (after its decoding nodes) goes right after its activation's producer (or first, for a
    # graph input): topological order.
    for activation, added in inserted:
        producer = producers.get(activation)
        nodes = list(out.graph.node)
        index = nodes.index(producer) + 1 if producer is not None else 0
        for offset, node in enumerate(added):
            out.graph.node.insert(index + offset, node)
    return out, done
