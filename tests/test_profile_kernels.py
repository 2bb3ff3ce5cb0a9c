"""profile_kernels' ncu summary: one row per launch, each column from the metric in its unit."""

import sys

from train_testing import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from profile_kernels import summarize

HEADER = '"ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"\n'


def _row(launch, kernel, section, name, unit, value):
    return f'"{launch}","{kernel}","{section}","{name}","{unit}","{value}"\n'


def test_summary_takes_percent_columns_from_percent_rows(tmp_path):
    csv = tmp_path / "ncu.csv"
    csv.write_text(
        "==PROF== a line ncu prints before the table\n"
        + HEADER
        + _row(0, "diag", "GPU Speed Of Light Throughput", "Duration", "msecond", "1.5")
        + _row(0, "diag", "GPU Speed Of Light Throughput", "Memory Throughput", "%", "38.40")
        + _row(0, "diag", "Memory Workload Analysis", "Memory Throughput", "byte/s", "7.6e11")
        + _row(0, "diag", "Scheduler Statistics", "One or More Eligible", "%", "48.54")
        + _row(1, "wy", "GPU Speed Of Light Throughput", "Duration", "nsecond", "2500")
        + _row(1, "wy", "Launch Statistics", "Registers Per Thread", "register/thread", "96")
    )
    lines = summarize(str(csv)).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    rows = [dict(zip(head, row, strict=True)) for row in cells]
    assert [r["kernel"] for r in rows] == ["diag", "wy"]
    assert rows[0]["us"] == "1500.0" and rows[1]["us"] == "2.5"
    assert rows[0]["mem %"] == "38.40" and rows[0]["issue %"] == "48.54"
    assert rows[1]["regs"] == "96" and rows[1]["mem %"] == ""
