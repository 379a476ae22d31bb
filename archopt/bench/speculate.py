"""Speculative decoding in the serving engine: one stream with and without n-gram drafts.

In one process, on SmolLM2-135M (``--weights``, default what ``load_llm`` picks), each chat
prompt alone through the engine's compiled paged step, with speculation at its defaults
(``archopt.serve.speculate``) and with ``speculate=0``, in interleaved rounds: tokens/s (best
and median of the rounds), drafts run and kept, and whether both gave the same tokens (they
must: the drafts are verified exactly). Two sets of prompts: the serving benchmark's eight
(free writing) and four that quote their input (rewrite, correct, extend a list, document
code), where lookup finds more. Anchor in the same run: the single-stream ``generate`` (its
compiled static step), the fastest path without drafts.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from archopt.bench.common import machine_line
from archopt.bench.serve_load import PROMPTS
from archopt.choices import SPECULATE, WEIGHT_CHOICES
from archopt.io import atomic_write_text, check_writable
from archopt.report import ArgumentParser, int_in

QUOTING = [
    "Rewrite this paragraph with the name Tom changed to Sam and nothing else changed: Tom "
    "walked to the market every morning. Tom bought bread, cheese and apples, and Tom always "
    "greeted the baker by name. On Sundays Tom stayed at home and read the newspaper.",
    "Correct the spelling and write the sentences out again: The quik brown fox jumpd over the "
    "lazzy dog while the farmer wachted from the feild. Later the fox ran bak to the forrest.",
    "Repeat this list, then add five more items in the same style:\n- red apples\n- green "
    "pears\n- yellow bananas\n- purple grapes\n- orange oranges",
    "Add a docstring to this Python function and return the whole function:\n\ndef mean(values):"
    "\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n",
]


def main(argv: list[str] | None = None) -> dict:
    ap = ArgumentParser(prog="archopt bench speculate", description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto")
    ap.add_argument("--threads", type=int_in(1, 1024), default=2)
    ap.add_argument("--new-tokens", type=int_in(2, 1 << 16), default=128)
    ap.add_argument("--rounds", type=int_in(1, 100), default=3)
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args(argv)
    if args.json:
        check_writable(args.json, "--json")
    torch.set_num_threads(args.threads)
    from archopt.generate import generate
    from archopt.loading.llm import load_llm
    from archopt.serve import Engine, SamplingParams

    model = load_llm(args.model, weights=args.weights)
    tok = model.tokenizer
    sets = {"free writing": PROMPTS, "quoting its input": QUOTING}
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    engines = {"drafts": Engine(model, compile="aot"), "no drafts": Engine(model, compile="aot")}
    engines["no drafts"].speculate = 0

    def ask(text: str) -> list[int]:
        return tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )

    chat = {name: [ask(p) for p in prompts] for name, prompts in sets.items()}
    print(machine_line(args.threads))
    report = {"machine": machine_line(args.threads), "weights": model.config.extra.get("weights"),
              "new_tokens": args.new_tokens, "speculate": SPECULATE, "sets": {}}  # fmt: skip
    for name, prompts in chat.items():
        rates = {k: [] for k in (*engines, "generate")}
        same, counts = True, {}
        for _ in range(args.rounds):
            for key, engine in engines.items():  # in turns, so a drift hits both alike
                d0, a0 = engine.drafted, engine.accepted
                t0 = time.perf_counter()
                outs = [engine.generate([p], params)[0].output for p in prompts]
                rates[key].append(len(prompts) * args.new_tokens / (time.perf_counter() - t0))
                counts[key] = (engine.drafted - d0, engine.accepted - a0)
                if key == "drafts":
                    spec_outs = outs
                else:
                    same &= outs == spec_outs
            t0 = time.perf_counter()
            for p in prompts:
                generate(model, [p], args.new_tokens, stop=None)
            rates["generate"].append(len(prompts) * args.new_tokens / (time.perf_counter() - t0))
        row = {k: {"best": max(v), "median": statistics.median(v)} for k, v in rates.items()}
        drafted, kept = counts["drafts"]
        row.update(drafted=drafted, kept=kept, same_tokens=same)
        report["sets"][name] = row
        ratio = row["drafts"]["median"] / row["no drafts"]["median"]
        print(f"{name} ({len(prompts)} prompts x {args.new_tokens} tokens, one at a time): "
              f"drafts {row['drafts']['median']:.1f} tokens/s, no drafts "
              f"{row['no drafts']['median']:.1f} ({ratio:.2f}x), generate "
              f"{row['generate']['median']:.1f} (medians of {args.rounds}); drafts kept "
              f"{kept}/{drafted} in the last round; same tokens: {same}")  # fmt: skip
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1))
    return report
