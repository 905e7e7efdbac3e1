"""Building blocks of the quantize method: candidate settings, how each is built with ONNX Runtime's
quantizers, how each is measured against the original, and how one is chosen (workers.methods.quantize
puts them together)."""
