"""What the CPU's int8 arithmetic can do: without VNNI, x86's u8 x s8 multiply-add (vpmaddubsw)
saturates at 16 bits, so ONNX Runtime recommends 7-bit weights (`reduce_range`) there."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def lacks_vnni() -> bool:
    """True only on an x86 CPU known to lack VNNI (ARM's int8 dot products do not saturate)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not any(flag in flags.split() for flag in VNNI_FLAGS)
