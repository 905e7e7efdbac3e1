# GPU worker image: one container (or one `modelshrink worker --gpu N` process) per GPU, Celery
# prefork with concurrency 1. torch from PyPI is the CUDA build; ONNX Runtime's GPU build measures on CUDA.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY modelshrink ./modelshrink
RUN pip install --no-cache-dir ".[worker]" onnxruntime-gpu && useradd --create-home modelshrink
USER modelshrink
ENV MODELSHRINK_DATA_DIR=/data MODELSHRINK_WORKER_DEVICE=cuda
CMD ["modelshrink", "worker"]
