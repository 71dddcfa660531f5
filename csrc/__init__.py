"""C++/CUDA sources of cl_optim, installed as ``cl_optim._csrc`` for the just-in-time build."""
