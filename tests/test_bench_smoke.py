"""The benchmark script runs end to end (tiny sizes) and writes every metric it promises.

Only the structure is checked: numbers depend on the machine, so none is compared to a bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "tunnel_bench.py"

THROUGHPUT_AND_LATENCY = (
    "a_http_mbps",
    "a_https_mbps",
    "b_parallel_mbps",
    "c_connect_200_p50_ms",
    "c_connect_200_p99_ms",
    "c_first_byte_p50_ms",
    "c_first_byte_p99_ms",
    "d_rps",
)
#: CPU time is counted in clock ticks (10 ms): a smoke-sized transfer may well use none.
CPU_COST = ("a_http_cpu_per_gb", "a_https_cpu_per_gb", "d_cpu_per_request")
MEMORY = (
    "e_agent_rss_idle",
    "e_agent_rss_peak",
    "e_agent_rss_end",
    "e_server_rss_idle",
    "e_server_rss_peak",
    "e_server_rss_end",
)


def test_smoke_run_writes_every_metric(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--smoke",
            "--origin",
            "python",
            "--rps-tool",
            "python",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=90,  # hang guard only
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    metrics = report["metrics"]

    for key in THROUGHPUT_AND_LATENCY:
        metric = metrics[key]
        assert metric["direct"] > 0, key
        assert metric["fluidity"] > 0, key
        assert metric["ratio"] > 0, key
    for key in CPU_COST:
        assert metrics[key]["direct"] is None, key
        assert metrics[key]["fluidity"] >= 0, key
    for key in MEMORY:
        assert metrics[key]["direct"] is None, key
        assert metrics[key]["fluidity"] > 0, key
    assert metrics["d_failed"]["fluidity"] == 0
    assert report["meta"]["mode"] == "smoke"
    assert report["meta"]["rps_tool"] == "python"
    assert report["meta"]["origin"] == "python"
    assert "| metric" in result.stdout and "a. 1 stream" in result.stdout


def test_unknown_workload_is_refused_with_a_clear_error() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--workloads", "a,z"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown ['z']" in result.stderr
