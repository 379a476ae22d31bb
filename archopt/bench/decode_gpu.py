"""KV caching on one GPU: the lecture's no-cache loop vs archopt's caches vs Hugging Face.

SmolLM2-135M's architecture with random weights (no checkpoint travels to a GPU machine here:
the timings do not depend on the values), batch 1, a prompt of ``--prompt`` random tokens, then
``--new-tokens`` greedy tokens, every stop token ignored. Contenders, all through one
``generate`` call each, timed from the call to its last token (CUDA synchronised):

- ``no cache``: the lecture's loop, the whole sequence again for every token;
- ``dense`` / ``static``: archopt's KV caches, eager (``compile="off"``);
- ``default``: ``generate(model, ids, n)`` with no other argument: a static cache whose step is
  recorded as a CUDA graph at the first token and replayed (``archopt.cuda_graph_step``);
- ``HF``: transformers' ``generate`` on the same weights (its default dynamic cache), and, if
  the budget allows, with ``cache_implementation="static"``, for which recent releases compile
  the forward themselves (``torch.compile``, "reduce-overhead": CUDA graphs): the way their
  documentation makes decoding fast. Its first (compiling) call is the warm-up, not timed.

Every contender's tokens are compared with the dense cache's ("same" or the first position
that differs). Median of ``--rounds`` after one warm-up call.

    archopt bench decode-gpu [--dtype bf16] [--budget-s 120]
    archopt bench decode-gpu --dry-run   # CPU, a tiny model: the plumbing only
    (or python -m archopt.bench.decode_gpu with the same flags)
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch

from archopt.report import ArgumentParser, float_in, int_in, markdown_table

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    prog, about = "archopt bench decode-gpu", __doc__.split("\n\n")[0]
    p = ArgumentParser(prog=prog, description=about)
    p.add_argument("--model", default="smollm2-135m", help="a registered language model")
    p.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["bf16", "fp32"])
    p.add_argument("--prompt", type=int_in(1, 1 << 16), default=128)
    p.add_argument("--new-tokens", type=int_in(2, 1 << 16), default=128)
    p.add_argument("--none-tokens", type=int_in(2, 1 << 16), default=64, help="no-cache loop")
    p.add_argument("--rounds", type=int_in(1, 100), default=3)
    p.add_argument(
        "--budget-s",
        type=float_in(0, open_low=True),
        default=120.0,
        help="start no contender after",
    )
    p.add_argument("--no-hf-static", action="store_true", help="skip HF's static-cache run")
    p.add_argument("--dry-run", action="store_true", help="CPU, llama-tiny, 1 round")
    args = p.parse_args(argv)
    if args.dry_run:
        args.model, args.prompt, args.new_tokens, args.none_tokens = "llama-tiny", 8, 8, 4
        args.rounds, args.no_hf_static = 1, True
    return args


def timed(fn, device: str, rounds: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``fn()`` over ``rounds`` after one warm-up call, and its output."""
    out = fn()
    times = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    n = min(a.shape[-1], b.shape[-1])
    diff = (a[..., :n] != b[..., :n]).flatten().nonzero()
    if diff.numel() == 0 and a.shape == b.shape:
        return "same"
    return f"differs at token {int(diff[0]) if diff.numel() else n}"


class Rows(list):
    """The table's rows, each printed as it is measured: a run cut off by its time limit
    still shows what it measured."""

    def append(self, row: list) -> None:
        super().append(row)
        print("| " + " | ".join(str(x) for x in row) + " |", flush=True)


def run_dtype(args, dtype_name: str, device: str, deadline: float) -> list[list]:
    from archopt.bench.anchors import hf_twin
    from archopt.generate import generate
    from archopt.registry import create_model

    torch.manual_seed(0)
    model = create_model(args.model).eval().to(device=device, dtype=DTYPES[dtype_name])
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt), device=device)
    n = args.new_tokens

    def ours(tokens: int, **kw):
        def call():
            with torch.inference_mode():
                return generate(model, ids, tokens, stop=None, **kw)

        return call

    contenders = [  # the dense cache first: the others' tokens are compared with its
        ("dense cache, eager", n, ours(n, cache="dense", compile="off")),
        ("no cache (lecture's loop)", args.none_tokens, ours(args.none_tokens, cache=None)),
        ("static cache, eager", n, ours(n, cache="static", compile="off")),
        ("default generate(model, ids, n)", n, ours(n)),
    ]
    rows, reference = Rows(), None
    for name, tokens, fn in contenders:
        if time.perf_counter() > deadline:
            rows.append([dtype_name, name, "skipped (budget)", "-", "-", "-"])
            continue
        seconds, out = timed(fn, device, args.rounds)
        new = out[:, args.prompt :]
        if reference is None:
            reference = new
        same = first_difference(new, reference[:, : new.shape[1]])
        per_token = f"{seconds / tokens * 1e3:.3f}"
        rows.append([dtype_name, name, tokens, per_token, f"{tokens / seconds:.0f}", same])
    try:
        hf = hf_twin(model).to(device=device, dtype=DTYPES[dtype_name]).eval()
    except Exception as e:  # transformers missing or changed: the row says so
        error = f"error: {type(e).__name__}: {e}"[:120]
        rows.append([dtype_name, "HF transformers", "-", "-", "-", error])
        return rows
    mask = torch.ones_like(ids)

    def hf_call(**kw):
        def call():
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return hf.generate(
                    ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, eos_token_id=None, pad_token_id=0, **kw,
                )  # fmt: skip

        return call

    hf_runs = [("HF generate (dynamic cache)", {})]
    if not args.no_hf_static:
        hf_runs.append(("HF, cache_implementation='static'", {"cache_implementation": "static"}))
    for name, kw in hf_runs:
        if time.perf_counter() > deadline:
            rows.append([dtype_name, name, "skipped (budget)", "-", "-", "-"])
            continue
        try:
            seconds, out = timed(hf_call(**kw), device, args.rounds)
            same = first_difference(out[:, args.prompt :], reference)
            per_token = f"{seconds / n * 1e3:.3f}"
            rows.append([dtype_name, name, n, per_token, f"{n / seconds:.0f}", same])
        except Exception as e:
            message = " ".join(str(e).split())[:100]
            rows.append([dtype_name, name, "-", "-", "-", f"error: {type(e).__name__}: {message}"])
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark (use --dry-run on a CPU)")
        return 1
    start = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    print(f"# Greedy decoding, {args.model} (random weights), {name}, torch {torch.__version__}")
    print(f"batch 1, prompt {args.prompt} tokens, {args.new_tokens} new tokens (the no-cache loop")
    print(f"{args.none_tokens}), median of {args.rounds} runs after a warm-up\n")
    rows = []
    for dtype_name in args.dtype:
        rows += run_dtype(args, dtype_name, device, start + args.budget_s)
        print(f"{dtype_name} done at {time.perf_counter() - start:.0f} s", flush=True)
    head = ["dtype", "contender", "tokens", "ms/token", "tokens/s", "tokens vs dense cache"]
    print(markdown_table(head, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
