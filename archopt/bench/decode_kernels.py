"""The compiled decode steps with archopt's C++ attention kernels against the same steps with
the torch expressions they replace, side by side.

In one process, on one model: the static step (``generate``'s default path) and the paged step
(the serving engine's decode batch), each built twice (``archopt.ops.cpu_kernels``' kernels,
and with ``ARCHOPT_CPU_KERNELS=0`` the torch expressions), timed interleaved step by step at
each batch size and context, the static cache reserved for ``--reserve`` more tokens than the
context as ``generate`` reserves its new tokens. Prints each step's median milliseconds, the
torch step over the kernel step, and how far their logits differ, beside how far the two
torch steps (static and paged: the same attention summed in another order) differ: the GGUF
weights' kernels round activations to bf16, which amplifies last-bit differences.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time

import torch

from archopt.bench.common import machine_line
from archopt.io import atomic_write_text, check_writable
from archopt.report import ArgumentParser, int_in, markdown_table

VARIANTS = ("static", "paged")


@contextlib.contextmanager
def _kernels_off():
    old = os.environ.get("ARCHOPT_CPU_KERNELS")
    os.environ["ARCHOPT_CPU_KERNELS"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["ARCHOPT_CPU_KERNELS"]
        else:
            os.environ["ARCHOPT_CPU_KERNELS"] = old


def build_steps(model) -> dict:
    """The four steps, from the cache folder or built now."""
    from archopt.decode_step import compile_step
    from archopt.ops import cpu_kernels

    steps = {}
    with _kernels_off():
        for kind in VARIANTS:
            steps[f"{kind} (torch)"] = compile_step(model, kind=kind, progress=True)
    if not cpu_kernels.load(build=True):
        raise ValueError(f"archopt's CPU kernels are unavailable: {cpu_kernels.why_unavailable()}")
    for kind in VARIANTS:
        steps[f"{kind} (kernel)"] = compile_step(model, kind=kind, progress=True)
    return steps


@torch.inference_mode()
def time_steps(model, steps, batch: int, context: int, reserve: int, n: int) -> dict:
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    ids = torch.randint(0, model.config.vocab_size, (batch, context + n), generator=gen)
    caches = {}
    for name in steps:
        kind = name.split()[0]
        kv = model.make_cache(kind, batch=batch, reserve=context + reserve)
        model(ids[:, :context], cache=kv, last_only=True)
        caches[name] = kv
    times = {name: [] for name in steps}
    logits = {}
    for i in range(n):
        tok = ids[:, context + i : context + i + 1]
        pos = torch.full((batch, 1), context + i)
        for name in steps if i % 2 else reversed(list(steps)):
            t0 = time.perf_counter()
            logits[name] = steps[name](tok, pos, caches[name])
            times[name].append(time.perf_counter() - t0)
    row = {"batch": batch, "context": context}
    for name, t in times.items():
        row[f"{name} ms"] = statistics.median(t) * 1e3
    for kind in VARIANTS:
        row[f"{kind} torch/kernel"] = row[f"{kind} (torch) ms"] / row[f"{kind} (kernel) ms"]
        diff = logits[f"{kind} (kernel)"] - logits[f"{kind} (torch)"]
        row[f"{kind} max dlogit"] = diff.abs().max().item()
    # the rounding noise floor: two torch expressions of the same attention
    row["torch static-paged max dlogit"] = (
        (logits["static (torch)"] - logits["paged (torch)"]).abs().max().item()
    )
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = ArgumentParser(prog="archopt bench decode-kernels", description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int_in(1, 1024), default=2)
    ap.add_argument("--batches", type=int_in(1, 256), nargs="+", default=[1, 4])
    ap.add_argument("--contexts", type=int_in(1, 1 << 16), nargs="+", default=[32, 128, 256])
    ap.add_argument("--reserve", type=int_in(0, 1 << 16), default=128)
    ap.add_argument("--steps", type=int_in(2, 10000), default=24)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.json:
        check_writable(args.json, "--json")
    from archopt.bench.decode import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model, "auto")
    steps = build_steps(model)
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            rows.append(time_steps(model, steps, batch, context, args.reserve, args.steps))
            print(f"batch {batch}, context {context}: done", file=sys.stderr, flush=True)
    print(machine_line(args.threads))
    cols = ["batch", "context"]
    cols += [f"{k} ({v}) ms" for k in VARIANTS for v in ("torch", "kernel")]
    cols += [f"{k} {what}" for k in VARIANTS for what in ("torch/kernel", "max dlogit")]
    cols += ["torch static-paged max dlogit"]
    fmt = lambda c, v: f"{v:.3g}" if "dlogit" in c else f"{v:.2f}" if isinstance(v, float) else v  # noqa: E731
    print(markdown_table(cols, [[fmt(c, r[c]) for c in cols] for r in rows]))
    if args.json:
        report = {"machine": machine_line(args.threads), "model": args.model, "rows": rows}
        atomic_write_text(args.json, json.dumps(report, indent=1))
    return rows


if __name__ == "__main__":
    main()
