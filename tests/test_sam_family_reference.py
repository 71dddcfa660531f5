"""Self-tests of tests/sam_family_reference.py on a quadratic whose gradients are known in closed form.

The loss is 0.5 x^T A x + c_t^T x, with x all parameters flattened into one vector, so the gradient is
A x + c_t. The expected values below are computed on that flat vector, and each base update is done
by torch.optim itself (SGD and AdamW act element-wise, so one flat parameter gives the same update). This
makes the checks independent of the reference's list code.
"""

from __future__ import annotations

import math

import pytest
import torch
from sam_family_reference import fisher_mask, run_reference

F64 = torch.float64
SHAPES = [(3, 2), (3,), (2,)]
N = sum(math.prod(s) for s in SHAPES)
STEPS = 5
EPS = 1e-12
SGD_M = ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01})
SGD_PLAIN = ("sgd", {"lr": 0.1})
ADAMW = ("adamw", {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": 0.1})
BASES = [SGD_PLAIN, SGD_M, ADAMW]


def _problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(N, N, generator=gen, dtype=F64)
    a = m @ m.T / N + 0.5 * torch.eye(N, dtype=F64)
    c = torch.randn(STEPS + 4, N, generator=gen, dtype=F64)
    params0 = [torch.randn(s, generator=gen, dtype=F64) for s in SHAPES]
    return a, c, params0


A, C, P0 = _problem()


def loss_at(params, t):
    x = torch.cat([p.reshape(-1) for p in params])
    return 0.5 * x @ (A @ x) + C[t] @ x


def gq(x, t):
    """The exact gradient at the flat point x on batch t."""
    return A @ x + C[t]


def flat(ps):
    return torch.cat([p.reshape(-1) for p in ps])


def segments():
    """Slices of the flat vector, one per tensor."""
    out, start = [], 0
    for s in SHAPES:
        out.append(slice(start, start + math.prod(s)))
        start += math.prod(s)
    return out


def asc(v, r):
    return r * v / (v.norm() + EPS)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def torch_run(rule, steps, base, kw):
    """Runs torch.optim on one flat parameter, with the gradient rule(x, t) at each step."""
    x = torch.nn.Parameter(flat(P0).clone())
    opt = (torch.optim.SGD if base == "sgd" else torch.optim.AdamW)([x], **kw)
    for t in range(steps):
        x.grad = rule(x.detach().clone(), t)
        opt.step()
    return x.detach(), opt


def ref(variant, base=SGD_M, steps=STEPS, **hyper):
    return run_reference(variant, P0, loss_at, steps, base[0], base[1], **hyper)


def sam_rule(rho):
    return lambda x, t: gq(x + asc(gq(x, t), rho), t)


def base_rule(x, t):
    return gq(x, t)


# ---------------------------------------------------------------------------------------------------------
# The base optimizers and the common contract


@pytest.mark.parametrize("base", BASES, ids=["sgd", "sgd_momentum", "adamw"])
def test_rho_zero_sam_is_the_base_optimizer(base):
    out = ref("sam", base=base, rho=0.0)
    x, opt = torch_run(base_rule, STEPS, *base)
    close(flat(out["params"]), x)
    st = opt.state[opt.param_groups[0]["params"][0]]
    if base[0] == "sgd" and base[1].get("momentum", 0) == 0:
        assert all(s["momentum_buffer"] is None for s in out["base_state"])
    elif base[0] == "sgd":
        close(flat([s["momentum_buffer"] for s in out["base_state"]]), st["momentum_buffer"])
    else:
        close(flat([s["exp_avg"] for s in out["base_state"]]), st["exp_avg"])
        close(flat([s["exp_avg_sq"] for s in out["base_state"]]), st["exp_avg_sq"])
        assert all(s["step"] == STEPS for s in out["base_state"])


def test_inputs_are_not_modified_and_dtype_is_kept():
    before = [p.clone() for p in P0]
    out = ref(
        "gam", rho=0.1, grad_norm_rho=0.2, grad_beta_1=0.6, grad_beta_2=0.5, grad_beta_3=0.4, grad_gamma=0.1
    )
    for p, q in zip(P0, before):
        assert torch.equal(p, q)
    p32 = [p.float() for p in P0]
    out = run_reference(
        "sam", p32, lambda ps, t: loss_at([p.double() for p in ps], t), 2, "sgd", {"lr": 0.1}, rho=0.1
    )
    assert all(p.dtype == torch.float32 for p in out["params"])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="missing"):
        ref("sam")
    with pytest.raises(ValueError, match="unknown"):
        ref("sam", rho=0.1, gamma=0.5)
    with pytest.raises(ValueError, match="unknown"):
        run_reference("sam", P0, loss_at, 1, "sgd", {"lr": 0.1, "foo": 1}, rho=0.1)
    with pytest.raises(ValueError, match="momentum"):
        ref("msam", base=SGD_PLAIN, rho=0.1)
    with pytest.raises(ValueError, match="needs"):
        ref("cflat", rho=0.1, lamb=0.2, grad_norm_rho=0.2, strategy="plus", A=1.0)


PASSES = [
    ("sam", {"rho": 0.1}, [2] * 6),
    ("wsam", {"rho": 0.1, "gamma": 0.9, "decouple": True}, [2] * 6),
    ("looksam", {"rho": 0.1, "k": 3, "alpha": 0.5, "layerwise": False}, [2, 1, 1, 2, 1, 1]),
    ("msam", {"rho": 0.1}, [1] * 6),
    ("friendly_sam", {"rho": 0.1, "sigma": 1.0, "lmbda": 0.9}, [2] * 6),
    (
        "gam",
        dict(rho=0.1, grad_norm_rho=0.2, grad_beta_1=0.6, grad_beta_2=0.5, grad_beta_3=0.4, grad_gamma=0.1),
        [4] * 6,
    ),
    ("cflat", {"rho": 0.1, "lamb": 0.2, "grad_norm_rho": 0.2}, [4] * 6),
    ("rwp", {"rho": 0.1, "alpha": 0.5, "generator_seed": 3}, [2] * 6),
    ("interval_sam", {"rho": 0.1, "interval": 3, "start": 1}, [1, 2, 1, 1, 2, 1]),
    ("sam_on", {"rho": 0.1, "norm_mask": [True, False, True]}, [2] * 6),
    ("ssam_fisher", {"rho": 0.1, "masks": [torch.ones(s, dtype=torch.bool) for s in SHAPES]}, [2] * 6),
]


@pytest.mark.parametrize("variant,hyper,passes", PASSES, ids=[p[0] for p in PASSES])
def test_pass_counts(variant, hyper, passes):
    out = run_reference(variant, P0, loss_at, 6, "adamw", ADAMW[1], **hyper)
    assert out["passes"] == passes


# ---------------------------------------------------------------------------------------------------------
# SAM and the variants that reduce to it


@pytest.mark.parametrize("base", BASES, ids=["sgd", "sgd_momentum", "adamw"])
def test_sam_by_hand(base):
    out = ref("sam", base=base, rho=0.3)
    x, _ = torch_run(sam_rule(0.3), STEPS, *base)
    close(flat(out["params"]), x)


def test_sam_first_step_written_out():
    x0 = flat(P0)
    g0 = A @ x0 + C[0]
    g1 = A @ (x0 + 0.3 * g0 / (g0.norm() + EPS)) + C[0]
    out = ref("sam", base=SGD_PLAIN, steps=1, rho=0.3)
    close(flat(out["params"]), x0 - 0.1 * g1)


@pytest.mark.parametrize("decouple", [False, True])
def test_wsam_gamma_zero_is_the_base_optimizer(decouple):
    out = ref("wsam", rho=0.3, gamma=0.0, decouple=decouple)
    close(flat(out["params"]), torch_run(base_rule, STEPS, *SGD_M)[0])


@pytest.mark.parametrize("base", BASES, ids=["sgd", "sgd_momentum", "adamw"])
def test_wsam_by_hand(base):
    rho, gamma = 0.3, 0.8
    a = gamma / (1 - gamma)

    def coupled(x, t):
        g0 = gq(x, t)
        return g0 + a * (sam_rule(rho)(x, t) - g0)

    out = ref("wsam", base=base, rho=rho, gamma=gamma, decouple=False)
    close(flat(out["params"]), torch_run(coupled, STEPS, *base)[0])

    # Decoupled: base step with g0, then w -= lr * a * (g1 - g0).
    x = torch.nn.Parameter(flat(P0).clone())
    opt = (torch.optim.SGD if base[0] == "sgd" else torch.optim.AdamW)([x], **base[1])
    for t in range(STEPS):
        w = x.detach().clone()
        g0, g1 = gq(w, t), sam_rule(rho)(w, t)
        x.grad = g0
        opt.step()
        with torch.no_grad():
            x -= base[1]["lr"] * a * (g1 - g0)
    out = ref("wsam", base=base, rho=rho, gamma=gamma, decouple=True)
    close(flat(out["params"]), x.detach())


def test_wsam_modes_agree_for_plain_sgd_and_differ_with_momentum():
    h = {"rho": 0.3, "gamma": 0.8}
    same = [flat(ref("wsam", base=SGD_PLAIN, decouple=d, **h)["params"]) for d in (False, True)]
    close(same[0], same[1])
    diff = [flat(ref("wsam", base=SGD_M, decouple=d, **h)["params"]) for d in (False, True)]
    assert (diff[0] - diff[1]).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------------------
# LookSAM


@pytest.mark.parametrize("base", BASES, ids=["sgd", "sgd_momentum", "adamw"])
def test_looksam_k1_is_sam(base):
    out = ref("looksam", base=base, rho=0.3, k=1, alpha=0.7, layerwise=False)
    close(flat(out["params"]), torch_run(sam_rule(0.3), STEPS, *base)[0])


def _looksam_rule(rho, k, alpha, layerwise):
    segs = segments() if layerwise else [slice(0, N)]
    store = {}

    def rule(x, t):
        g0 = gq(x, t)
        if t % k == 0:
            e = torch.zeros(N, dtype=F64)
            for s in segs:
                e[s] = asc(g0[s], rho)
            gs = gq(x + e, t)
            gv = torch.zeros(N, dtype=F64)
            for s in segs:
                gv[s] = gs[s] - (g0[s] @ gs[s]) / (g0[s].norm() ** 2 + EPS) * g0[s]
            store["gv"] = gv
            return gs
        g, gv = g0.clone(), store["gv"]
        for s in segs:
            g[s] = g0[s] + alpha * g0[s].norm() / (gv[s].norm() + EPS) * gv[s]
        return g

    return rule, store


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("base", BASES, ids=["sgd", "sgd_momentum", "adamw"])
def test_looksam_by_hand(base, layerwise):
    rule, store = _looksam_rule(0.3, 3, 0.7, layerwise)
    x, _ = torch_run(rule, STEPS, *base)
    out = ref("looksam", base=base, rho=0.3, k=3, alpha=0.7, layerwise=layerwise)
    close(flat(out["params"]), x)
    close(flat(out["variant_state"]["g_v"]), store["gv"])
    assert out["passes"] == [2, 1, 1, 2, 1]


@pytest.mark.parametrize("layerwise", [False, True])
def test_looksam_g_v_is_orthogonal_to_g0(layerwise):
    out = ref("looksam", steps=1, rho=0.3, k=2, alpha=0.7, layerwise=layerwise)
    gv, g0 = flat(out["variant_state"]["g_v"]), gq(flat(P0), 0)
    for s in segments() if layerwise else [slice(0, N)]:
        # Not exactly 0: eps in ||g0||^2 + eps leaves <g_v, g0> = <g0, g_s> * eps / (||g0||^2 + eps).
        assert abs(float(gv[s] @ g0[s])) < 1e-10 * float(gv[s].norm() * g0[s].norm())
    assert gv.norm() > 1e-3


def test_looksam_alpha_zero_reuse_steps_are_base_steps():
    def rule(x, t):
        return sam_rule(0.3)(x, t) if t % 2 == 0 else gq(x, t)

    out = ref("looksam", rho=0.3, k=2, alpha=0.0, layerwise=False)
    close(flat(out["params"]), torch_run(rule, STEPS, *SGD_M)[0])


def test_looksam_layerwise_k1_single_tensor_is_sam():
    p0 = [flat(P0)]
    out = run_reference("looksam", p0, loss_at, 3, "sgd", SGD_M[1], rho=0.3, k=1, alpha=0.5, layerwise=True)
    close(out["params"][0], torch_run(sam_rule(0.3), 3, *SGD_M)[0])


# ---------------------------------------------------------------------------------------------------------
# Momentum-SAM


@pytest.mark.parametrize("base", [SGD_M, ADAMW], ids=["sgd_momentum", "adamw"])
def test_msam_by_hand(base):
    rho = 0.2
    theta = torch.nn.Parameter(flat(P0).clone())
    opt = (torch.optim.SGD if base[0] == "sgd" else torch.optim.AdamW)([theta], **base[1])
    key = "momentum_buffer" if base[0] == "sgd" else "exp_avg"
    stored, c = flat(P0).clone(), 0.0
    for t in range(STEPS):
        g = gq(stored, t)
        if t > 0:
            close(theta.detach(), stored + c * opt.state[theta][key])  # the moved-back weights
        theta.grad = g
        opt.step()
        v = opt.state[theta][key]
        c = rho / (float(v.norm()) + 1e-12)
        stored = theta.detach() - c * v
    out = ref("msam", base=base, rho=rho)
    close(flat(out["params"]), stored)
    close(flat(out["variant_state"]["theta"]), theta.detach())
    assert out["variant_state"]["c"] == pytest.approx(c, rel=1e-12)


def test_msam_first_step_written_out():
    x0, lr = flat(P0), 0.1
    g = A @ x0 + C[0]  # momentum buffer after one step (no weight decay)
    theta1 = x0 - lr * g
    out = ref("msam", base=("sgd", {"lr": lr, "momentum": 0.9}), steps=1, rho=0.2)
    close(flat(out["params"]), theta1 - 0.2 / (g.norm() + 1e-12) * g)


@pytest.mark.parametrize("base", [SGD_M, ADAMW], ids=["sgd_momentum", "adamw"])
def test_msam_rho_zero_is_the_base_optimizer(base):
    out = ref("msam", base=base, rho=0.0)
    x = torch_run(base_rule, STEPS, *base)[0]
    close(flat(out["params"]), x)
    close(flat(out["variant_state"]["theta"]), x)


# ---------------------------------------------------------------------------------------------------------
# Friendly-SAM, GAM, C-Flat


def test_friendly_sam_sigma_zero_is_sam():
    out = ref("friendly_sam", base=ADAMW, rho=0.3, sigma=0.0, lmbda=0.9)
    close(flat(out["params"]), torch_run(sam_rule(0.3), STEPS, *ADAMW)[0])


@pytest.mark.parametrize("base", BASES, ids=["sgd", "sgd_momentum", "adamw"])
def test_friendly_sam_by_hand(base):
    rho, sigma, lmbda = 0.3, 1.0, 0.9
    store = {}

    def rule(x, t):
        g0 = gq(x, t)
        if t == 0:
            d, store["m"] = g0, g0.clone()
        else:
            d = g0 - sigma * store["m"]
            store["m"] = lmbda * store["m"] + (1 - lmbda) * g0
        return gq(x + asc(d, rho), t)

    out = ref("friendly_sam", base=base, rho=rho, sigma=sigma, lmbda=lmbda)
    close(flat(out["params"]), torch_run(rule, STEPS, *base)[0])
    close(flat(out["variant_state"]["m"]), store["m"])


def _four(x, t, rho, grad_norm_rho):
    g0 = gq(x, t)
    g1 = gq(x + asc(g0, rho), t)
    w2 = x + asc(g1 - g0, grad_norm_rho)
    g2 = gq(w2, t)
    g3 = gq(w2 + asc(g2, rho), t)
    return g0, g1, g2, g3


GAM = dict(rho=0.3, grad_norm_rho=0.2, grad_beta_1=0.6, grad_beta_2=-0.5, grad_beta_3=0.4, grad_gamma=0.1)


@pytest.mark.parametrize("base", BASES, ids=["sgd", "sgd_momentum", "adamw"])
def test_gam_by_hand(base):
    def rule(x, t):
        g0, g1, g2, g3 = _four(x, t, GAM["rho"], GAM["grad_norm_rho"])
        pro_m = g0 + abs(GAM["grad_beta_2"]) * g2
        d = GAM["grad_beta_1"] * g1 + GAM["grad_beta_3"] * g3
        cos = (pro_m @ d) / (d.norm() * pro_m.norm() + EPS)
        vertical = pro_m - cos * pro_m.norm() * d / (d.norm() + EPS)
        return d - GAM["grad_gamma"] * vertical

    out = ref("gam", base=base, **GAM)
    close(flat(out["params"]), torch_run(rule, STEPS, *base)[0])


def test_gam_reduces_to_sam():
    h = {**GAM, "grad_beta_1": 1.0, "grad_beta_3": 0.0, "grad_gamma": 0.0}
    out = ref("gam", **h)
    close(flat(out["params"]), torch_run(sam_rule(0.3), STEPS, *SGD_M)[0])


def test_gam_vertical_is_orthogonal_to_d():
    # One plain-SGD step with gamma = 1 minus one with gamma = 0 is lr * vertical, which is orthogonal to d.
    x = flat(P0)
    _, g1, _, g3 = _four(x, 0, GAM["rho"], GAM["grad_norm_rho"])
    d = GAM["grad_beta_1"] * g1 + GAM["grad_beta_3"] * g3
    w = [
        flat(ref("gam", base=SGD_PLAIN, steps=1, **{**GAM, "grad_gamma": gg})["params"]) for gg in (0.0, 1.0)
    ]
    vertical = (w[1] - w[0]) / 0.1
    assert vertical.norm() > 1e-3
    assert abs(float(vertical @ d)) < 1e-10 * float(vertical.norm() * d.norm())
    close(w[0], x - 0.1 * d)


@pytest.mark.parametrize("base", BASES, ids=["sgd", "sgd_momentum", "adamw"])
def test_cflat_by_hand(base):
    def rule(x, t):
        _, g1, g2, g3 = _four(x, t, 0.3, 0.2)
        return g1 + 0.25 * (g3 - g2)

    out = ref("cflat", base=base, rho=0.3, lamb=0.25, grad_norm_rho=0.2)
    close(flat(out["params"]), torch_run(rule, STEPS, *base)[0])
    assert out["variant_state"] == {}


def test_cflat_lamb_zero_is_sam():
    out = ref("cflat", rho=0.3, lamb=0.0, grad_norm_rho=0.2)
    close(flat(out["params"]), torch_run(sam_rule(0.3), STEPS, *SGD_M)[0])


@pytest.mark.parametrize("a0,k,t0,cof", [(8.0, 1.0, 2.0, 0.8), (1e6, 1.0, 0.0, 0.5), (0.0, 0.1, 80.0, 0.0)])
def test_cflat_plus_by_hand(a0, k, t0, cof):
    store = {"A": a0, "passes": []}

    def rule(x, t):
        g0 = gq(x, t)
        e = store["A"] / (1 + math.exp(-k * (t + 1 - t0))) - float(g0.norm())
        store["A"] -= cof * e
        if e > 0:
            store["passes"].append(1)
            return g0
        store["passes"].append(4)
        _, g1, g2, g3 = _four(x, t, 0.3, 0.2)
        return g1 + 0.25 * (g3 - g2)

    x, _ = torch_run(rule, STEPS, *SGD_M)
    out = ref("cflat", rho=0.3, lamb=0.25, grad_norm_rho=0.2, strategy="plus", A=a0, k=k, t0=t0, cof=cof)
    close(flat(out["params"]), x)
    assert out["passes"] == store["passes"]
    assert out["variant_state"]["A"] == pytest.approx(store["A"], rel=1e-12, abs=1e-12)
    if a0 == 1e6:
        assert out["passes"] == [1] * STEPS
    if a0 == 0.0:
        assert out["passes"] == [4] * STEPS


def test_cflat_plus_takes_both_branches():
    out = ref("cflat", rho=0.3, lamb=0.25, grad_norm_rho=0.2, strategy="plus", A=8.0, k=1.0, t0=2.0, cof=0.8)
    assert set(out["passes"]) == {1, 4}


# ---------------------------------------------------------------------------------------------------------
# RWP, interval SAM, SAM-ON, SSAM-F


@pytest.mark.parametrize("base", BASES, ids=["sgd", "sgd_momentum", "adamw"])
def test_rwp_by_hand(base):
    rho, alpha, seed = 0.05, 0.3, 7
    gen = torch.Generator().manual_seed(seed)

    def rule(x, t):
        noise = []
        for s, shape in zip(segments(), SHAPES):
            n = torch.randn(shape, generator=gen, dtype=F64)
            w = x[s].reshape(shape)
            scale = w.norm(dim=1, keepdim=True) if w.dim() >= 2 else w.norm()
            noise.append((n * rho * scale).reshape(-1))
        return alpha * gq(x + torch.cat(noise), t) + (1 - alpha) * gq(x, t)

    out = ref("rwp", base=base, rho=rho, alpha=alpha, generator_seed=seed)
    close(flat(out["params"]), torch_run(rule, STEPS, *base)[0])


@pytest.mark.parametrize("hyper", [{"rho": 0.0, "alpha": 0.5}, {"rho": 0.1, "alpha": 0.0}])
def test_rwp_limits_are_the_base_optimizer(hyper):
    out = ref("rwp", generator_seed=1, **hyper)
    close(flat(out["params"]), torch_run(base_rule, STEPS, *SGD_M)[0])


def test_interval_sam_by_hand():
    def rule(x, t):
        return sam_rule(0.3)(x, t) if t >= 1 and (t - 1) % 2 == 0 else gq(x, t)

    out = ref("interval_sam", base=ADAMW, rho=0.3, interval=2, start=1)
    close(flat(out["params"]), torch_run(rule, STEPS, *ADAMW)[0])
    assert out["passes"] == [1, 2, 1, 2, 1]


def test_interval_sam_limits():
    out = ref("interval_sam", rho=0.3, interval=1, start=0)
    close(flat(out["params"]), torch_run(sam_rule(0.3), STEPS, *SGD_M)[0])
    out = ref("interval_sam", rho=0.3, interval=1, start=STEPS)
    close(flat(out["params"]), torch_run(base_rule, STEPS, *SGD_M)[0])


def test_sam_on_limits_and_by_hand():
    out = ref("sam_on", rho=0.3, norm_mask=[True, True, True])
    close(flat(out["params"]), torch_run(sam_rule(0.3), STEPS, *SGD_M)[0])
    out = ref("sam_on", rho=0.3, norm_mask=[False, False, False])
    close(flat(out["params"]), torch_run(base_rule, STEPS, *SGD_M)[0])

    segs = segments()

    def rule(x, t):
        g0 = gq(x, t)
        keep = torch.zeros(N, dtype=F64)
        keep[segs[0]] = 1
        keep[segs[2]] = 1
        return gq(x + asc(keep * g0, 0.3), t)

    out = ref("sam_on", rho=0.3, norm_mask=[True, False, True])
    close(flat(out["params"]), torch_run(rule, STEPS, *SGD_M)[0])


def test_ssam_fisher_limits_and_by_hand():
    ones = [torch.ones(s, dtype=torch.bool) for s in SHAPES]
    out = ref("ssam_fisher", rho=0.3, masks=ones)
    close(flat(out["params"]), torch_run(sam_rule(0.3), STEPS, *SGD_M)[0])
    out = ref("ssam_fisher", rho=0.3, masks=[~m for m in ones])
    close(flat(out["params"]), torch_run(base_rule, STEPS, *SGD_M)[0])

    masks = [torch.rand(s, generator=torch.Generator().manual_seed(5)) > 0.5 for s in SHAPES]
    mflat = flat(masks).to(F64)
    assert 0 < mflat.sum() < N

    def rule(x, t):
        g0 = gq(x, t)
        return gq(x + 0.3 * mflat * g0 / (g0.norm() + EPS), t)  # the norm is over the unmasked g0

    out = ref("ssam_fisher", rho=0.3, masks=masks)
    close(flat(out["params"]), torch_run(rule, STEPS, *SGD_M)[0])


def test_fisher_mask():
    scores = [torch.tensor([[0.5, 0.1], [0.9, 0.3]]), torch.tensor([0.7, 0.2, 0.8])]
    # N = 7. sparsity 0.5 keeps round(3.5) = 4 (half to even): 0.9, 0.8, 0.7, 0.5.
    m = fisher_mask(scores, 0.5)
    assert m[0].dtype == torch.bool and m[0].shape == (2, 2) and m[1].shape == (3,)
    assert m[0].tolist() == [[True, False], [True, False]] and m[1].tolist() == [True, False, True]
    m = fisher_mask(scores, 0.3)  # round(4.9) = 5: adds 0.3
    assert m[0].tolist() == [[True, False], [True, True]] and m[1].tolist() == [True, False, True]
    assert sum(int(x.sum()) for x in fisher_mask(scores, 0.0)) == 7
    assert sum(int(x.sum()) for x in fisher_mask(scores, 1.0)) == 0
    # Ties: the element that comes first is kept.
    assert fisher_mask([torch.ones(4)], 0.5)[0].tolist() == [True, True, False, False]


def test_fisher_mask_random_against_threshold():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(s, generator=gen, dtype=F64) for s in [(7, 5), (11,), (3, 2, 2)]]
    total = 35 + 11 + 12
    for sparsity in (0.1, 0.5, 0.9):
        masks = fisher_mask(scores, sparsity)
        keep = round((1 - sparsity) * total)
        kept = torch.cat([s[m] for s, m in zip(scores, masks)])
        dropped = torch.cat([s[~m] for s, m in zip(scores, masks)])
        assert kept.numel() == keep
        assert kept.min() > dropped.max()
