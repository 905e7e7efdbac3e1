"""Benchmark 3: upload a 1 GB dataset to `modelshrink api` and watch the API process's memory:
MB/s end to end (streaming to disk + validation) and peak RSS, sampled every 50 ms."""

from __future__ import annotations

import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.common import report, running_service

SIZE_BYTES = 1024**3


def make_dataset(path: Path) -> None:
    # A stored (uncompressed) .npz: one float32 array of 1 GiB, written in chunks.
    rows = SIZE_BYTES // (256 * 4)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (rows, 256)}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_2_0(fh, header)
            chunk = np.random.default_rng(0).standard_normal((4096, 256)).astype(np.float32).tobytes()
            for _ in range(rows // 4096):
                fh.write(chunk)


def main() -> None:
    work = Path(tempfile.mkdtemp())
    data = work / "big.npz"
    make_dataset(data)
    size = data.stat().st_size
    env = {"MODELSHRINK_MAX_UPLOAD_BYTES": str(2 * SIZE_BYTES), "MODELSHRINK_MAX_DATASET_DECOMPRESSED_BYTES": str(2 * SIZE_BYTES)}
    with running_service(env, command="api") as svc:
        proc = psutil.Process(svc["pid"])
        idle_rss = proc.memory_info().rss
        peak = [idle_rss]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.05):
                peak[0] = max(peak[0], proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True)))

        sampler = threading.Thread(target=sample)
        sampler.start()
        start = time.perf_counter()
        with open(data, "rb") as fh:
            response = httpx.post(f"{svc['url']}/v1/datasets", headers={"Authorization": f"Bearer {svc['key']}"},
                                  files={"file": ("big.npz", fh)}, timeout=600)
        elapsed = time.perf_counter() - start
        stop.set()
        sampler.join()
    assert response.status_code == 201, response.text
    mb = size / 1e6
    rows = [[f"{mb:.0f} MB", mb / elapsed, idle_rss / 2**20, peak[0] / 2**20]]
    report("upload_throughput", "1 GB dataset upload to the API (stream to disk + validation)", ["file", "MB/s", "idle RSS MiB", "peak RSS MiB"],
           rows, {"seconds": elapsed})


if __name__ == "__main__":
    main()
