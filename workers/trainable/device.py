"""Where training runs: the GPU a worker was started on (one worker per GPU, CUDA_VISIBLE_DEVICES),
else the CPU. MODELSHRINK_TORCH_DEVICE overrides (e.g. "cpu" on a GPU machine, or "cuda:1").
Called only inside the worker's pool child, so CUDA is never touched in the process that forks."""

from __future__ import annotations

import os
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def training_device() -> torch.device:
    name = os.environ.get("MODELSHRINK_TORCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
