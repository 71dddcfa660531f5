"""Plans kept between estimates: the probe runs once per model, the self-check every time.

A plan (each layer's route, the layers expanded to the batch, the parameters taken at the model
level) depends on the model's structure and the shapes of what it is fed, mostly not on its
weights: within one estimate every batch after the first already reuses it. Continual learning
estimates the Fisher of the same model after every task (online EWC every few hundred steps),
where probing again costs as much as a large share of the estimate (bench_fisher's transformer:
41 ms of probe in 4 batches of 128). So the last plan of each model is kept, and reused while a
guard holds:

- the model: every module (its name, identity, class, mode, ``extra_repr``, the identities of its
  forward hooks and of a ``forward`` set on the instance) and every parameter that requires grad
  (name, identity, shape, dtype, device) are the same;
- the first batch of two or more samples has the same tensors (shapes, dtypes, devices) and the
  same plain values (numbers, strings, flags) as the batch the plan was made on;
- the autograd graph of that batch's forward has the same operations, edges and parameters as it
  had then (:func:`inspect`; a flag read in ``forward`` or a weight used outside its
  layer changes it, which no module attribute shows);
- the self-check, which runs on every estimate (reuse needs ``verify=True``), moves no layer.

Where the graph or the self-check fails, the estimate plans afresh on the same batch, so a reused
plan gives the numbers a fresh one gives. The guards alone are not enough: the graph does not
record an operation's arguments (a permutation read from an attribute turns block rows into
interleaved ones), and a model whose samples start to interact as a weight leaves zero passes
every guard; the self-check catches both (review of cd2254f). A plan that rests on the weights is
not kept (:func:`inspect`): a layout that no gradient reached when probed on an output the graph
uses (a zero-initialised adapter), or a parameter taken per layer that the graph consumes twice,
or at all for a cut recurrent layer (its coverage check could have passed on a zero
contribution). Nor is one that had to plan again part-way (a layer first run in a later batch).
The plan is keyed weakly by the model and names modules by their qualified names, so it neither
keeps a model alive nor holds its modules.
"""

from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

__all__ = [
    "Plan",
    "model_signature",
    "batch_signature",
    "recall",
    "keep",
    "forget",
    "inspect",
    "snapshot",
    "restore",
]

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_PLAIN = (bool, int, float, complex, str, bytes, type(None))


@dataclass
class Plan:
    """An engine's plan with modules named by their qualified names."""

    model: tuple  # model_signature at planning time
    batch: tuple  # batch_signature of the planning batch
    graph: tuple  # the graph's signature (inspect) of the first batch's forward
    routes: dict  # qualified module name -> Route
    expand: dict  # qualified module name -> (how, rank)
    model_level: dict  # parameter name -> level
    warned: set = field(default_factory=set)


def model_signature(model: nn.Module, named: list) -> tuple:
    """What the plan's validity depends on in the model (the module docstring's first guard)."""
    modules = tuple(
        (
            name,
            id(m),
            type(m),
            m.training,
            m.extra_repr(),
            tuple(m._forward_hooks),
            tuple(m._forward_pre_hooks),
            id(vars(m).get("forward")),
        )
        for name, m in model.named_modules()
    )
    params = tuple((name, id(p), tuple(p.shape), p.dtype, p.device) for name, p in named)
    return modules, params


def batch_signature(batch) -> tuple:
    """The planning batch's tensors by shape, dtype and device; plain values by value; other
    objects by type."""
    leaves, spec = tree_flatten((batch.args, batch.kwargs))

    def describe(leaf):
        if isinstance(leaf, Tensor):
            return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device)
        if isinstance(leaf, _PLAIN):
            return ("value", type(leaf), leaf)
        return ("object", type(leaf))

    return str(spec), tuple(describe(leaf) for leaf in leaves)


