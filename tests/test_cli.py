import json

import pytest

from archopt.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list(capsys):
    code, out, _ = run(capsys, "list", "mobilenet*", "--json")
    assert code == 0
    assert json.loads(out) == [f"mobilenet_v1_{a}" for a in ("025", "050", "075", "100")]


def test_table_json_and_text(capsys):
    code, out, _ = run(capsys, "table", "mobilenet_v1_100", "--width-mult", "0.5", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 29
    assert rows[0]["filter_shape"] == "3x3x3x16" and rows[0]["input_size"] == "224x224x3"
    code, out, _ = run(capsys, "table", "mobilenet_v1_100", "--resolution", "128")
    assert "Conv dw / s1" in out and "128x128x3" in out and "186,400,768" in out


def test_measure_json(capsys):
    code, out, err = run(
        capsys, "measure", "mobilenet_v1_025", "--resolution", "96", "--repeats", "2", "--json"
    )
    (r,) = json.loads(out)
    assert code == 0 and "measuring mobilenet_v1_025" in err
    assert r["params"] == 470_072 and r["input_shape"] == [1, 3, 96, 96]
    assert r["latency_ms"] > 0 and r["peak_memory_bytes"] > 0


def test_measure_optimized(capsys):
    code, out, _ = run(
        capsys, "measure", "mobilenet_v1_025", "--optimize", "--repeats", "2", "--batch-size", "2"
    )
    assert code == 0 and "470,072" in out


def test_export(capsys, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (archopt[onnx])")
    target = tmp_path / "m.onnx"
    code, out, _ = run(capsys, "export", "mobilenet_v1_025", str(target), "--resolution", "64")
    assert code == 0 and str(target) in out and target.stat().st_size > 1_000_000


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["table", "mobilenet_v2"], "unknown model 'mobilenet_v2'"),
        (["table", "mobilenet_v1_100", "--width-mult", "0"], "width_mult must be > 0, got 0"),
        (["table", "mobilenet_v1_100", "--resolution", "16"], "at least 32x32"),
        (["table", "mobilenet_v1_100", "--set", "act=tanh"], "act must be one of"),
    ],
)
def test_errors_are_one_clear_line(capsys, argv, msg):
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.startswith("archopt: error: ") and msg in err


def test_bench_attention_small(capsys):
    code, out, _ = run(
        capsys,
        "bench",
        "attention",
        "--lengths",
        "300",
        "--window",
        "16",
        "--heads",
        "2",
        "--rounds",
        "1",
        "--hf-max",
        "0",
    )
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| 300 |")]
    names = {line.split("|")[3].strip() for line in rows}
    assert {"ours", "dense SDPA + band mask"} <= names
