"""bin/bench runs both VMMs and records what it measured (numbers are not judged here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyvmm.harness import netns

ROOT = Path(__file__).resolve().parents[2]
NET_CASES = ["guest to host, 64 B", "guest to host, 1,400 B", "host to guest, 64 B",
             "host to guest, 1,400 B"]  # fmt: skip


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_startup_and_exit_rows_for_both_vmms(tmp_path: Path) -> None:
    # The per-exit figures are taken between two lines of the guest's own output (bench runs the
    # loop again when the two arrive in one read), so even a short loop gives every row a
    # positive figure.
    out = tmp_path / "bench.json"
    proc = bench("--runs", "1", "--only", "startup,exit", "--exits", "5000", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {(r["group"], r["name"]): r for r in report["rows"]}
    assert set(rows) == {
        ("startup", "to first serial byte"),
        ("startup", "to process exit"),
        ("startup", "peak RSS"),
        ("exit", "port write round trip"),
        ("exit", "VMM CPU per exit"),
    }
    assert all(r["pyvmm"] > 0 for r in rows.values())
    assert "| startup: to first serial byte |" in proc.stdout
    history = (tmp_path / "history.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["rows"] == report["rows"]
    if shutil.which("qemu-system-x86_64"):
        assert all(r["qemu"] > 0 and r["ratio"] > 0 for r in rows.values())
        assert "qemu startup: qemu-system-x86_64 -enable-kvm" in proc.stdout
    else:
        assert any("pyvmm-only" in note for note in report["notes"])


def test_net_rows_for_both_vmms(tmp_path: Path) -> None:
    # Each case's rate is taken between its first and last datagram and its CPU between two
    # lines of the guest's output, so a few thousand datagrams give every row a figure.
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    out = tmp_path / "bench.json"
    proc = bench("--runs", "1", "--only", "net", "--net-count", "5000", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {
        name
        for case in NET_CASES
        for name in (f"UDP {case}", f"VMM CPU, {case}", f"arrived of sent, {case}")
    }
    assert all(r["group"] == "net" for r in rows.values())
    assert all(r["pyvmm"] > 0 and r["threads"] > 0 for r in rows.values()), rows
    if shutil.which("qemu-system-x86_64"):
        assert all(r["qemu"] > 0 and r["ratio"] > 0 for r in rows.values()), rows
        assert "qemu net: ip netns exec NS qemu-system-x86_64 -enable-kvm" in proc.stdout
        assert "vhost=off" in proc.stdout
    assert "| net: UDP guest to host, 64 B " in proc.stdout


def test_an_unknown_benchmark_is_one_line_naming_it() -> None:
    proc = bench("--only", "startup,warp")
    assert proc.returncode == 2
    assert "--only: unknown benchmark 'warp'" in proc.stderr.strip().splitlines()[-1]


def test_an_unknown_linux_part_is_one_line_naming_it() -> None:
    proc = bench("--only", "linux", "--linux", "net,warp")
    assert proc.returncode == 2
    assert "--linux: 'warp' is not a part" in proc.stderr.strip().splitlines()[-1]
