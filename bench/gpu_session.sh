#!/usr/bin/env bash
# One lease of a GPU machine (the `device` tool), prepared ahead so it fits in minutes:
#   1. bench.gpu_check at full size: structured pruning + fine-tuning and width distillation of a
#      ResNet-18 through the worker's method code on CUDA and on the CPU, quality compared;
#   2. the tests that train (every method on BERT/GPT-2/ViT/ResNet/MobileNetV2 from both exporters,
#      and the method tests) with MODELSHRINK_TORCH_DEVICE=cuda, so every training loop, mask,
#      codebook and write-back runs with its tensors on the GPU;
#   3. the LLM path (tiny random Llama: GenAI builder export, Hessians, GPTQ/AWQ/int8 plans, the
#      result run in onnxruntime-genai) on that machine's image. The LLM path exports and measures on
#      ONNX Runtime's CPU provider there too (no CUDA export yet): this checks it runs, not GPU speed.
# Expects the service's pure-Python dependencies as wheels in .whl/ (the GPU image has torch, onnx,
# onnxruntime, transformers and pytest but not FastAPI, SQLAlchemy, Celery, torch-pruning...):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl <each missing package>
# Run there as:  bash bench/gpu_session.sh   (writes logs and JSON to $OUT, or ./gpu-session-out)
set -u
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, onnxruntime, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ort', onnxruntime.__version__, onnxruntime.get_available_providers(), 'transformers', transformers.__version__)"
  nproc; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "${GPU_CHECK_SECONDS:-240}" != 0 ]; then  # 0: the tests alone
  timeout "${GPU_CHECK_SECONDS:-240}" python3 -m bench.gpu_check > "$OUT/gpu_check.log" 2>&1
  echo "gpu_check exit $?" >> "$OUT/gpu_check.log"
  cp bench/results/gpu_check.json "$OUT/" 2>/dev/null
  tail -20 "$OUT/gpu_check.log"
fi

OMP_NUM_THREADS=2 MODELSHRINK_TORCH_DEVICE=cuda timeout "${TESTS_SECONDS:-240}" python3 -m pytest -q -p no:cacheprovider -n "${WORKERS:-8}" --timeout 200 -o addopts= \
  tests/unit/test_real_architectures.py tests/unit/test_prune.py tests/unit/test_distill.py tests/unit/test_cluster_and_huffman.py \
  tests/unit/test_early_exit.py tests/unit/test_low_rank.py tests/unit/test_depthwise_separable.py tests/unit/test_residual_depth.py \
  tests/unit/test_ffn_pruning.py tests/unit/test_attention_heads.py tests/unit/test_output_kind.py tests/unit/test_tied_weights.py \
  > "$OUT/cuda_tests.log" 2>&1
echo "tests exit $?" >> "$OUT/cuda_tests.log"
grep -E "passed|failed|error" "$OUT/cuda_tests.log" | tail -40

# Needs onnxruntime-genai and onnx-ir among the wheels.
timeout "${LLM_SECONDS:-180}" python3 -m pytest -q -p no:cacheprovider -o addopts= tests/unit/test_llm_quantization.py > "$OUT/llm_tests.log" 2>&1
echo "llm tests exit $?" >> "$OUT/llm_tests.log"
tail -5 "$OUT/llm_tests.log"
