"""Depth students of transformers: whole blocks removed, found from the LayerNorms in the converted
graph (no layer names or model classes needed, so any exporter and architecture family works).

A transformer of L blocks has 2L + 1 LayerNorms in order: post-LN (BERT) an embedding norm, then two
per block, each block's output being its second norm's output; pre-LN (GPT-2, ViT) two per block and a
final norm, each block's input being its first norm's input. Either way the residual stream between
blocks is every other norm's output (post-LN) or input (pre-LN). Dropping block k makes later steps
read the stream before it instead of after it; steps nothing reads any more are then removed, with
their layers (shared computations such as the attention mask stay, because later blocks read them).
"""

from __future__ import annotations


import onnx
from onnx import helper

from service.core.errors import InvalidInput
from workers.trainable.from_onnx import OnnxGraphModule

NORM = "LayerNormalization"


def residual_stream(module: OnnxGraphModule) -> list[str]:
    """The tensors between blocks, in order (L + 1 of them), or [] when the norms do not show them."""
    norms = [step for step in module.plan if step[0] == "op" and step[1] == NORM]
    if len(norms) < 3 or len(norms) % 2 == 0:
        return []
    readers: dict[str, list[tuple]] = {}
    for step in module.plan:
        for name in step[2]:
            readers.setdefault(name, []).append(step)
    # Post-LN: a norm's output is also read by a residual Add (the stream flows through the norms).
    post = any(step[1] == "Add" for step in readers.get(norms[0][3][0], []))
    return [norm[3][0] if post else norm[2][0] for norm in norms[::2]]


def chosen_blocks(blocks: int, count: int, keep_first: bool = True) -> list[int]:
    """Every other block first (1, 3, 5, ...), then from the end; the first block stays unless
    `keep_first` is false (then it goes last)."""
    order = list(range(1, blocks, 2)) + [b for b in range(blocks - 1, 0, -1) if b % 2 == 0] + ([] if keep_first else [0])
    return sorted(order[:count])


def drop_blocks(student: OnnxGraphModule, count: int) -> tuple[list[str], dict[str, str]]:
    """Remove `count` blocks from `student` in place. Returns their names ("block 1", ...) and the
    stream aliases made ({tensor after a dropped block: the tensor before it}), which `drop_in_graph`
    applies to the ONNX graph so the trained weights can be written back into it."""
    stream = residual_stream(student)
    blocks = len(stream) - 1
    if blocks < 2 or count >= blocks:
        raise InvalidInput(f"this transformer shows {max(blocks, 0)} blocks (from its LayerNorms); a depth student must keep at least one "
                           f"(drop_count {count})", code="invalid_student")
    dropped = chosen_blocks(blocks, count)
    aliases = {stream[b + 1]: stream[b] for b in dropped}
    apply_aliases(student, aliases)
    return [f"block {b}" for b in dropped], aliases


def apply_aliases(student: OnnxGraphModule, aliases: dict[str, str]) -> None:
    """The tensor after a dropped block becomes an alias of the tensor before it; the block's own steps
    then feed nothing and go, with their layers (graph outputs keep their names even when one of them
    is aliased)."""
    plan = [("op", "Identity", [aliases[step[3][0]]], [step[3][0]], {"_outputs": 1}) if step[3] and step[3][0] in aliases else step
            for step in student.plan]
    needed = set(student.output_names)
    kept = []
    for step in reversed(plan):
        if set(step[3]) & needed:
            kept.append(step)
            needed.update(step[2])
    student.plan = kept[::-1]
    used = {step[1] for step in student.plan if step[0] == "layer"}
    for key in [k for k in student.layers if k not in used]:
        del student.layers[key]
        student.layer_names.pop(key, None)
        student.sources.pop(key, None)


def drop_in_graph(model: onnx.ModelProto, aliases: dict[str, str]) -> onnx.ModelProto:
    """The same blocks dropped from the ONNX graph: each aliased tensor's producer becomes an Identity,
    then nodes and initializers nothing reads are removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        target = next((name for name in node.output if name in aliases), None)
        nodes.append(helper.make_node("Identity", [aliases[target]], [target], name=f"dropped_{target}") if target else node)
    needed = {o.name for o in out.graph.output}
    kept = []
    for node in reversed(nodes):
        if set(node.output) & needed:
            kept.append(node)
            needed.update(i for i in node.input if i)
    del out.graph.node[:]
    out.graph.node.extend(kept[::-1])
    inits = [i for i in out.graph.initializer if i.name in needed]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out
