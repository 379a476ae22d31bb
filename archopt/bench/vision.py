"""Vision models on the CPU: ours (eager, optimized, compiled) vs timm eager vs onnxruntime.

MobileNet v1 and its full-conv baseline, MobileViT XXS/XS/S and ViT-Tiny.
Every contender runs the same weights in the same process, interleaved round by round, so the
ratios are fair even when the machine drifts. Run:

    archopt bench vision --threads 2 [--models ...] [--batch 1 8] [--inductor]
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings

import torch

import archopt
from archopt import loading
from archopt.bench.common import machine_line, matmul_gflops
from archopt.io import atomic_write_text, check_writable
from archopt.measure import count_macs, interleaved
from archopt.optimize import OnnxRuntimeModule, choose_backend
from archopt.report import ArgumentParser, int_in, log, table_head, table_row

# our registered name -> (timm name, key map); models without an entry have no timm column
TIMM_ANCHORS = {
    "mobilenet_v1_100": ("mobilenetv1_100", loading.mobilenet_v1_from_timm),
    "mobilevit_xxs": ("mobilevit_xxs", loading.mobilevit_from_timm),
    "mobilevit_xs": ("mobilevit_xs", loading.mobilevit_from_timm),
    "mobilevit_s": ("mobilevit_s", loading.mobilevit_from_timm),
    "vit_tiny_patch16_224": ("vit_tiny_patch16_224", loading.vit_from_timm),
}


def contenders_for(name: str, batch: int, inductor: bool, threads: int) -> tuple[dict, int]:
    torch.manual_seed(0)
    ours = archopt.create_model(name).eval()
    (x,) = ours.example_inputs(batch=batch)
    fns = {}
    if name in TIMM_ANCHORS:
        try:
            import timm

            timm_name, key_map = TIMM_ANCHORS[name]
            ref = timm.create_model(timm_name).eval()
            ours.load_state_dict(key_map(ref.state_dict()))
            fns["timm eager"] = ref
        except ImportError:
            log("timm not installed: no timm column")
    fns["ours eager"] = ours
    fns["ours optimized eager"] = archopt.optimize_for_inference(ours, x, compile=None)
    fns["ours optimized jit"] = archopt.optimize_for_inference(ours, x, compile="jit")
    # The default (compile="auto"): the fastest of eager / jit / onnxruntime that reproduces
    # the outputs, remembered in the cache folder. At batch 1 with no example, as a user calls
    # it; built twice in an empty cache folder: the second call finds the choice.
    with tempfile.TemporaryDirectory() as cache:
        old_cache, os.environ["ARCHOPT_CACHE"] = os.environ.get("ARCHOPT_CACHE"), cache
        try:
            builds = []
            for _ in range(2):
                t0 = time.perf_counter()
                default = archopt.optimize_for_inference(ours, *([] if batch == 1 else [x]))
                builds.append(time.perf_counter() - t0)
            choice = choose_backend(ours, x, remember=True)[0]
        finally:
            if old_cache is None:
                del os.environ["ARCHOPT_CACHE"]
            else:
                os.environ["ARCHOPT_CACHE"] = old_cache
    log(
        f"{name} batch {batch}: optimize_for_inference built in {builds[0]:.1f} s the first "
        f"time (it measures the backends), {builds[1]:.1f} s the second (remembered: {choice})"
    )
    fns[f"ours default optimize_for_inference (chose {choice})"] = default
    bf16 = torch.bfloat16
    fns["ours bf16 jit"] = archopt.optimize_for_inference(ours, x, compile="jit", dtype=bf16)
    if inductor:
        fns["ours optimized inductor"] = archopt.optimize_for_inference(ours, x, compile="inductor")
        fns["ours bf16 inductor"] = archopt.optimize_for_inference(
            ours, x, compile="inductor", dtype=bf16
        )
    try:
        with tempfile.TemporaryDirectory() as d:
            path = archopt.export_onnx(ours, os.path.join(d, "m.onnx"), x)
            fns["onnxruntime"] = OnnxRuntimeModule(str(path), threads=threads)
    except ImportError:
        log("onnxruntime not installed: no onnxruntime column")

    errors = {}
    with torch.inference_mode():
        expected = ours(x)
        for label, fn in fns.items():
            err = (fn(x) - expected).abs().max().item() / expected.abs().max().item()
            if err > (3e-2 if "bf16" in label else 1e-4):
                raise AssertionError(f"{label} differs from ours eager: max rel err {err:.2e}")
            errors[label] = err

    def call(fn):
        def run():
            with torch.inference_mode():
                return fn(x)

        return run

    return {k: call(v) for k, v in fns.items()}, errors, count_macs(ours, x.shape)


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="archopt bench vision", description=__doc__)
    p.add_argument("--threads", type=int_in(1, 1024), default=2)
    p.add_argument("--batch", type=int_in(1, 4096), nargs="+", default=[1, 8])
    p.add_argument("--models", nargs="+", default=["mobilenet_v1_100", "conv_mobilenet_v1_100"])
    p.add_argument("--rounds", type=int_in(1), default=7)
    p.add_argument("--inductor", action="store_true", help="also torch.compile (slow to build)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.json:
        check_writable(args.json, "--json")  # before the minutes of work, not after
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rate, rate_bf16 = matmul_gflops(), matmul_gflops(dtype=torch.bfloat16)
    print(
        f"# {machine_line(args.threads)}; matmul 2048^3: fp32 {rate:.0f} GFLOP/s, "
        f"bf16 {rate_bf16:.0f} GFLOP/s (floor/time uses the row's dtype)\n"
    )
    results = []
    for name in args.models:
        for batch in args.batch:
            log(f"{name} batch {batch}")
            fns, errors, macs = contenders_for(name, batch, args.inductor, args.threads)
            per_round = max(2, 10 // batch)
            stats = interleaved(fns, rounds=args.rounds, per_round=per_round)
            floor_ms = 2 * macs / (rate * 1e9) * 1e3
            floor_bf16_ms = 2 * macs / (rate_bf16 * 1e9) * 1e3
            base_timm = stats.get("timm eager", {}).get("median_ms")
            base_ort = stats.get("onnxruntime", {}).get("median_ms")
            print(f"## {name}, batch {batch}, {macs / 1e6:.0f} MMACs, floor {floor_ms:.2f} ms\n")
            head = ["contender", "median ms", "p10-p90 ms", "vs timm", "vs onnxruntime"]
            print(table_head([*head, "floor/time", "max rel err"]))
            for label, s in stats.items():
                vt = f"{s['median_ms'] / base_timm:.2f}x" if base_timm else "-"
                vo = f"{s['median_ms'] / base_ort:.2f}x" if base_ort else "-"
                floor = floor_bf16_ms if "bf16" in label else floor_ms
                print(table_row([
                    label, f"{s['median_ms']:.2f}", f"{s['p10_ms']:.2f}-{s['p90_ms']:.2f}", vt,
                    vo, f"{floor / s['median_ms']:.0%}", f"{errors[label]:.1e}",
                ]))  # fmt: skip
                results.append(
                    {"model": name, "batch": batch, "contender": label, "err": errors[label], **s}
                )
            print(flush=True)
    if args.json:
        record = {"machine": machine_line(args.threads), "results": results}
        atomic_write_text(args.json, json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
