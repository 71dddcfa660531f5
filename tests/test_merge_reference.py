"""Self-tests of tests/merge_reference.py on small cases whose results are worked out by hand below."""

from __future__ import annotations

import pytest
import torch
from merge_reference import fisher_merge_ref, task_arithmetic_ref, ties_ref

F32 = torch.float32


def sd(**entries) -> dict:
    """A state_dict of float32 tensors from lists; ints become an int64 0-d buffer."""
    return {k: torch.tensor(v, dtype=torch.int64 if isinstance(v, int) else F32) for k, v in entries.items()}


def snapshot(dicts: list[dict]) -> list[dict]:
    return [{k: v.clone() for k, v in d.items()} for d in dicts]


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# Task arithmetic


def test_task_arithmetic_list_and_scalar_scale_and_int_buffer():
    base = sd(a=[1.0, 2.0], n=7)
    experts = [sd(a=[2.0, 2.0], n=100), sd(a=[1.0, 5.0], n=200)]
    before = snapshot([base, *experts])
    # tau_1 = [1, 0], tau_2 = [0, 3]
    # list [0.5, 2]: [1 + 0.5*1 + 2*0, 2 + 0.5*0 + 2*3] = [1.5, 8]
    out = task_arithmetic_ref(base, experts, [0.5, 2.0])
    assert_same(out, sd(a=[1.5, 8.0], n=7))  # the integer buffer comes from base
    # scalar 0.5: [1 + 0.5, 2 + 1.5] = [1.5, 3.5]
    assert_same(task_arithmetic_ref(base, experts, 0.5), sd(a=[1.5, 3.5], n=7))
    assert_same(base, before[0])  # inputs unchanged
    for e, b in zip(experts, before[1:]):
        assert_same(e, b)
    out["n"] += 1  # outputs do not alias the inputs
    assert base["n"].item() == 7


def test_task_arithmetic_accumulates_in_float64():
    # float16 spacing on [512, 1024) is 0.5. Two experts at 1000.5 with scale 0.5 add 0.25 twice.
    # In float64: 1000 + 0.25 + 0.25 = 1000.5 exactly. Stepwise in float16, 1000.25 would round to even
    # (1000) each time and the result would stay 1000.
    base = {"a": torch.tensor([1000.0], dtype=torch.float16)}
    experts = [{"a": torch.tensor([1000.5], dtype=torch.float16)}] * 2
    out = task_arithmetic_ref(base, experts, 0.5)
    assert out["a"].dtype == torch.float16
    assert out["a"].item() == 1000.5


def test_task_arithmetic_rejects_wrong_number_of_scales():
    with pytest.raises(ValueError):
        task_arithmetic_ref(sd(a=[0.0]), [sd(a=[1.0])] * 2, [1.0])


# ----------------------------------------------------------------------------------------------------------
# TIES


def test_ties_sign_conflict_and_zero_sum_element():
    # 4 floating elements over two tensors, P = 4; density 0.5 -> m = 2 per expert, over the whole model.
    base = sd(a=[1.0, 2.0], b=[0.0, -1.0], n=3)
    taus = [[4.0, -1.0, 3.0, 0.5], [3.0, 3.0, -3.0, 1.0], [-1.0, -5.0, 0.5, 2.0]]
    experts = [sd(a=[1 + t[0], 2 + t[1]], b=[0 + t[2], -1 + t[3]], n=99) for t in taus]
    before = snapshot([base, *experts])
    # TRIM  tau_1 |.| = [4, 1, 3, .5]: 2nd largest 3 -> [4, 0, 3, 0]
    #       tau_2 |.| = [3, 3, 3, 1]:  2nd largest 3 -> [3, 3, -3, 0]   (tie at the threshold: 3 kept)
    #       tau_3 |.| = [1, 5, .5, 2]: 2nd largest 2 -> [0, -5, 0, 2]
    # ELECT sums = [7, -2, 0, 2] -> s = [+, -, 0, +]; majority = sign(1 - 1 + 0 + 1) = +1 -> s = [+, -, +, +]
    # MEAN  e0: (4 + 3) / 2 = 3.5;  e1: only -5 agrees -> -5 (3 conflicts);  e2 (zero sum): only +3 -> 3;
    #       e3: 2  -> merged = [3.5, -5, 3, 2]
    # scale 0.5: a = [1 + 1.75, 2 - 2.5] = [2.75, -0.5]; b = [0 + 1.5, -1 + 1] = [1.5, 0]
    out = ties_ref(base, experts, density=0.5, scale=0.5)
    assert_same(out, sd(a=[2.75, -0.5], b=[1.5, 0.0], n=3))
    for d, b in zip([base, *experts], before):
        assert_same(d, b)


