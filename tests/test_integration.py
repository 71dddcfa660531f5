"""SAM and the base optimizers inside real training loops: GradScaler, bf16 autocast, BatchNorm, DDP."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cl_optim

SAM_BASES = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (cl_optim.SGD, dict(lr=0.1, momentum=0.9)),
    (cl_optim.AdamW, dict(lr=1e-2)),
]
IDS = ["torch.SGD", "cl_optim.SGD", "cl_optim.AdamW"]


def _model(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(6, 8)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(8))
    layers += [torch.nn.Tanh(), torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers)


def _loss(model, i):
    gen = torch.Generator().manual_seed(i)
    x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)
    return torch.nn.functional.mse_loss(model(x), y)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _scaler(scale=2.0**12):
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10_000)


def _sam_amp_step(model, opt, scaler, i, clip=None, poison=None, pass_scaler=False):
    """The README recipe: pass 1 without unscale, pass 2 through the scaler."""
    scaler.scale(_loss(model, i)).backward()
    if poison == 1:
        next(model.parameters()).grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True, grad_scaler=scaler if pass_scaler else None)
    scaler.scale(_loss(model, i)).backward()
    if poison == 2:
        next(model.parameters()).grad[0, 0] = float("inf")
    if clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


def _sam_plain_step(model, opt, i, clip=None):
    _loss(model, i).backward()
    opt.first_step(zero_grad=True)
    _loss(model, i).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("base,kwargs", SAM_BASES, ids=IDS)
def test_grad_scaler_gives_the_unscaled_trajectory(base, kwargs, clip):
    """A power-of-two loss scale is exact, so SAM+GradScaler equals SAM without it."""
    m_amp, m_ref = _model(), _model()
    opt_amp = cl_optim.SAM(m_amp.parameters(), base, rho=0.05, **kwargs)
    opt_ref = cl_optim.SAM(m_ref.parameters(), base, rho=0.05, **kwargs)
    scaler = _scaler()
    for i in range(6):
        _sam_amp_step(m_amp, opt_amp, scaler, i, clip=clip)
        _sam_plain_step(m_ref, opt_ref, i, clip=clip)
    for a, b in zip(_params(m_amp), _params(m_ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == 2.0**12


@pytest.mark.parametrize("adaptive,fisher_ema", [("fisher", None), ("fisher_ema", 0.9)])
def test_grad_scaler_with_fisher_sam(adaptive, fisher_ema):
    """Fisher-SAM's weight is of the unscaled gradient: with grad_scaler= the loss scale changes
    nothing; forgetting it would (the weight 1/(1 + eta*g**2) of a 4096x gradient is far off)."""
    m_amp, m_ref, m_forgot = _model(), _model(), _model()
    kwargs = dict(rho=0.05, adaptive=adaptive, eta=1e3, fisher_ema=fisher_ema, lr=0.1, momentum=0.9)
    opt_amp = cl_optim.SAM(m_amp.parameters(), cl_optim.SGD, **kwargs)
    opt_ref = cl_optim.SAM(m_ref.parameters(), cl_optim.SGD, **kwargs)
    opt_forgot = cl_optim.SAM(m_forgot.parameters(), cl_optim.SGD, **kwargs)
    scaler, scaler_forgot = _scaler(), _scaler()
    for i in range(6):
        _sam_amp_step(m_amp, opt_amp, scaler, i, pass_scaler=True)
        _sam_amp_step(m_forgot, opt_forgot, scaler_forgot, i)
        _sam_plain_step(m_ref, opt_ref, i)
    for a, b in zip(_params(m_amp), _params(m_ref)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if adaptive == "fisher":
        assert max((a - b).abs().max().item() for a, b in zip(_params(m_forgot), _params(m_ref))) > 1e-4
    else:  # the running Fisher is unscaled inside the kernel; without grad_scaler it is scaled
        fisher = opt_forgot.running_fisher()
        ref = opt_ref.running_fisher()
        assert all(
            fisher[p].sum() > 1e6 * ref[q].sum() for p, q in zip(m_forgot.parameters(), m_ref.parameters())
        )


@pytest.mark.parametrize("poison", [1, 2], ids=["inf_in_pass1", "inf_in_pass2"])
@pytest.mark.parametrize("base,kwargs", SAM_BASES, ids=IDS)
def test_grad_scaler_overflow_skips_the_step_and_corrupts_nothing(base, kwargs, poison):
    model = _model()
    opt = cl_optim.SAM(model.parameters(), base, rho=0.05, **kwargs)
    scaler = _scaler()
    for i in range(2):
        _sam_amp_step(model, opt, scaler, i)
    before = _params(model)
    state = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.state_dict()["state"].items()}
    _sam_amp_step(model, opt, scaler, 2, poison=poison)
    assert bool(opt.last_step_skipped)
    _same(_params(model), before)
    after = opt.state_dict()["state"]
    for k in state:
        for name in state[k]:
            torch.testing.assert_close(after[k][name], state[k][name], rtol=0, atol=0)
    if poison == 2:  # the scaler saw the overflow and backs off
        assert scaler.get_scale() == 2.0**11
    _sam_amp_step(model, opt, scaler, 3)
    assert not bool(opt.last_step_skipped)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "cls,torch_cls", [(cl_optim.SGD, torch.optim.SGD), (cl_optim.AdamW, torch.optim.AdamW)]
)
def test_base_optimizer_fuses_the_unscale(cls, torch_cls):
    """GradScaler hands grad_scale/found_inf to cl_optim's step: same numbers as torch's unscale path."""
    results = []
    for opt_cls in (torch_cls, cls):
        model = _model()
        opt = opt_cls(model.parameters(), lr=0.05)
        scaler = _scaler()
        for i in range(5):
            scaler.scale(_loss(model, i)).backward()
            if i == 2:
                next(model.parameters()).grad[0, 0] = float("nan")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        results.append(_params(model))
        assert scaler.get_scale() == 2.0**11
    for a, b in zip(*results):  # compiled kernels round their own way: fp32 assert_close defaults
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("base,kwargs", SAM_BASES, ids=IDS)
def test_bf16_autocast(base, kwargs):
    def run(closure_path):
        model = _model()
        opt = cl_optim.SAM(model.parameters(), base, rho=0.05, **kwargs)
        losses = []
        for i in range(20):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _loss(model, i % 4)
            losses.append(loss.item())
            loss.backward()
            if closure_path:

                def closure(i=i):
                    opt.zero_grad()
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        second = _loss(model, i % 4)
                    second.backward()
                    return second

                opt.step(closure)
            else:
                opt.first_step(zero_grad=True)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    _loss(model, i % 4).backward()
                opt.second_step(zero_grad=True)
            opt.zero_grad()
        return _params(model), losses

    params_a, losses = run(False)
    params_b, _ = run(True)
    _same(params_a, params_b)
    assert all(p.dtype == torch.float32 for p in params_a)
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4])


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_statistics_come_from_the_first_pass_only(momentum):
    model = _model(bn=True)
    model[1].momentum = momentum
    opt = cl_optim.SAM(model.parameters(), cl_optim.SGD, rho=0.5, lr=0.1)
    probe = _model(bn=True)
    probe[1].momentum = momentum
    for i in range(3):
        probe.load_state_dict(model.state_dict())
        _loss(probe, i)  # what the first pass alone does to the statistics
        _loss(model, i).backward()
        opt.first_step(zero_grad=True)
        with cl_optim.preserve_bn_stats(model):
            _loss(model, i).backward()
        opt.second_step(zero_grad=True)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(model[1], name), getattr(probe[1], name), rtol=0, atol=0)
    assert model[1].num_batches_tracked.item() == 3


# ----------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = cl_optim.SAM(model.parameters(), cl_optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    records = []
    for step in range(3):
        data = 10 * step + rank  # each rank its own batch
        with cl_optim.skip_grad_sync(model):
            _loss(model, data).backward()
        pass1 = [p.grad.clone() for p in model.parameters()]
        opt.first_step(zero_grad=True)
        _loss(model, data).backward()
        pass2 = [p.grad.clone() for p in model.parameters()]
        opt.second_step(zero_grad=True)
        records.append((pass1, pass2))
    torch.save({"records": records, "params": [p.detach() for p in model.parameters()]}, f"{out_file}.{rank}")
    dist.destroy_process_group()


def _reference_ddp_sam(world, steps=3):
    """One process: each rank perturbs with its local gradient; the pass-2 gradients are averaged."""
    model = _model()
    buf = None
    pass1_log = []
    for step in range(steps):
        w = _params(model)
        averaged = None
        local = []
        for rank in range(world):
            model.zero_grad()
            _loss(model, 10 * step + rank).backward()
            g1 = [p.grad.clone() for p in model.parameters()]
            local.append(g1)
            norm = torch.stack([g.norm() for g in g1]).norm()
            with torch.no_grad():
                for p, g in zip(model.parameters(), g1):
                    p.add_(g * (0.1 / (norm + 1e-12)))
            model.zero_grad()
            _loss(model, 10 * step + rank).backward()
            g2 = [p.grad.clone() for p in model.parameters()]
            averaged = g2 if averaged is None else [a + b for a, b in zip(averaged, g2)]
            with torch.no_grad():
                for p, saved in zip(model.parameters(), w):
                    p.copy_(saved)
        averaged = [a / world for a in averaged]
        buf = [g.clone() for g in averaged] if buf is None else [0.9 * b + g for b, g in zip(buf, averaged)]
        with torch.no_grad():
            for p, b in zip(model.parameters(), buf):
                p.add_(b, alpha=-0.1)
        pass1_log.append(local)
    return _params(model), pass1_log


def test_ddp_pass1_is_local_and_pass2_is_synchronised():
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out")
        mp.spawn(_ddp_worker, args=(world, init_file, out_file), nprocs=world, join=True)
        results = [torch.load(f"{out_file}.{rank}", weights_only=True) for rank in range(world)]
    expected_params, expected_pass1 = _reference_ddp_sam(world)
    for step in range(3):
        pass1 = [r["records"][step][0] for r in results]
        pass2 = [r["records"][step][1] for r in results]
        # pass 1: each rank keeps its own gradient (no all-reduce happened)
        for rank in range(world):
            for got, want in zip(pass1[rank], expected_pass1[step][rank]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(pass1[0][0], pass1[1][0])
        # pass 2: synchronised
        for a, b in zip(pass2[0], pass2[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for rank in range(world):
        for got, want in zip(results[rank]["params"], expected_params):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [cl_optim.SGD, cl_optim.AdamW])
def test_torch_compile_of_the_step_and_of_the_model(cls):
    """Dynamo runs opt.step (with graph breaks around host reads) and SAM around a compiled model,
    giving the eager numbers."""
    results = []
    for compiled in (False, True):
        model = _model()
        opt = cls(model.parameters(), lr=0.05)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        forward = torch.compile(model, backend="eager") if compiled else model
        sam = cl_optim.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05)
        for i in range(3):
            torch.nn.functional.mse_loss(
                forward(torch.randn(4, 6, generator=torch.Generator().manual_seed(i))), torch.zeros(4, 3)
            ).backward()
            step()
            opt.zero_grad()
            _loss(forward, i).backward()
            sam.first_step(zero_grad=True)
            _loss(forward, i).backward()
            sam.second_step(zero_grad=True)
        results.append(_params(model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
