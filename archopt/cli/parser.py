"""``archopt``'s argument parser: every subcommand, its flags and their ranges."""

from __future__ import annotations

import argparse

from archopt.choices import (
    COMPILE_MODES,
    KV_CACHE_DTYPES,
    SERVE_COMPILE_MODES,
    SPECULATE,
    SPECULATE_BATCH,
    WEIGHT_CHOICES,
)
from archopt.cli.language import cmd_cache, cmd_generate, cmd_serve
from archopt.cli.vision import (
    BENCH_SUITES,
    cmd_bench,
    cmd_export,
    cmd_list,
    cmd_measure,
    cmd_pareto,
    cmd_search,
    cmd_table,
    cmd_tour,
    cmd_train,
)
from archopt.report import ArgumentParser, float_in, int_in

THREADS = int_in(1, 1024)
POSITIVE = int_in(1)
RESOLUTION = int_in(1, 1 << 16)


def build_parser() -> argparse.ArgumentParser:

    p = ArgumentParser(
        prog="archopt",
        description="The archopt command: thin subcommands over importable functions.",
        epilog="--debug (anywhere): show the traceback of an error instead of one line",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    def model_opts(sp, batch: bool = False):
        sp.add_argument(
            "--resolution", type=RESOLUTION, help="input height = width (default: model's)"
        )
        sp.add_argument(
            "--width-mult", type=float_in(0, 16, open_low=True), help="width multiplier alpha"
        )
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
        if batch:
            sp.add_argument("--batch-size", type=POSITIVE, default=1)
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("list", help="registered models")
    sp.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'mobilenet*'")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("table", help="per-layer architecture table (the paper's Table 1 form)")
    sp.add_argument("model")
    model_opts(sp)
    sp.set_defaults(func=cmd_table)

    sp = sub.add_parser("measure", help="params, MACs, latency, peak memory")
    sp.add_argument("models", nargs="+")
    model_opts(sp, batch=True)
    sp.add_argument("--threads", type=THREADS, help="torch intra-op threads (default: torch's)")
    sp.add_argument("--repeats", type=POSITIVE, default=30)
    sp.add_argument("--optimize", action="store_true", help="run optimize_for_inference first")
    sp.add_argument(
        "--compile",
        choices=["auto", "none", "jit", "inductor", "onnxruntime"],
        default="auto",
        help="with --optimize: auto (default) = the fastest checked backend, remembered per "
        "model, shape and machine; none = eager",
    )
    sp.add_argument("--bf16", action="store_true", help="optimize in bfloat16 (with --optimize)")
    sp.set_defaults(func=cmd_measure)

    sp = sub.add_parser("export", help="export a model to ONNX")
    sp.add_argument("model")
    sp.add_argument("output")
    model_opts(sp, batch=True)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("bench", help="benchmarks against the reference implementations")
    sp.add_argument("suite", choices=list(BENCH_SUITES))
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="the suite's own options (--help)")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("generate", help="stream a continuation from a language model")
    sp.add_argument("--model", default="smollm2-135m", help="smollm2-135m, HF dir or .gguf")
    sp.add_argument("text", nargs="?", metavar="PROMPT", help="the prompt, as --prompt")
    sp.add_argument("-p", "--prompt", help='the text to continue (default "Lionel Messi is a")')
    sp.add_argument("--max-new-tokens", type=POSITIVE, default=128)
    sp.add_argument(
        "--cache",
        default="auto",
        help="auto (static with the compiled step, else dense) | none | dense | static | "
        "sliding:W | sink:S:W | int8[:R]",
    )
    sp.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    sp.add_argument("--temperature", type=float_in(0, 100), default=0.0, help="0: greedy")
    sp.add_argument("--top-k", type=POSITIVE)
    sp.add_argument("--top-p", type=float_in(0, 1, open_low=True))
    sp.add_argument("--seed", type=int)
    sp.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    sp.add_argument(
        "--compile",
        nargs="?",
        default="auto",
        const="aot",
        choices=COMPILE_MODES,
        help="auto (default): the compiled step if it is in the cache, else eager while it is "
        "built in the background for later runs; aot (or --compile alone): compile now if "
        "needed; off: eager; inductor[-cpp]: torch.compile in this process",
    )
    sp.add_argument(
        "--weights",
        default="auto",
        choices=WEIGHT_CHOICES,
        help="auto: a GGUF file's own blocks (times int8 activations, gguf-act8, once archopt's "
        "kernels are built on an AVX512-VNNI CPU), else fp32; int8/int4: quantized here "
        "(int4-head8: with an int8 output projection); gguf: the file's own blocks",
    )
    sp.add_argument(
        "--device",
        default="cpu",
        help="cpu (default), cuda or cuda:N; on a GPU the decode step is a CUDA graph, "
        "recorded at the first step",
    )
    sp.add_argument("--threads", type=THREADS, help="torch intra-op threads (default: torch's)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("cache", help="what archopt keeps in its cache folder")
    sp.add_argument(
        "action",
        choices=["list", "prune", "clear"],
        help="prune: remove superseded builds and interrupted ones; clear: remove everything",
    )
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_cache)

    sp = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    sp.add_argument("--model", default="smollm2-135m", help="smollm2-135m, HF dir or .gguf")
    sp.add_argument("--weights", default="auto", choices=WEIGHT_CHOICES)
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    sp.add_argument("--port", type=int_in(0, 65535), default=8000)
    sp.add_argument(
        "--max-batch", type=int_in(1, 4096), default=8, help="sequences decoded together"
    )
    sp.add_argument("--block-size", type=int_in(1, 1 << 16), default=16, help="tokens per KV block")
    sp.add_argument(
        "--max-blocks", type=POSITIVE, help="KV pool limit in blocks (default: max-batch contexts)"
    )
    sp.add_argument("--prefill-chunk", type=POSITIVE, default=256, help="prompt tokens per step")
    sp.add_argument("--max-queue", type=POSITIVE, default=256, help="waiting requests before 503")
    sp.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "span", "gather"],
        help="eager attention (prompts; decoding when not compiled). auto: batched requests "
        "decode exactly as alone; span: no per-step copy",
    )
    sp.add_argument(
        "--compile",
        default="auto",
        choices=SERVE_COMPILE_MODES,
        help="the decode batch's compiled step. auto (default): from the cache folder, else "
        "eager while it is built in the background; aot: build it before serving; off: eager",
    )
    sp.add_argument(
        "--speculate",
        type=int_in(0, 64),
        default=SPECULATE,
        help="drafts a greedy request verifies a step, by n-gram lookup in its own tokens "
        f"(exact: the same tokens, fewer steps; default {SPECULATE}; 0: off)",
    )
    sp.add_argument(
        "--speculate-batch",
        type=int_in(0, 4096),
        default=SPECULATE_BATCH,
        help=f"speculate while at most this many requests decode (default {SPECULATE_BATCH})",
    )
    sp.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=KV_CACHE_DTYPES,
        help="keys and values as kept: auto (default), the model's dtype; float16 or bfloat16 "
        "halve the cache and what attention reads (rounded as written)",
    )
    sp.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    sp.add_argument("--threads", type=THREADS, help="torch intra-op threads (default: torch's)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("tour", help="re-measure the lecture's claims and write a report")
    sp.add_argument("--out", default="archopt-report", help="output folder")
    sp.add_argument("--threads", type=THREADS)
    sp.add_argument("--repeats", type=POSITIVE, default=20)
    sp.add_argument(
        "--quick", action="store_true", help="a smaller, rougher version (about a minute)"
    )
    sp.add_argument(
        "--sections",
        metavar="NAME[,NAME]",
        help="run only these: mobilenet, longformer, mobilevit, kv_cache, search (the summary "
        "follows)",
    )
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_tour)

    def recipe_opts(sp, epochs: int):
        sp.add_argument("--data", default="digits", help="digits | cifar10:PATH | folder:PATH")
        sp.add_argument("--epochs", type=int_in(1, 100_000), default=epochs)
        sp.add_argument(
            "--batch-size", type=int_in(1, 1 << 20), default=64, help="global batch (all ranks)"
        )
        sp.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
        sp.add_argument(
            "--lr",
            type=float_in(0, open_low=True),
            help="peak learning rate (sgd 0.1, adamw 2e-3)",
        )
        sp.add_argument("--resolution", type=RESOLUTION, help="image side (digits, CIFAR-10: 32)")
        sp.add_argument("--channels", type=int, choices=[1, 3], help="default: as stored")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser(
        "train",
        help="train an image model from scratch; under torchrun, with DDP",
        description="Train from scratch with checkpoints after every epoch. More processes: "
        "torchrun --nproc-per-node N -m archopt.cli train MODEL ...",
    )
    sp.add_argument("model")
    recipe_opts(sp, epochs=10)
    sp.add_argument("--weight-decay", type=float_in(0, 10), help="default: sgd 5e-4, adamw 0.05")
    sp.add_argument("--momentum", type=float_in(0, 1), default=0.9, help="SGD momentum")
    sp.add_argument(
        "--warmup",
        type=float_in(0, 100_000),
        default=1.0,
        dest="warmup_epochs",
        help="linear warm-up, in epochs",
    )
    sp.add_argument("--label-smoothing", type=float_in(0, 1), default=0.1)
    sp.add_argument(
        "--width-mult", type=float_in(0, 16, open_low=True), help="width multiplier alpha"
    )
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    sp.add_argument("--out", help="run folder (default: runs/MODEL)")
    sp.add_argument("--resume", action="store_true", help="continue the run in --out")
    sp.add_argument(
        "--stop-after", type=POSITIVE, metavar="N", help="stop after epoch N, resumable"
    )
    sp.add_argument(
        "--workers",
        type=int_in(0, 256),
        default=0,
        dest="num_workers",
        help="data loader workers (folders)",
    )
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser(
        "pareto", help="train, measure, and plot accuracy against MACs, latency, params, memory"
    )
    sp.add_argument("--models", required=True, help="comma-separated, e.g. a,b:width_mult=0.5")
    recipe_opts(sp, epochs=5)
    sp.add_argument("--x", choices=["macs", "latency", "params", "memory"], default="macs")
    sp.add_argument("--y", choices=["accuracy"], default="accuracy")
    sp.add_argument("--out", default="archopt-pareto", help="output folder (runs are reused)")
    sp.add_argument("--threads", type=THREADS, help="torch threads for latency")
    sp.add_argument("--repeats", type=POSITIVE, default=20, help="timed latency repeats")
    sp.add_argument("--logx", action="store_true", help="log-scale cost axis")
    sp.set_defaults(func=cmd_pareto)

    sp = sub.add_parser(
        "search", help="architecture search (NSGA-II) on the measured accuracy / cost front"
    )
    sp.add_argument("--space", help="a built-in space (see --list-spaces) or a JSON file")
    sp.add_argument("--list-spaces", action="store_true", help="print the built-in spaces")
    sp.add_argument(
        "--budget", type=int_in(1, 100_000), help="candidates to train (rejections are free)"
    )
    sp.add_argument(
        "--objectives", default="accuracy,latency", help="two or more of accuracy, latency, "
        "macs, params",
    )  # fmt: skip
    sp.add_argument("--data", default="digits", help="digits | cifar10:PATH | folder:PATH")
    sp.add_argument(
        "--out", default="archopt-search", help="output folder (resumed if it has records)"
    )
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--algorithm", choices=["nsga2", "random"], default="nsga2")
    sp.add_argument(
        "--pop-size", type=int_in(2, 10_000), help="NSGA-II population (default: budget/4, 4-16)"
    )
    sp.add_argument(
        "--epochs", type=int_in(1, 100_000), help="training epochs per candidate (space's default)"
    )
    sp.add_argument("--batch-size", type=int_in(1, 1 << 20))
    sp.add_argument("--optimizer", choices=["sgd", "adamw"])
    sp.add_argument("--lr", type=float_in(0, open_low=True))
    sp.add_argument(
        "--train-size", type=POSITIVE, help="train on the first N images only (a proxy)"
    )
    sp.add_argument("--threads", type=THREADS, help="torch threads for latency (default: torch's)")
    sp.add_argument("--repeats", type=POSITIVE, default=20, help="timed latency repeats")
    sp.add_argument(
        "--max-latency", default="auto", metavar="MS|auto|none",
        help="reject candidates predicted slower (auto: the slowest hand-designed model, "
        "as predicted)",
    )  # fmt: skip
    sp.add_argument("--rounds", type=POSITIVE, default=3,
                    help="after the search, time kernels and models this many times in all, "
                         "--round-gap apart, and check the predictor on the fastest")  # fmt: skip
    sp.add_argument("--round-gap", type=float_in(0), default=15.0, metavar="S")
    sp.add_argument("--no-hand-designed", action="store_true", help="do not train them")
    sp.add_argument("--stop-after", type=POSITIVE, metavar="N", help="stop after N, resumable")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_search)
    return p
