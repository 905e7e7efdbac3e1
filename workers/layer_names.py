"""The one check that every layer a step names exists in the model: the error lists the model's
layers of that kind, so a user sees the names to use (torch module paths where the export kept them)."""

from __future__ import annotations

from collections.abc import Iterable

from service.core.errors import InvalidInput


def require_known(asked: Iterable[str] | None, layers: Iterable[str], kind: str = "layers") -> None:
    """`asked` must all be among `layers`; `kind` says which layers ("prunable layers", "convolutions")."""
    available = sorted(layers)
    unknown = sorted(set(asked or ()) - set(available))
    if unknown:
        raise InvalidInput(f"unknown layer name(s) {unknown}; the model's {kind} are {available}", code="unknown_layer")
