"""Subcommands over language models: generate, cache, serve."""

from __future__ import annotations

import itertools
import json
import sys
from typing import TYPE_CHECKING

from archopt.cli.common import emit

if TYPE_CHECKING:
    import torch

DEFAULT_PROMPT = "Lionel Messi is a"  # generate's text when none is given


def process_age_s() -> float | None:
    """Seconds since this process started (Linux's /proc), or None where that is unknown."""
    import os
    from pathlib import Path

    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)


def check_device(name: str) -> torch.device:
    """``--device`` as a torch device this machine has, or a ValueError saying why not."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: this machine has no CUDA device torch can use")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}"
            )
    return device


def cmd_generate(args) -> None:
    import time

    import torch

    from archopt.generate import plan_decode, stream_text
    from archopt.loading.llm import load_llm
    from archopt.ops.cache_spec import check_cache_spec

    # Everything that can be wrong with the arguments fails here, before a model is read.
    check_cache_spec(args.cache)
    if args.compile not in ("auto", "off") and args.cache not in ("auto", "static"):
        raise ValueError(
            f"--compile {args.compile} needs --cache static (or auto, which picks it), got "
            f"--cache {args.cache}"
        )
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.text is not None and args.prompt is not None:
        raise ValueError(
            f"give the prompt once, as PROMPT or --prompt, got both ({args.text!r} and "
            f"{args.prompt!r})"
        )
    args.prompt = next((p for p in (args.text, args.prompt) if p is not None), DEFAULT_PROMPT)
    if not args.prompt and not args.chat:  # a chat template gives even "" tokens
        raise ValueError("--prompt must hold some text to continue, got an empty one")
    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    import_s = process_age_s()  # the interpreter's start and the imports, torch's included
    start = time.perf_counter()
    on_cpu = device.type == "cpu"  # the CPU path loads as it always has: no .to() at all
    model = load_llm(args.model, weights=args.weights, device=None if on_cpu else device)
    load_s = time.perf_counter() - start
    plan = plan_decode(
        model, cache=args.cache, compile=args.compile, new_tokens=args.max_new_tokens,
        progress=not args.json,
    )  # fmt: skip
    kwargs = dict(
        compile=plan, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed,
    )  # fmt: skip
    if args.ignore_eos:
        kwargs["stop"] = None
    pieces, stats = [], {}
    text_stream = stream_text(
        model, args.prompt, args.max_new_tokens, chat=args.chat, stats=stats, **kwargs
    )
    # The first piece before the prompt is echoed: a prompt the model cannot take (too long
    # for its context, say) is then an error line of its own, not the tail of the prompt.
    first = next(text_stream, None)
    if not args.json:
        print(args.prompt if not args.chat else "", end="", flush=True)
    for piece in itertools.chain([first] if first is not None else [], text_stream):
        pieces.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
    n = stats["new_tokens"]
    decode_s = stats.get("last_token_s", 0.0) - stats.get("first_token_s", 0.0)
    report = {
        "model": args.model,
        "weights": model.config.extra.get("weights", args.weights),
        "loaded_from": model.config.extra.get("loaded_from"),
        "cache": plan.cache if isinstance(plan.cache, str) else type(plan.cache).__name__,
        "decode": plan.how,
        "prompt_tokens": stats["prompt_tokens"],
        "new_tokens": n,
        "import_s": import_s,
        "load_s": load_s,
        "compile_s": plan.compile_seconds,
        "first_token_s": stats.get("first_token_s"),
        "decode_tokens_per_s": (stats["new_tokens"] - 1) / decode_s if decode_s > 0 else None,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "text": "".join(pieces),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    rate = report["decode_tokens_per_s"]
    print(
        f"\n\n[{n} tokens; load {load_s:.2f} s ({report['loaded_from']}), decode "
        f"{plan.how}, first token {report['first_token_s'] or 0:.2f} s, "
        + (f"{rate:.1f} tokens/s" if rate else "one token")
        + f"; {report['weights']} weights, {report['cache']} cache, {report['threads']} threads"
        + ("]" if on_cpu else f", {device}]"),
        file=sys.stderr,
    )


def cmd_cache(args) -> None:
    from archopt.io import cache_dir, cache_entries, clear_cache, prune_cache

    if args.action == "prune":
        removed = prune_cache()
        freed = sum(e["bytes"] for e in removed) / 2**20
        lines = [f"  {e['kind']:6s} {e['name']:40s} {e['why']}" for e in removed]
        head = f"removed {len(removed)} entries ({freed:.1f} MiB) from {cache_dir()}"
        emit(removed, args.json, "\n".join([head, *lines]))
        return
    if args.action == "clear":
        removed = clear_cache()
        emit({"removed": removed}, args.json, f"removed {removed} entries from {cache_dir()}")
        return
    entries = cache_entries()
    lines = [f"{cache_dir()}:"] + [
        f"  {e['kind']:6s} {e['name']:60s} {e['bytes'] / 2**20:8.1f} MiB  {e['detail']}"
        for e in entries
    ]
    if not entries:
        lines.append("  (empty)")
    emit(entries, args.json, "\n".join(lines))


def cmd_serve(args) -> None:
    import torch

    from archopt.serve.app import serve

    if args.threads:
        torch.set_num_threads(args.threads)
    serve(
        args.model,
        weights=args.weights,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch=args.max_batch,
        block_size=args.block_size,
        max_blocks=args.max_blocks,
        prefill_chunk=args.prefill_chunk,
        max_queue=args.max_queue,
        attention=args.attention,
        compile=args.compile,
        speculate=args.speculate,
        speculate_batch=args.speculate_batch,
        kv_cache_dtype=args.kv_cache_dtype,
        progress=True,
    )
