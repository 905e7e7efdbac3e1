"""Registry of compression methods: `method` name in a job step -> the module that runs it.

Derived from the specs (service.core.methods): method `x` runs in workers/methods/x.py, which exposes
`apply(model, spec, data, ctx) -> StepResult` (workers.steps). A method is added by adding those two
modules. Modules are imported on first use (as Olive imports a pass by its module path), so code
that methods use never loads every method with it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from types import ModuleType

from service.core.specs import STEP_TYPES

NAMES: tuple[str, ...] = tuple(spec.model_fields["method"].default for spec in STEP_TYPES)


class _Registry(Mapping[str, ModuleType]):
    def __getitem__(self, name: str) -> ModuleType:
        if name not in NAMES:
            raise KeyError(name)
        return importlib.import_module(f"{__name__}.{name}")

    def __iter__(self) -> Iterator[str]:
        return iter(NAMES)

    def __len__(self) -> int:
        return len(NAMES)


METHODS: Mapping[str, ModuleType] = _Registry()
