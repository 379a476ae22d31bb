"""``archopt bench cli``: what a user waits for, from process start to exit.

The same GGUF file, prompt and thread count for archopt's default ``archopt generate`` and for
llama.cpp (llama-cpp-python) in a process of its own, each timed by this parent from start to
exit. First a cold run (an empty cache folder: archopt loads from the GGUF file, decodes
eagerly and starts its background build of the compiled step); then, once that build is done
(its time is reported too), warm runs, both programs interleaved in a shuffled order each
round. Each child also reports its parts (import, load, compile or cache, first token, decode
rate), and imports alone are timed as processes of their own.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from archopt.bench.anchors import have_llama_cpp, llama_cpp_process, run_json
from archopt.bench.common import machine_line
from archopt.io import atomic_write_text, check_writable
from archopt.measure.timing import quantile
from archopt.report import ArgumentParser, float_in, int_in


def _timed(cmd: list[str], env: dict) -> dict:
    start = time.perf_counter()
    out = run_json(cmd, env=env)
    out["process_s"] = time.perf_counter() - start
    return out


def _import_times(modules: list[str], runs: int, env: dict) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {m: [] for m in modules}
    for _ in range(runs):
        for m in modules:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import {m}"], env=env, check=True)
            times[m].append(time.perf_counter() - start)
    return times


def _ours(args, new_tokens: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "archopt.cli", "generate", "--model", args.model,
        "--prompt", args.prompt, "--max-new-tokens", str(new_tokens),
        "--threads", str(args.threads), "--json", *extra,
    ]  # fmt: skip


def _wait_for_background_build(args, env: dict, limit_s: float) -> float | None:
    """Seconds until the compiled step of the model a warm run loads is on disk (None: not in
    time, or no build running)."""
    probe = (
        "import json, torch; from archopt.loading.llm import load_llm; "
        "from archopt.decode_step import step_folder, RECORD_FILE; "
        "from archopt.background_build import building; "
        f"torch.set_num_threads({args.threads}); m = load_llm({args.model!r}); "
        "f = step_folder(m); "
        "print(json.dumps({'done': (f / RECORD_FILE).exists(), 'building': building(f)}))"
    )
    start = time.perf_counter()
    idle = 0  # polls in a row that saw no build: the build may be between two formats' folders
    while time.perf_counter() - start < limit_s:
        state = run_json([sys.executable, "-c", probe], env=env)
        if state.get("done"):
            return time.perf_counter() - start
        idle = 0 if state.get("building") else idle + 1
        if idle >= 3:
            return None
        time.sleep(5)
    return None


def _stats(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "p10": quantile(values, 0.1),
        "p90": quantile(values, 0.9),
        "runs": len(values),
    }


def run(args) -> dict:
    from archopt.loading.llm import resolve_llm

    gguf = resolve_llm(args.model)
    cache = Path(tempfile.mkdtemp(prefix="archopt-bench-cache-"))
    env = dict(os.environ, ARCHOPT_CACHE=str(cache), ARCHOPT_BACKGROUND_COMPILE="1")
    cpp = have_llama_cpp() and not args.no_llama_cpp
    anchor = llama_cpp_process(gguf, args.prompt, args.new_tokens, args.threads)
    print(f"cache folder for this run: {cache}", file=sys.stderr)
    result: dict = {"machine": machine_line(args.threads), "model": str(gguf), "runs": {}}

    print("cold: archopt with an empty cache folder ...", file=sys.stderr)
    cold = _timed(_ours(args, args.new_tokens), env)
    result["runs"]["ours cold"] = [cold]
    print("waiting for the background build of the compiled step ...", file=sys.stderr)
    result["background_build_s"] = _wait_for_background_build(args, env, args.build_limit)
    if cpp:
        result["runs"]["llama.cpp first"] = [_timed(anchor, env)]

    contenders = {"ours warm": _ours(args, args.new_tokens)}
    if cpp:
        contenders["llama.cpp"] = anchor
    rng = random.Random(0)
    for r in range(args.runs):
        for name in rng.sample(list(contenders), len(contenders)):
            result["runs"].setdefault(name, []).append(_timed(contenders[name], env))
        print(f"  round {r + 1}/{args.runs}", file=sys.stderr)

    if args.compare_inductor:  # the other way to keep a compile: inductor's own disk caches
        ind_env = dict(env, TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"))
        cmd = _ours(args, args.new_tokens, "--compile", "inductor-cpp", "--cache", "static")
        print("inductor-cpp, its disk caches cold then warm ...", file=sys.stderr)
        result["runs"]["ours inductor-cpp, cold inductor cache"] = [_timed(cmd, ind_env)]
        result["runs"]["ours inductor-cpp, warm inductor cache"] = [_timed(cmd, ind_env)]

    modules = ["torch", "archopt"] + (["llama_cpp"] if cpp else [])
    result["imports"] = {m: _stats(v) for m, v in _import_times(modules, args.runs, env).items()}

    if not args.no_exact_check:  # the exact format: compiled step vs eager, same tokens?
        print("exactness: fp32 weights, compiled step vs eager ...", file=sys.stderr)
        eager = run_json(_ours(args, args.new_tokens, "--weights", "fp32", "--compile", "off"), env)
        aot = run_json(_ours(args, args.new_tokens, "--weights", "fp32", "--compile", "aot"), env)
        gguf_eager = run_json(_ours(args, args.new_tokens, "--compile", "off"), env)
        warm_text = result["runs"]["ours warm"][0].get("text")
        result["exact"] = {
            "fp32 compiled == fp32 eager": aot.get("text") == eager.get("text") is not None,
            "fp32 decode": aot.get("decode"),
            "gguf compiled == gguf eager": warm_text == gguf_eager.get("text") is not None,
        }
    result["summary"] = summarize(result)
    return result


def _whole(result: dict, name: str) -> list[float]:
    return [r["process_s"] for r in result["runs"].get(name, []) if "error" not in r]


def summarize(result: dict) -> dict:
    """The goals of the benchmark, as measured figures and their ratios."""
    out: dict = {}
    warm, cpp = _whole(result, "ours warm"), _whole(result, "llama.cpp")
    cold = _whole(result, "ours cold")
    imp = result["imports"]
    if imp.get("torch") and imp.get("archopt"):
        out["import archopt / import torch"] = imp["archopt"]["median"] / imp["torch"]["median"]
    if warm and cpp:
        w, c = statistics.median(warm), statistics.median(cpp)
        out["warm whole process / llama.cpp"] = w / c
        # After the imports, as each process measured them itself (archopt: from the process's
        # start, torch's import included): load, compile or cache, prompt, decode, exit.
        out["after import torch / llama.cpp after its import"] = statistics.median(
            r["process_s"] - r["import_s"] for r in result["runs"]["ours warm"] if "error" not in r
        ) / statistics.median(
            r["process_s"] - r["import_s"] for r in result["runs"]["llama.cpp"] if "error" not in r
        )
        ours_rate = statistics.median(
            r["decode_tokens_per_s"] for r in result["runs"]["ours warm"] if "error" not in r
        )
        cpp_rate = statistics.median(
            r["decode_tokens_per_s"] for r in result["runs"]["llama.cpp"] if "error" not in r
        )
        out["warm decode tokens/s / llama.cpp"] = ours_rate / cpp_rate
        if cold:
            out["cold whole process / llama.cpp"] = cold[0] / c
    return out


def format_report(result: dict) -> str:
    lines = [f"# {result['machine']}", f"# {result['model']}", ""]
    lines += [
        "| run | whole process s (median, p10-p90) | import s | load s | compile | "
        "first token s | decode tokens/s | tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in result["runs"].items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            lines.append(f"| {name} | error: {runs[0]['error']} | | | | | | |")
            continue
        whole = _stats([r["process_s"] for r in ok])

        def med(key, fmt="{:.2f}", rows=ok):
            vals = [r[key] for r in rows if r.get(key) is not None]
            return fmt.format(statistics.median(vals)) if vals else "-"

        compile_col = ok[0].get("decode", "-")
        lines.append(
            f"| {name} | {whole['median']:.2f} ({whole['p10']:.2f}-{whole['p90']:.2f}) | "
            f"{med('import_s')} | {med('load_s')} | {compile_col} | {med('first_token_s')} | "
            f"{med('decode_tokens_per_s', '{:.1f}')} | {med('new_tokens', '{:.0f}')} |"
        )
    lines.append("")
    for m, s in result["imports"].items():
        lines.append(f"import {m} (a process of its own): {s['median']:.2f} s")
    build = result.get("background_build_s")
    lines.append(
        "background build of the compiled step after the cold run: "
        + (f"{build:.0f} s" if build is not None else "not finished / not started")
    )
    for k, v in result.get("exact", {}).items():
        lines.append(f"{k}: {v}")
    lines.append("")
    for k, v in result["summary"].items():
        lines.append(f"{k}: {v:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = ArgumentParser(prog="archopt bench cli", description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="a registry name or a .gguf file")
    p.add_argument("--prompt", default="Lionel Messi is a")
    p.add_argument("--new-tokens", type=int_in(1, 1 << 20), default=128)
    p.add_argument("--threads", type=int_in(1, 1024), default=2)
    p.add_argument("--runs", type=int_in(1), default=5, help="warm runs of each program")
    p.add_argument(
        "--build-limit", type=float_in(0, open_low=True), default=900, help="seconds to wait for it"
    )
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--no-exact-check", action="store_true")
    p.add_argument(
        "--compare-inductor",
        action="store_true",
        help="also time torch.compile (inductor-cpp) with its disk caches cold and warm",
    )
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.json:  # fail before the minutes of work, not after
        check_writable(args.json, "--json")
    result = run(args)
    print(format_report(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
