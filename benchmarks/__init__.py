"""Benchmarks of condconv_ref against the machine's GEMM peak and PyTorch: ``python -m benchmarks``.

Run ``python -m benchmarks --help`` for the options.  The cases S1-S6 are in
:mod:`benchmarks.cases`, the measurements in :mod:`benchmarks.measure`, the
PyTorch counterparts in :mod:`benchmarks.torch_reference`.  See
``docs/performance.md`` for the method and the recorded figures.

This package imports nothing heavy at import time: ``__main__`` must set the
allocator and thread environment before NumPy is loaded.
"""
