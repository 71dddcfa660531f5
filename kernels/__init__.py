"""Triton kernels of cl_optim, installed as ``cl_optim.kernels``: the ``triton`` backend.

One file per fused op, each holding its kernel(s) and launcher — ``sgd_step``, ``adamw_step``,
``grad_norm`` (``grad_sq_norm``), ``sam_perturb``, ``fisher_accumulate``, ``ewc_grad_add``,
``ewc_penalty``, ``ewc_consolidate``, and the multi-task ``task_gram`` and ``task_combine``
(``task_combine_``) — on the shared per-element math of ``_elementwise`` (the same order of
operations as ``csrc/include/cl_optim/elementwise.h``), multi-tensor launches through the cached
device pointer tables of ``_pointer_table``, and two-stage deterministic reductions (``_reduce``).
``_ops`` declares them as the ``cl_optim_triton`` ops (schemas and fake kernels of
``cl_optim/ops.py``). ``python -m cl_optim.kernels.compile_check --arch 80 90``
compiles every specialisation ahead of time without a GPU.

The kernels serve CUDA tensors; on CPU tensors they run only under ``TRITON_INTERPRET=1`` (set it
before they are imported), which is how the tests check them without a GPU. Importing this
package imports nothing from Triton, so ``import cl_optim`` works where Triton is not installed.
"""
