"""Fused kernels (Triton on GPU) with torch fallbacks that CPU tests and CI run."""
