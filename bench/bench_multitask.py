"""Multi-task optimisation, optimizer side: one combine, one multi-task step, one F-MTL step.

Ops, for T = 2, 4, 8 tasks on the parameter sets of ``harness.py`` (fp32):

``combine``     T task-gradient lists -> the combined gradient (pcgrad, cagrad). Providers: a
                ``torch.cat`` reference (flatten the T lists into ``T x |W|``, Gram by a matrix
                product, the same T x T solver, ``a @ flat``, split back: the form of the official
                F-MTL code and INFTY) and ``cl_optim.multitask.combine`` on each backend (one fused
                Gram pass, one fused weighted sum). Floor: ``2T + 1`` passes of 4 B per element.
``mtl_step``    the gradient filtering step of INFTY 0.1.2 (``PCGrad``/``CAGrad``: T backwards into
                ``.grad``, ``torch.cat`` into ``T x |W|``, the projections on the flat rows with a
                host read per pair, the result written back, ``delay=True``: no base update) against
                cl_optim: T ``autograd.grad`` calls, ``combine`` written into ``.grad``. Same losses.
``fmtl_step``   one F-MTL step with AdamW (``cl_optim.MultiTaskSAM`` over ``cl_optim.AdamW``) against an
                unfused ``torch.cat`` implementation of the official algorithm over ``torch.optim.AdamW``
                (flat copies of g_t, e_t, ĝ_t and h_t, a ``.item()`` per task scale), and ``closure``: the
                1 + T forwards and 2T backwards alone, the part both spend on the model.

The losses are synthetic and cheap, so the optimizer's work is what is timed: with one shared
direction ``c`` and per-task scalars, ``L_t(w) = a_t <c, w> + s_t/2 <w, w>`` (gradient
``a_t c + s_t w``: dense, different per task, conflicting where the ``a_t`` differ in sign; a
forward is two dot products whatever T). Peak memory: the bytes a step allocates (CPU, from the
profiler) or the allocator's peak above what was in use (CUDA).

    python bench/bench_multitask.py [--quick] [--device cuda] [--sets resnet18 transformer] [--tasks 2 4 8]
"""

from __future__ import annotations

import sys
import time

import torch
from harness import (
    DEFAULT_SETS,
    PARAM_SETS,
    Case,
    _versions,
    append_rows,
    cl_optim_backends,
    device_name,
    make_params,
    numel,
    paired_rows,
    parse_args,
    run,
)

import cl_optim
from cl_optim.multitask import coefficients

try:  # INFTY is optional (it pulls torchvision): `pip install --no-deps infty==0.1.2`
    from infty.optim.gradient_filtering.cagrad import CAGrad as InftyCAGrad
    from infty.optim.gradient_filtering.pcgrad import PCGrad as InftyPCGrad
except ImportError:
    InftyCAGrad = InftyPCGrad = None

METHODS = {"pcgrad": {"shuffle": False}, "cagrad": {"c": 0.4}}


