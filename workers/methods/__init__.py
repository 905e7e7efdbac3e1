"""Registry of compression methods: `method` name in a job step -> the module that runs it.

Derived from the specs (service.core.methods): method `x` runs in workers/methods/x.py, which exposes
`apply(model, spec, data, ctx) -> StepResult`. A method is added by adding those two modules.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from service.core.specs import STEP_TYPES

METHODS: dict[str, ModuleType] = {
    spec.model_fields["method"].default: importlib.import_module(f"{__name__}.{spec.model_fields['method'].default}") for spec in STEP_TYPES
}
