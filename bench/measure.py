"""Interleaved runs, medians, and the result table: what every benchmark here shares.

A benchmark measures one or more rows (a number with a unit) on each VMM. Runs alternate
between the VMMs (pyvmm, QEMU, pyvmm, QEMU, ...) so that drift in the machine (page cache,
thermal, other load) falls on both alike; each row reports the median of its runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

PYVMM = "pyvmm"  # multiprocess mode, the default: each device in a process of its own
THREADS = "threads"  # pyvmm --disable-sandbox: the devices as threads in the VMM process
QEMU = "qemu"


@dataclass
class Row:
    """One measured quantity on both VMMs."""

    group: str  # the benchmark it belongs to: "startup", "blk", ...
    name: str  # what was measured, e.g. "to first serial byte"
    unit: str  # "ms", "MB/s", ...
    higher_is_better: bool
    pyvmm: float | None = None
    qemu: float | None = None
    threads: float | None = None  # pyvmm --disable-sandbox, where measured
    # The host's own figure for the same work where there is one (a ceiling or floor).
    host: float | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """pyvmm / QEMU."""
        if self.pyvmm is None or not self.qemu:
            return None
        return self.pyvmm / self.qemu

    @property
    def pyvmm_behind(self) -> bool:
        """Whether pyvmm does worse than QEMU on this row."""
        r = self.ratio
        if r is None:
            return False
        return r < 1.0 if self.higher_is_better else r > 1.0

    def record(self, vmm: str, values: list[float]) -> None:
        self.samples[vmm] = values
        setattr(self, vmm, statistics.median(values) if values else None)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        return data


def interleave(
    runs: int, jobs: Mapping[str, Callable[[], dict[str, float]]]
) -> dict[str, dict[str, list[float]]]:
    """Run each job `runs` times, alternating between them; every call returns named values.
    Returns vmm -> value name -> the values of every run."""
    out: dict[str, dict[str, list[float]]] = {vmm: {} for vmm in jobs}
    for _ in range(runs):
        for vmm, job in jobs.items():
            for key, value in job().items():
                out[vmm].setdefault(key, []).append(value)
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table (also readable on a terminal)."""
    head = ["benchmark", "unit", "pyvmm", "pyvmm threads", "QEMU", "pyvmm/QEMU", "host"]
    lines = [head]
    for row in rows:
        ratio = row.ratio
        mark = ""
        if ratio is not None:
            mark = " (better)" if not row.pyvmm_behind and abs(ratio - 1) > 0.05 else ""
            mark = " (worse)" if row.pyvmm_behind and abs(ratio - 1) > 0.05 else mark
        lines.append(
            [
                f"{row.group}: {row.name}",
                row.unit,
                _fmt(row.pyvmm),
                _fmt(row.threads),
                _fmt(row.qemu),
                "-" if ratio is None else f"{ratio:.2f}{mark}",
                _fmt(row.host),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]

    def render(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [render(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [render(line) for line in lines[1:]]
    return "\n".join(out)
