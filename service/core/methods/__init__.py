"""Every method's spec, found here: one module per method, each defining one `MethodSpec` subclass.

Adding a method means adding service/core/methods/<name>.py (its spec and facts) and
workers/methods/<name>.py (its apply): the step union, API validation, /v1/methods, the OpenAPI
schema and the worker registry all derive from this list.
"""

from __future__ import annotations

import importlib
import pkgutil

from service.core.methods.common import MethodSpec


SHARED_MODULES = ("common", "rows")  # what several methods' specs and reports use; every other module is one method


def _discover() -> tuple[type[MethodSpec], ...]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name in SHARED_MODULES:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        specs = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, MethodSpec) and v is not MethodSpec
                 and v.__module__ == module.__name__ and "method" in v.model_fields]
        if len(specs) != 1 or specs[0].model_fields["method"].default != info.name:
            raise RuntimeError(f"service/core/methods/{info.name}.py must define exactly one step spec whose method is {info.name!r}")
        found.append(specs[0])
    return tuple(sorted(found, key=lambda s: (s.listing_order, s.model_fields["method"].default)))


STEP_TYPES: tuple[type[MethodSpec], ...] = _discover()
