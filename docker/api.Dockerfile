# API image: FastAPI, the Celery producer, the upload checks (onnx, ONNX Runtime). No torch: the
# package is installed with its `server` extra and without `worker`, and the API never imports it.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY service ./service
COPY workers ./workers
COPY modelshrink ./modelshrink
RUN pip install --no-cache-dir -c constraints.txt ".[server]" \
 && useradd --create-home modelshrink
USER modelshrink
ENV MODELSHRINK_DATA_DIR=/data
EXPOSE 8000
CMD ["modelshrink", "api", "--host", "0.0.0.0", "--port", "8000"]
