"""Speed-ups that survive a shared machine: paired rounds, a spread goal, and a record of the load.

A speed-up of A over B is measured in rounds, each timing A and B back to back (the order
alternating), so a machine that slows down for a while slows both sides of the round; the
speed-up is the median of the per-round ratios ``time(B) / time(A)`` with its interquartile range.
Rounds go on until the half-width of that range is within ``target`` (±10%) of the median, after
at least ``min_rounds``, or until ``budget_s`` or ``max_rounds`` end it: a spread that stays wide
is reported as such (``converged`` False), never hidden behind one number.

Every measurement also records what else the machine was doing, from ``/proc/stat`` and this
process's CPU time (Linux; elsewhere the load fields are None):

* ``other_cores``: CPU time of the whole machine outside this process, per second of wall time
  (0.3 = a third of a core busy with other work, on average over the rounds);
* ``steal``: the share of the wall time the hypervisor gave this machine's CPUs to others;
* ``own_cores``: this process's CPU time per second of wall time (the threads it kept busy);
* ``loadavg``: the 1-minute load average before and after.

A measurement is flagged ``loaded`` when other work took at least a quarter of a core or steal at
least 5% of the time, beyond the counters' resolution (10 ms ticks: a window under a second
cannot tell a stray tick from load, and is not flagged on it): its ratio may be off, and the row
says so.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

LOADED_OTHER_CORES = 0.25
LOADED_STEAL = 0.05


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _proc_stat() -> Optional[tuple[float, float]]:
    """(busy, steal) seconds of the whole machine since boot, or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    user, nice, system, idle, iowait, irq, softirq = ticks[:7]
    steal = ticks[7] if len(ticks) > 7 else 0
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


@dataclass
class Snapshot:
    wall: float
    own_cpu: float
    machine: Optional[tuple[float, float]]
    loadavg: Optional[float]

    @staticmethod
    def now() -> Snapshot:
        times = os.times()
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = None
        return Snapshot(time.perf_counter(), times.user + times.system, _proc_stat(), load)


def load_between(start: Snapshot, end: Snapshot) -> dict:
    """What the machine did between two snapshots (see the module docstring)."""
    wall = max(end.wall - start.wall, 1e-9)
    own = end.own_cpu - start.own_cpu
    out = {"wall_s": wall, "own_cores": own / wall, "other_cores": None, "steal": None,
           "loadavg": (start.loadavg, end.loadavg)}  # fmt: skip
    if start.machine is not None and end.machine is not None:
        busy = end.machine[0] - start.machine[0]
        out["other_cores"] = max(0.0, busy - own) / wall
        out["steal"] = (end.machine[1] - start.machine[1]) / wall
        # The counters tick at 100 Hz: a window of a few ms reads one stray tick as a busy core.
        # Two ticks (one per counter) of uncertainty, per second of wall time.
        out["resolution"] = 2.0 / os.sysconf("SC_CLK_TCK") / wall
    return out


def is_loaded(load: dict) -> bool:
    """Other work or steal past its threshold by more than the counters' resolution."""
    other, steal, resolution = load.get("other_cores"), load.get("steal"), load.get("resolution", 0.0)
    return (other is not None and other - resolution >= LOADED_OTHER_CORES) or (
        steal is not None and steal - resolution >= LOADED_STEAL
    )


@dataclass
class Paired:
    """The per-round speed-ups of ``provider`` over ``base`` and how they were measured."""

    ratios: list[float] = field(default_factory=list)  # time(base) / time(provider), per round
    base_s: list[float] = field(default_factory=list)  # wall time of each side, per round
    provider_s: list[float] = field(default_factory=list)
    load: dict = field(default_factory=dict)
    target: float = 0.10

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def quartiles(self) -> tuple[float, float]:
        if len(self.ratios) < 2:
            return self.ratios[0], self.ratios[0]
        q = statistics.quantiles(self.ratios, n=4, method="inclusive")
        return q[0], q[2]

    @property
    def spread(self) -> float:
        """Half the interquartile range, relative to the median (0.1 = ±10%)."""
        q25, q75 = self.quartiles
        return (q75 - q25) / (2 * self.median)

    @property
    def converged(self) -> bool:
        return self.spread <= self.target

    @property
    def loaded(self) -> bool:
        return is_loaded(self.load)

    def describe(self) -> str:
        q25, q75 = self.quartiles
        notes = []
        if not self.converged:
            notes.append(f"spread ±{self.spread:.0%} > ±{self.target:.0%}: wide")
        if self.loaded:
            notes.append(
                f"LOADED: other work {self.load['other_cores']:.2f} cores, steal {self.load['steal']:.0%}"
            )
        text = f"{self.median:6.2f}x [{q25:.2f}, {q75:.2f}] ±{self.spread:.0%} ({len(self.ratios)} rounds)"
        return text + (f"  {'; '.join(notes)}" if notes else "")


def paired_speedup(
    base: Callable[[], None],
    provider: Callable[[], None],
    device,
    *,
    min_rounds: int = 5,
    max_rounds: int = 41,
    budget_s: float = 20.0,
    target: float = 0.10,
) -> Paired:
    """Speed-up of ``provider`` over ``base`` in paired rounds (see the module docstring), after one
    warm-up call of each."""
    base(), provider()
    synchronize(device)
    result = Paired(target=target)
    start = Snapshot.now()
    for r in range(max_rounds):
        times = {}
        order = (
            (("base", base), ("provider", provider))
            if r % 2 == 0
            else (("provider", provider), ("base", base))
        )
        for name, fn in order:
            synchronize(device)
            tic = time.perf_counter()
            fn()
            synchronize(device)
            times[name] = time.perf_counter() - tic
        result.base_s.append(times["base"])
        result.provider_s.append(times["provider"])
        result.ratios.append(times["base"] / times["provider"])
        spent = time.perf_counter() - start.wall
        if len(result.ratios) >= min_rounds and (result.converged or spent >= budget_s):
            break
    result.load = load_between(start, Snapshot.now())
    return result


def cache_sizes() -> dict:
    """Bytes of this machine's data caches by level (``{"L1d": ..., "L2": ..., "L3": ...}``, the
    largest per level), from sysfs; empty where it cannot be read."""
    sizes: dict = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        value = int(text.rstrip("KMG")) * scale
        name = f"L{level}" + ("d" if kind == "Data" else "")
        sizes[name] = max(value, sizes.get(name, 0))
    return sizes


def last_level_cache() -> Optional[int]:
    sizes = cache_sizes()
    return max(sizes.values()) if sizes else None
