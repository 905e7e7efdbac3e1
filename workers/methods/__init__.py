"""Registry of compression methods: `method` name in a job step -> the module that runs it.

Each module exposes `apply(model, spec, data, ctx) -> StepResult`; a meta-test checks that every
spec in service.core.specs has an entry here.
"""

from __future__ import annotations

from types import ModuleType

from workers.methods import cluster, deep_compression, distill, huffman, prune, quantize

METHODS: dict[str, ModuleType] = {
    "quantize": quantize,
    "prune": prune,
    "distill": distill,
    "cluster": cluster,
    "huffman": huffman,
    "deep_compression": deep_compression,
}
