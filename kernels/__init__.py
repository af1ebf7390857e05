"""Triton kernels (installed as reasonrl.kernels)."""
