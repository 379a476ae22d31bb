"""Tour section for Longformer's local attention: time and memory as the sequence grows."""

from __future__ import annotations

from pathlib import Path

import torch

from archopt.report import markdown_table
from archopt.tour.common import Claim, Section, tour_log


def longformer_section(
    out: Path, *, threads: int | None, repeats: int, progress: bool, quick: bool = False
) -> Section:
    """Local attention vs dense attention: time and peak memory as the sequence grows."""
    import math

    import torch.nn.functional as F

    from archopt.measure import measure_latency, measure_peak_memory, num_threads
    from archopt.ops.attention import local_attention
    from archopt.ops.attention.reference import band_mask

    heads, dim, window = 12, 64, 256
    # Quick mode halves the lengths: the growth exponents need a 4x span, not big N.
    lengths = [512, 1024, 2048] if quick else [1024, 2048, 4096]
    rows, data = [], []
    with num_threads(threads), torch.inference_mode():
        for n in lengths:
            tour_log(f"Longformer: N={n}", progress)
            q, k, v = (torch.randn(1, heads, n, dim) for _ in range(3))
            mask = band_mask(n, window)

            def ours(q=q, k=k, v=v):
                return local_attention(q, k, v, window=window, backend="blocked")

            def dense(q=q, k=k, v=v):  # materializes the (N, N) scores, as textbook attention
                return local_attention(q, k, v, window=window, backend="reference")

            def sdpa(q=q, k=k, v=v, m=mask):  # torch's fused kernel with the band as a mask
                return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

            row = {"n": n}
            for name, fn in (("local", ours), ("dense", dense), ("sdpa", sdpa)):
                row[f"{name}_ms"] = measure_latency(
                    fn, (), warmup=2, repeats=max(3, repeats // 4)
                ).median_ms
            row["local_peak"] = measure_peak_memory(ours).bytes
            row["dense_peak"] = measure_peak_memory(dense).bytes
            data.append(row)
            rows.append(
                [
                    n,
                    f"{row['local_ms']:.1f}",
                    f"{row['dense_ms']:.1f}",
                    f"{row['sdpa_ms']:.1f}",
                    f"{row['sdpa_ms'] / row['local_ms']:.1f}x",
                    f"{row['local_peak'] / 2**20:.0f}",
                    f"{row['dense_peak'] / 2**20:.0f}",
                ]
            )

    def slope(key: str) -> float:
        a, b = data[0], data[-1]
        return math.log(b[key] / a[key]) / math.log(b["n"] / a["n"])

    growth = {k: slope(k) for k in ("local_ms", "dense_ms", "local_peak", "dense_peak")}
    md = [
        f"12 heads, d=64, one-sided window w={window} (2w+1 = {2 * window + 1} keys per "
        "query), batch 1, fp32 forward. 'dense' is textbook masked attention (it materializes "
        "the N x N scores); 'SDPA' is torch's fused kernel given the band as a mask. Peak "
        "memory: bytes of tensors alive during the call (archopt.measure, method 'tensors').",
        "",
        markdown_table(
            [
                "N",
                "local ms",
                "dense ms",
                "SDPA+mask ms",
                "local vs SDPA",
                "local peak MiB",
                "dense peak MiB",
            ],
            rows,
        ),
        "",
        "**Claim: local attention costs O(N) instead of O(N^2).** Growth exponents from "
        f"N={lengths[0]} to N={lengths[-1]} (1 = linear, 2 = quadratic): local time "
        f"{growth['local_ms']:.2f}, memory {growth['local_peak']:.2f}; dense time "
        f"{growth['dense_ms']:.2f}, memory {growth['dense_peak']:.2f}. The full sweep to "
        "N=16384 with FlexAttention and Hugging Face is `archopt bench attention`.",
    ]
    span = f"N={lengths[0]} to {lengths[-1]}"
    claims = [
        Claim(
            "Local (sliding window) attention memory grows linearly with N",
            f"growth exponent {growth['local_peak']:.2f} ({span})",
            growth["local_peak"] < 1.2,
            "exponent < 1.2 (at most linear)",
        ),
        Claim(
            "Local attention time grows linearly with N",
            f"growth exponent {growth['local_ms']:.2f} ({span})",
            growth["local_ms"] < 1.3,
            "exponent < 1.3 (about linear)",
        ),
        Claim(
            "Full attention memory grows quadratically with N",
            f"growth exponent {growth['dense_peak']:.2f} ({span})",
            growth["dense_peak"] > 1.8,
            "exponent > 1.8",
        ),
    ]
    return Section(
        title="Longformer local attention",
        markdown="\n".join(md),
        data={"results": data, "growth_exponents": growth},
        claims=claims,
    )
