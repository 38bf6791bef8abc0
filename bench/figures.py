"""Rounds of a benchmark: each variant measured once per round, interleaved, so a figure and its
baseline share the machine's load; printed as median and range, with the ratio of each round."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def load() -> str:
    """The 1-minute load average, to print beside figures (other work skews them)."""
    return f"load {os.getloadavg()[0]:.1f}"


def timed(work: Callable[[], object]) -> float:
    """Seconds `work()` takes."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def spread(values: list[float], fmt: str = ",.0f") -> str:
    """`median (min–max)` of `values`."""
    return (
        f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"
        if len(values) > 1
        else f"{values[0]:{fmt}}"
    )


class Rounds:
    """Rates (units per second) of named variants, one sample per variant per round."""

    def __init__(self) -> None:
        self.rates: dict[str, list[float]] = {}
        self.cpu_us: dict[str, list[float]] = {}  # this process's CPU per unit, in µs
        self.loads: list[float] = []

    def measure(self, label: str, units: int, work: Callable[[], object]) -> float:
        """Run `work` once, record `units / seconds` under `label`; return the rate.

        Also records this process's CPU time per unit (client-side work: less swayed by the
        machine's load than the rate, which waits on the server and on other processes).
        """
        cpu = time.process_time()
        rate = units / timed(work)
        self.cpu_us.setdefault(label, []).append((time.process_time() - cpu) / units * 1e6)
        self.rates.setdefault(label, []).append(rate)
        self.loads.append(os.getloadavg()[0])
        return rate

    def report(self, label: str, baseline: str, goal: float | None = None) -> dict[str, object]:
        """Print `label` against `baseline`: both rates and the per-round ratio, median (range)."""
        ours, base = self.rates[label], self.rates[baseline]
        ratios = [o / b for o, b in zip(ours, base, strict=True)]
        aim = f" (goal >= {goal:.2f})" if goal is not None else ""
        print(
            f"{label}: {spread(ours)}/s vs {baseline}: {spread(base)}/s, "
            f"ratio {spread(ratios, '.2f')}{aim}; {len(ours)} rounds, "
            f"load {spread(self.loads, '.1f')}"
        )
        if label in self.cpu_us and baseline in self.cpu_us:
            print(
                f"  client CPU per unit: {spread(self.cpu_us[label], ',.1f')} µs vs "
                f"{spread(self.cpu_us[baseline], ',.1f')} µs"
            )
        return {
            "label": label,
            "per_s": ours,
            "baseline": baseline,
            "baseline_per_s": base,
            "ratio_median": statistics.median(ratios),
            "ratios": ratios,
        }
