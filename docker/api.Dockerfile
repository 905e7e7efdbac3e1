# API image: FastAPI + Celery producer; never imports torch (it still installs the package's
# dependencies, pinned to the CPU torch wheel to keep the image small).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY service ./service
COPY workers ./workers
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt . \
 && useradd --create-home modelshrink
USER modelshrink
ENV MODELSHRINK_DATA_DIR=/data
EXPOSE 8000
CMD ["modelshrink", "api", "--host", "0.0.0.0", "--port", "8000"]