def test_ties_negative_majority_and_nonzero_count():
    # density 1: nothing trimmed (m = P = 4). Base 0, so theta = scale * merged.
    base = sd(a=[0.0, 0.0, 0.0, 0.0])
    experts = [sd(a=[1.0, -2.0, -1.0, 0.0]), sd(a=[-1.0, -1.0, 0.0, 0.0])]
    # sums = [0, -3, -1, 0] -> s = [0, -, -, 0]; majority = sign(-2) = -1 -> s = [-, -, -, -]
    # e0: only -1 agrees -> -1;  e1: (-2 - 1) / 2 = -1.5;  e2: -1 (the 0 of expert 2 is not counted);
    # e3: no non-zero value -> 0.   scale 2 -> [-2, -3, -2, 0]
    assert_same(ties_ref(base, experts, density=1.0, scale=2.0), sd(a=[-2.0, -3.0, -2.0, 0.0]))


def test_ties_majority_zero_defaults_to_plus():
    base = sd(a=[0.0, 0.0])
    experts = [sd(a=[1.0, -1.0]), sd(a=[-1.0, 1.0])]
    # sums = [0, 0] -> s = [0, 0]; majority = sign(0) = 0 -> +1; each element keeps only its +1 -> [1, 1]
    assert_same(ties_ref(base, experts, density=1.0, scale=1.0), sd(a=[1.0, 1.0]))


def test_ties_trims_over_the_whole_model_and_rounds_m():
    base = sd(a=[0.0, 0.0], b=[0.0])
    experts = [sd(a=[1.0, 2.0], b=[0.5])]
    # P = 3; density 0.34 -> round(1.02) = 1: only |2| survives. A per-tensor trim would keep b's 0.5.
    assert_same(ties_ref(base, experts, density=0.34, scale=1.0), sd(a=[0.0, 2.0], b=[0.0]))
    # density 0.5 -> round(1.5) = 2: keep 2 and 1.
    assert_same(ties_ref(base, experts, density=0.5, scale=1.0), sd(a=[1.0, 2.0], b=[0.0]))
    # density 0.01 -> round(0.03) = 0 -> m = max(1, 0) = 1.
    assert_same(ties_ref(base, experts, density=0.01, scale=1.0), sd(a=[0.0, 2.0], b=[0.0]))
    # P = 5, density 0.5 -> round(2.5) = 2 (Python rounds halves to even): keep |5| and |4| only.
    base5 = sd(a=[0.0] * 5)
    assert_same(ties_ref(base5, [sd(a=[1.0, 5.0, 3.0, 4.0, 2.0])], 0.5, 1.0), sd(a=[0.0, 5.0, 0.0, 4.0, 0.0]))


# ----------------------------------------------------------------------------------------------------------
# Fisher merging


def test_fisher_merge_with_zero_fisher_and_missing_key():
    experts = [sd(w=[1.0, 2.0, 3.0], bias=[0.0], n=5), sd(w=[3.0, 6.0, 5.0], bias=[4.0], n=9)]
    fishers = [{"w": torch.tensor([1.0, 0.0, 0.0])}, {"w": torch.tensor([3.0, 2.0, 0.0])}]
    before = snapshot(experts + fishers)
    # Default weights [1, 1]:
    # w0: (1*1 + 3*3) / (1 + 3) = 2.5;  w1: (0*2 + 2*6) / 2 = 6;  w2: sum F = 0 -> (3 + 5) / 2 = 4
    # bias has no Fisher: (0 + 4) / 2 = 2;  n copied from experts[0]
    assert_same(fisher_merge_ref(experts, fishers), sd(w=[2.5, 6.0, 4.0], bias=[2.0], n=5))
    # Weights [3, 1]:
    # w0: (3*1*1 + 1*3*3) / (3*1 + 1*3) = 12 / 6 = 2;  w1: (1*2*6) / (1*2) = 6;  w2: (3*3 + 1*5) / 4 = 3.5
    # bias: (3*0 + 1*4) / 4 = 1
    out = fisher_merge_ref(experts, fishers, weights=[3.0, 1.0])
    assert_same(out, sd(w=[2.0, 6.0, 3.5], bias=[1.0], n=5))
    for d, b in zip(experts + fishers, before):
        assert_same(d, b)


def test_fisher_merge_rejects_key_in_some_fishers_only():
    experts = [sd(w=[1.0]), sd(w=[2.0])]
    with pytest.raises(KeyError):
        fisher_merge_ref(experts, [{"w": torch.tensor([1.0])}, {}])
