"""``archopt bench cli``'s arithmetic: the goals' ratios from the runs it recorded."""

import pytest

from archopt.bench.whole_process import format_report, summarize


def _run(process_s, import_s, rate):
    return {"process_s": process_s, "import_s": import_s, "decode_tokens_per_s": rate,
            "load_s": 0.2, "first_token_s": 0.05, "new_tokens": 128, "decode": "d"}  # fmt: skip


def test_summary_ratios_from_fixed_runs():
    result = {
        "machine": "m",
        "model": "x.gguf",
        "runs": {
            "ours cold": [_run(6.0, 2.0, 40.0)],
            "ours warm": [_run(4.0, 2.0, 100.0), _run(3.0, 2.0, 110.0), _run(5.0, 2.0, 90.0)],
            "llama.cpp": [_run(2.0, 0.5, 80.0), _run(2.5, 0.5, 90.0), {"error": "crashed"}],
        },
        "imports": {"torch": {"median": 2.0}, "archopt": {"median": 2.2}},
    }
    s = summarize(result)
    assert s["import archopt / import torch"] == pytest.approx(1.1)
    assert s["warm whole process / llama.cpp"] == pytest.approx(4.0 / 2.25)
    # after each process's own import: ours median(2, 1, 3) = 2, llama.cpp median(1.5, 2) = 1.75
    assert s["after import torch / llama.cpp after its import"] == pytest.approx(2.0 / 1.75)
    assert s["warm decode tokens/s / llama.cpp"] == pytest.approx(100.0 / 85.0)
    assert s["cold whole process / llama.cpp"] == pytest.approx(6.0 / 2.25)
    result |= {"summary": s}
    report = format_report(result)
    assert "| ours warm | 4.00 (3.20-4.80) |" in report  # median, p10-p90 of 3, 4, 5
    assert "warm whole process / llama.cpp: 1.78x" in report
