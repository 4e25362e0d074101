"""Quantization: static int8 (planner, precision ladder, rewrite, GPTQ, bias correction, hardware targets,
per-op knowledge) and cross-layer equalization, which prepares weights for it."""