class Synthetic:
    """T task losses over a parameter list: ``L_t = a_t <c, w> + s_t/2 <w, w>`` (see the docstring)."""

    def __init__(self, params, tasks: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.params = params
        self.direction = [torch.randn(p.shape, generator=gen).to(p.device) * 1e-2 for p in params]
        signs = torch.tensor([(-1.0) ** t for t in range(tasks)])
        self.a = (signs * (1 + torch.rand(tasks, generator=gen))).tolist()
        self.s = (1e-3 * (1 + torch.rand(tasks, generator=gen))).tolist()

    def losses(self):
        dot = sum((c * p).sum() for c, p in zip(self.direction, self.params))
        square = sum((p * p).sum() for p in self.params)
        return [a * dot + 0.5 * s * square for a, s in zip(self.a, self.s)]

    def task_grads(self):
        return [
            [(a * c + s * p).detach() for c, p in zip(self.direction, self.params)]
            for a, s in zip(self.a, self.s)
        ]


# ------------------------------------------------------------------------------ references


def cat_combine(task_grads, method, options):
    """The ``torch.cat`` form: a flat ``T x |W|`` copy, Gram by matmul, the same T x T rule."""
    flat = torch.stack([torch.cat([g.reshape(-1) for g in grads]) for grads in task_grads])
    a = coefficients((flat @ flat.t()).double(), method, **options).to(flat.dtype)  # fp32 Gram, as theirs
    combined = a @ flat
    out, at = [], 0
    for g in task_grads[0]:
        out.append(combined[at : at + g.numel()].view_as(g))
        at += g.numel()
    return out


class CatFMTL:
    """Unfused F-MTL as the official code writes it (flat copies, one host read per task scale)."""

    def __init__(self, params, method, options, rho=0.05, **adamw):
        self.params, self.method, self.options, self.rho = params, method, options, rho
        self.base = torch.optim.AdamW(params, **adamw)

    def _flat(self, grads):
        return torch.cat([g.reshape(-1) for g in grads])

    def step(self, closure):
        losses = closure()
        t_count = len(losses)
        g = [self._flat(torch.autograd.grad(loss, self.params, retain_graph=True)) for loss in losses]
        old = self._flat([p.detach() for p in self.params]).clone()
        h = []
        for t in range(t_count):
            scale = self.rho / (g[t].norm().item() + 1e-12)
            e = g[t] * scale
            self._assign(old + e)
            hat = self._flat(torch.autograd.grad(closure()[t], self.params))
            h.append(hat - g[t])
        self._assign(old)
        gs, hs = torch.stack(g), torch.stack(h)
        a = coefficients((gs @ gs.t()).double(), self.method, **self.options).float()
        b = coefficients((hs @ hs.t()).double(), self.method, **self.options).float()
        total = a @ gs + b @ hs
        at = 0
        for p in self.params:
            p.grad = total[at : at + p.numel()].view_as(p).clone()
            at += p.numel()
        self.base.step()

    def _assign(self, flat):
        at = 0
        with torch.no_grad():
            for p in self.params:
                p.copy_(flat[at : at + p.numel()].view_as(p))
                at += p.numel()


# ----------------------------------------------------------------------------------- cases


def _combine_case(set_name, shapes, tasks, method, device, backends):
    def providers():
        params = make_params(shapes, device)
        grads = Synthetic(params, tasks).task_grads()
        options = METHODS[method]
        out = {"torch_cat": lambda: lambda: cat_combine(grads, method, options)}
        for backend in backends:
            out[f"cl_optim_{backend}"] = lambda backend=backend: (
                lambda: cl_optim.multitask.combine(grads, method, backend=backend, **options)
            )
        return out

    return Case(
        f"combine_{method}_T{tasks}",
        set_name,
        numel(shapes),
        4.0 * (2 * tasks + 1),
        providers(),
        ["torch_cat"],
    )


def _mtl_step_case(set_name, shapes, tasks, method, device, backend):
    def infty():
        params = make_params(shapes, device)
        synthetic = Synthetic(params, tasks)
        base = torch.optim.SGD(params, lr=0.0)
        cls = {"pcgrad": InftyPCGrad, "cagrad": InftyCAGrad}[method]
        opt = cls(params, base, None, {"calpha": 0.4, "rescale": 1} if method == "cagrad" else {})
        return lambda: opt.step(closure=lambda: (None, synthetic.losses()), delay=True)

    def ours():
        params = make_params(shapes, device)
        synthetic = Synthetic(params, tasks)

        def step():
            losses = synthetic.losses()
            grads = [
                list(torch.autograd.grad(loss, params, retain_graph=t < tasks - 1))
                for t, loss in enumerate(losses)
            ]
            out = [p.grad for p in params]
            cl_optim.multitask.weighted_sum(
                grads,
                coefficients(cl_optim.multitask.gram(grads, backend=backend), method, **METHODS[method]),
                out=out,
                backend=backend,
            )

        return step

    providers = {f"cl_optim_{backend}": ours}
    if InftyPCGrad is not None:
        providers = {"infty": infty, **providers}
    return Case(f"mtl_step_{method}_T{tasks}", set_name, numel(shapes), None, providers, ["infty"])


def _fmtl_case(set_name, shapes, tasks, method, device, backend):
    adamw = dict(lr=1e-3, weight_decay=1e-2)

    def ours():
        params = make_params(shapes, device)
        synthetic = Synthetic(params, tasks)
        opt = cl_optim.MultiTaskSAM(params, cl_optim.AdamW, rho=0.05, aggregator=method, shared=params,
                                    aggregator_options=METHODS[method], backend=backend, **adamw)  # fmt: skip
        return lambda: opt.step(synthetic.losses)

    def reference():
        params = make_params(shapes, device)
        synthetic = Synthetic(params, tasks)
        opt = CatFMTL(params, method, METHODS[method], **adamw)
        return lambda: opt.step(synthetic.losses)

    def closure_only():
        params = make_params(shapes, device)
        synthetic = Synthetic(params, tasks)

        def step():
            losses = synthetic.losses()
            for t, loss in enumerate(losses):
                torch.autograd.grad(loss, params, retain_graph=t < tasks - 1)
            for t in range(tasks):
                torch.autograd.grad(synthetic.losses()[t], params)

        return step

    providers = {"torch_cat_fmtl": reference, f"cl_optim_{backend}": ours, "closure_only": closure_only}
    return Case(f"fmtl_{method}_T{tasks}", set_name, numel(shapes), None, providers, ["torch_cat_fmtl"])


def main(argv=None):
    parser_args = list(sys.argv[1:] if argv is None else argv)
    tasks = [2, 4, 8]
    if "--tasks" in parser_args:
        at = parser_args.index("--tasks")
        values = []
        for item in parser_args[at + 1 :]:
            if item.startswith("--"):
                break
            values.append(int(item))
        tasks = values
        del parser_args[at : at + 1 + len(values)]
    args = parse_args(__doc__.splitlines()[0], parser_args)
    if args.sets == list(DEFAULT_SETS):
        args.sets = ["resnet18", "transformer"]
    device = args.device
    backends = cl_optim_backends(device)
    fastest = backends[0]
    cases = []
    for set_name in args.sets:
        shapes = PARAM_SETS[set_name](args.quick)
        for t in tasks if not args.quick else [2]:
            for method in METHODS:
                cases.append(_combine_case(set_name, shapes, t, method, device, backends))
                cases.append(_mtl_step_case(set_name, shapes, t, method, device, fastest))
            cases.append(_fmtl_case(set_name, shapes, t, "pcgrad", device, fastest))
    for case in cases:
        case.min_reps, case.budget_s = (2, 0.2) if args.quick else (5, 1.5)
    rows = run(cases, device, args.csv, "Multi-task: combine, gradient-filtering step, F-MTL step (fp32)")
    rows += _paired(cases, device, fastest, args)
    return rows


def _paired(cases, device, fastest, args) -> list:
    """The headline ratios again in paired rounds (``harness.paired_rows``: median and quartiles of
    per-round ratios, rounds until ±10% or the budget, the machine's load, the bytes against the
    cache), the fastest cl_optim backend against each case's first baseline."""
    ours = f"cl_optim_{fastest}"
    stamp = {"device": device_name(device), **_versions(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"\npaired rounds: speed-up of {ours}, median [p25, p75] of per-round ratios, ±half the range")
    out = []
    for case in cases:
        if ours in case.providers:
            out += paired_rows(case, None, device, stamp, ours=ours, against=case.baselines[:1])
    return append_rows(args.csv, out)


if __name__ == "__main__":
    main()
