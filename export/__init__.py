"""Export: the CRM to ONNX (and TensorRT), the LoRA-merged LLM to quantized GGUF, one verified bundle."""
