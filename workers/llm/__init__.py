"""Decoder LLMs from Hugging Face checkpoints: exported to ONNX Runtime GenAI with its model builder,
quantized weight-only on the ONNX graph, measured by perplexity, agreement, prefill and decode speed."""
