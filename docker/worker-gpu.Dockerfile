# GPU worker image: one container per GPU (CUDA_VISIBLE_DEVICES), Celery prefork with concurrency 1.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
RUN pip install --no-cache-dir . onnxruntime-gpu && useradd --create-home modelshrink
USER modelshrink
ENV MODELSHRINK_DATA_DIR=/data
CMD ["modelshrink", "worker"]