def _walk(output: Tensor) -> tuple:
    """The autograd graph behind ``output`` as rows (operation, the parameter it accumulates into
    by identity, edges), breadth first, and the set of (node, output slot) pairs it reaches. The
    rows are the graph's signature: a forward that takes another path (a flag read in
    ``forward``, a weight used outside its layer, another head) changes them, which the module
    guard cannot see."""
    root = output.grad_fn
    if root is None:
        return (), set()
    order, queue, rows, reached = {root: 0}, [root], [], {(root, output.output_nr)}
    for node in queue:  # the queue grows while it is walked
        edges = []
        for child, slot in node.next_functions:
            if child is None:
                edges.append(None)
                continue
            reached.add((child, slot))
            if child not in order:
                order[child] = len(queue)
                queue.append(child)
            edges.append((order[child], slot))
        variable = getattr(node, "variable", None)
        rows.append((type(node).__name__, 0 if variable is None else id(variable), tuple(edges)))
    return tuple(rows), reached


def inspect(engine, capture, output: Tensor) -> tuple:
    """``(the graph's signature, trusted)`` for the engine's plan and the forward that made
    ``capture``: trusted unless the plan rests on the weights, i.e. a layer output whose layout
    no gradient reached when probed is on the graph (a zero-initialised adapter's: trained
    weights would reach it; an output the model never uses, as an LSTM's final states, is
    fine), or a parameter taken per layer has two consumers in the graph (the coverage check,
    which is numeric, could have passed on a second use that contributed zero)."""
    rows, reached = _walk(output)
    for module, route in engine.routes.items():
        if route.proven is None or all(route.proven):
            continue
        calls = capture.calls.get(module, [])
        if len(calls) != 1 or len(calls[0].outputs) != len(route.proven):
            return rows, False
        for t, proven in zip(calls[0].outputs, route.proven):
            if not proven and t.grad_fn is not None and (t.grad_fn, t.output_nr) in reached:
                return rows, False
    # A cut recurrent layer (recurrent.cut_recurrent) is not in the graph: any of its parameters
    # that is, is used outside it (the count of two below would miss it).
    cut = {id(p) for m in capture.cut for p in m.parameters()}
    if any(variable in cut for _, variable, _ in rows):
        return rows, False
    counts: dict = {}
    for _, _, edges in rows:
        for edge in edges:
            if edge is not None:
                counts[edge[0]] = counts.get(edge[0], 0) + 1
    twice = {rows[i][1] for i, c in counts.items() if c > 1 and rows[i][1]}
    per_layer = (p for n, p in engine.params.items() if n not in engine.model_level)
    return rows, not any(id(p) in twice for p in per_layer)


def recall(model: nn.Module, signature: tuple):
    """The kept plan of ``model`` if its model guard holds, else None (and it is dropped)."""
    with _LOCK:
        plan = _KEPT.get(model)
        if plan is not None and plan.model != signature:
            del _KEPT[model]
            plan = None
    return plan


def keep(model: nn.Module, plan) -> None:
    """Keeps ``plan`` for the next estimate of ``model``; None drops the kept one."""
    with _LOCK:
        if plan is None:
            _KEPT.pop(model, None)
        else:
            _KEPT[model] = plan


def forget(model: nn.Module) -> None:
    """Drops the kept plan of ``model`` (the next estimate plans afresh)."""
    keep(model, None)


def snapshot(engine, model_sig: tuple, batch_sig: tuple, graph_sig: tuple):
    """The engine's plan, with modules by name (deep-copied: later demotions of the engine do not
    reach it)."""
    name = engine.qualified
    return Plan(
        model=model_sig,
        batch=batch_sig,
        graph=graph_sig,
        routes={name[m]: copy.deepcopy(r) for m, r in engine.routes.items()},
        expand={name[m]: how for m, how in engine.expand.items()},
        model_level=dict(engine.model_level),
        warned=set(engine.warned),
    )


def restore(engine, plan: Plan) -> None:
    """Puts a kept plan into a fresh engine of the same model."""
    modules = {n: m for m, n in engine.qualified.items()}
    engine.routes = {modules[n]: copy.deepcopy(r) for n, r in plan.routes.items()}
    engine.expand = {modules[n]: how for n, how in plan.expand.items()}
    engine.model_level = dict(plan.model_level)
    engine.warned = set(plan.warned)
    engine.planned = True
