"""``archopt bench generate``: the decoding benchmarks behind one command line, three modes.

- default: the lecture's no-cache loop vs KV caches vs HF ``generate`` (``bench.decode``);
- ``--cache ... --weights ...``: every (weights, cache) pair as a Pareto study, with HF and
  llama.cpp as anchors (``bench.decode_sweep.sweep``);
- ``--long N``: ms per token over an N-token run of bounded caches (``decode_sweep.long_run``).
"""

from __future__ import annotations

import json

from archopt.bench.common import machine_line
from archopt.bench.decode import format_report, run
from archopt.bench.decode_sweep import format_long_run, format_sweep, long_run, sweep
from archopt.generate import COMPILE_MODES
from archopt.io import atomic_write_text, check_writable
from archopt.report import ArgumentParser, int_in


def main(argv: list[str] | None = None) -> dict:
    p = ArgumentParser(prog="archopt bench generate", description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="registered name, HF dir or .gguf")
    p.add_argument("--new-tokens", type=int_in(1, 1 << 20), default=128)
    p.add_argument(
        "--none-tokens", type=int_in(1, 1 << 20), default=64, help="tokens for the no-cache loop"
    )
    p.add_argument(
        "--positions", type=int_in(1, 1 << 24), nargs="+", default=[64, 256, 512, 1024, 2048]
    )
    p.add_argument("--steps", type=int_in(1), default=8, help="decode steps timed per position")
    p.add_argument("--rounds", type=int_in(1), default=3)
    p.add_argument("--threads", type=int_in(1, 1024), default=2)
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--plot", help="PNG of time per token vs position")
    p.add_argument("--json", help="write the figures as JSON here")
    p.add_argument(
        "--cache", nargs="+", help="sweep these cache kinds (e.g. dense int8 sliding:256)"
    )
    p.add_argument(
        "--weights",
        nargs="+",
        help="sweep these weights: fp32 bf16 int8 int4 int4-head8 gguf (the file's)",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        choices=COMPILE_MODES,
        help="sweep: compiled one-token steps for 'static' (inductor-cpp: its C++ wrapper)",
    )
    p.add_argument(
        "--context", type=int_in(1, 1 << 24), default=512, help="prompt length for the sweep"
    )
    p.add_argument(
        "--long",
        type=int_in(1, 1 << 24),
        metavar="N",
        help="with --cache: ms per token over an N-token run",
    )
    args = p.parse_args(argv)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable(path, flag)  # before the minutes of work, not after
    if args.long:
        caches = args.cache or ["sliding:1024", "sink:4:1020"]
        buckets = long_run(args.model, caches=caches, tokens=args.long, threads=args.threads)
        size = 1024
        print(f"# {machine_line(args.threads)}; ms per token, median over each {size} tokens")
        print(format_long_run(buckets, size))
        return {"long": buckets}
    if args.cache or args.weights:
        rows = sweep(
            args.model,
            caches=args.cache or ["dense"],
            weights=args.weights or ["fp32"],
            new_tokens=args.new_tokens,
            context=args.context,
            rounds=args.rounds,
            threads=args.threads,
            plot_path=args.plot,
            compile=args.compile,
            hf=not args.no_hf,
        )
        print(f"# {machine_line(args.threads)}\n" + format_sweep(rows))
        if args.json:
            atomic_write_text(args.json, json.dumps(rows, indent=2, default=float))
        return {"sweep": rows}
    result = run(
        args.model,
        new_tokens=args.new_tokens,
        none_tokens=args.none_tokens,
        positions=args.positions,
        steps=args.steps,
        rounds=args.rounds,
        threads=args.threads,
        with_hf=not args.no_hf,
        plot_path=args.plot,
    )
    print(format_report(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
