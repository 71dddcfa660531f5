"""Triton kernels of cl_optim, installed as ``cl_optim.kernels`` (one file per fused op).

This release ships no Triton kernel yet: ``cl_optim.report()`` lists the ``triton`` backend as
unavailable, and the pure-PyTorch backends run every op. Importing this package never imports
Triton, so ``import cl_optim`` works where Triton is not installed.
"""
