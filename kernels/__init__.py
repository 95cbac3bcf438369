"""Custom kernels, one module per operation; each holds the CPU twin, the CUDA kernel and the launcher.

Installed as ``gpu_ann.kernels``. Nothing here compiles at import time.
"""
