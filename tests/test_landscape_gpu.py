"""cl_optim.landscape on a CUDA device: the same numbers as on the CPU (fp64 models), the model
restored, CUDA generators accepted. Skipped with the ``gpu`` marker where no GPU is present."""

from __future__ import annotations

import copy

import pytest
import torch
from test_landscape import _data, _model

from cl_optim import landscape

pytestmark = pytest.mark.gpu


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


def test_hvp_eigenvalues_trace_and_surfaces_match_the_cpu():
    device = _cuda()
    model, data = _model(), _data()
    gpu_model = copy.deepcopy(model).to(device)
    gpu_data = [(x.to(device), y.to(device)) for x, y in data]
    v = torch.randn(38, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        landscape.hvp(gpu_model, gpu_data, v.to(device), dtype=torch.float64).cpu(),
        landscape.hvp(model, data, v, dtype=torch.float64),
    )
    cpu_top, _ = landscape.hessian_eigenvalues(model, data, tol=1e-8, dtype=torch.float64)
    gpu_top, vectors = landscape.hessian_eigenvalues(gpu_model, gpu_data, tol=1e-8, dtype=torch.float64)
    torch.testing.assert_close(gpu_top.cpu(), cpu_top, rtol=1e-6, atol=0.0)
    assert vectors.device.type == "cuda"
    cuda_generator = torch.Generator(device=device).manual_seed(0)
    estimate, error = landscape.hessian_trace(gpu_model, gpu_data, n_probes=30, generator=cuda_generator)
    assert error > 0 and abs(estimate) < 1e3
    before = [p.clone() for p in gpu_model.parameters()]
    landscape.loss_surface(gpu_model, gpu_data, directions=2, steps=3, generator=cuda_generator)
    assert all(torch.equal(p, b) for p, b in zip(gpu_model.parameters(), before))
