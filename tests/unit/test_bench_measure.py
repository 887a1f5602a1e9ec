"""The benchmark table: medians, the pyvmm/QEMU ratio, which side is behind, interleaving; and
figures taken between two lines of a VMM's output."""

from __future__ import annotations

import pytest

from bench.measure import PYVMM, QEMU, THREADS, Row, interleave, table
from bench.native import Untimed, _between, run_vmm


def test_a_row_keeps_medians_and_the_ratio() -> None:
    row = Row("blk", "sequential read", "MB/s", higher_is_better=True)
    row.record(PYVMM, [100.0, 300.0, 200.0])
    row.record(QEMU, [400.0, 400.0, 100.0])
    assert (row.pyvmm, row.qemu, row.ratio) == (200.0, 400.0, 0.5)
    assert row.pyvmm_behind


def test_lower_is_better_rows_are_behind_when_the_ratio_is_above_one() -> None:
    row = Row("startup", "to exit", "ms", higher_is_better=False)
    row.record(PYVMM, [150.0])
    row.record(QEMU, [1500.0])
    assert row.ratio == 0.1
    assert not row.pyvmm_behind


def test_a_row_without_qemu_has_no_ratio_and_shows_dashes() -> None:
    row = Row("exit", "round trip", "us", higher_is_better=False)
    row.record(PYVMM, [70.0])
    assert row.ratio is None
    text = table([row])
    assert "| exit: round trip | us   | 70.0  | -             | -    | -          | -    |" in text


def test_the_thread_mode_has_a_column_of_its_own() -> None:
    row = Row("blk", "random read", "IOPS", higher_is_better=True)
    row.record(PYVMM, [60_000.0])
    row.record(THREADS, [50_000.0])
    row.record(QEMU, [120_000.0])
    assert row.threads == 50_000.0
    assert row.ratio == 0.5  # pyvmm's default mode is what is held against QEMU
    assert "| 60,000 | 50,000        | 120,000 |" in table([row])


def test_the_table_marks_where_pyvmm_is_worse() -> None:
    row = Row("blk", "random read", "IOPS", higher_is_better=True, host=800_000.0)
    row.record(PYVMM, [60_000.0])
    row.record(QEMU, [120_000.0])
    line = table([row]).splitlines()[2]
    assert "60,000" in line and "120,000" in line and "0.50 (worse)" in line and "800,000" in line


def test_runs_alternate_between_the_vmms() -> None:
    order: list[str] = []

    def job(name: str) -> dict[str, float]:
        order.append(name)
        return {"t": float(len(order))}

    results = interleave(3, {PYVMM: lambda: job(PYVMM), QEMU: lambda: job(QEMU)})
    assert order == [PYVMM, QEMU] * 3
    assert results == {PYVMM: {"t": [1.0, 3.0, 5.0]}, QEMU: {"t": [2.0, 4.0, 6.0]}}


def test_a_figure_between_two_lines_that_came_together_is_refused() -> None:
    together = run_vmm(["sh", "-c", "printf 'A start\\nA ok\\n'"])
    with pytest.raises(Untimed, match="'A start' and 'A ok' came in one read"):
        _between(together, "A start", "A ok")
    apart = run_vmm(["sh", "-c", "echo A start; sleep 0.2; echo A ok"])
    wall, _ = _between(apart, "A start", "A ok")
    assert wall > 0  # not the 0.2 s slept: a loaded reader may read the first line late
