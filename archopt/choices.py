"""The choices a user names, on the command line and in the API, with nothing heavy imported:
the command line offers them, and refuses a wrong one, before torch loads (``archopt --help``
and a mistyped flag answer at once). The weight formats of a language model (the one table:
``archopt.loading.llm`` loads by it) and the decode paths of ``archopt.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WeightFormat:
    name: str
    dtype: str  # torch's name of the dtype of the tensors that stay unquantized
    quantize: tuple[str, str | None] | None  # quantize_weights's (kind, head kind)
    keep_gguf_blocks: bool  # the file's own blocks, not re-quantized
    exact: bool  # every product in fp32 on the checkpoint's own values
    help: str
    int8_activations: bool = False  # GGUF blocks times int8 activations (archopt.ops.act8)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        WeightFormat("fp32", "float32", None, False, True, "fp32 (GGUF blocks dequantized)"),
        WeightFormat("bf16", "bfloat16", None, False, False, "bf16 weights and activations"),
        WeightFormat("int8", "float32", ("int8", None), False, False,
                     "int8 per channel, quantized here (CPU int4 kernel, bf16 activations)"),
        WeightFormat("int4", "float32", ("int4", None), False, False,
                     "int4 in groups of 32, quantized here"),
        WeightFormat("int4-head8", "float32", ("int4", "int8"), False, False,
                     "int4 with an int8 output projection"),
        WeightFormat("gguf", "float32", None, True, False,
                     "the GGUF file's own Q4_0/Q4_1/Q8_0 blocks (torch's CPU int4 kernel)"),
        WeightFormat("gguf-act8", "float32", None, True, False,
                     "the GGUF file's own blocks times int8 activations, as llama.cpp "
                     "computes them (archopt's AVX512-VNNI kernels)", int8_activations=True),
    )
}  # fmt: skip
WEIGHT_CHOICES = ("auto", *WEIGHT_FORMATS)


def check_weights(weights: str) -> None:
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")


# What ``compile=`` takes, besides True/False, a torch.compile backend name and a CompiledStep:
# "auto": the step compiled ahead of time when it is on disk (else eager, and, for a model
# loaded by load_llm, built in the background for later processes); "aot": that step, built now
# if needed; "off": eager; "inductor" / "inductor-cpp": torch.compile in this process;
# "cuda-graph": on a GPU, the eager step recorded once as a CUDA graph and replayed (what "auto"
# picks there: recording costs about one step, so it pays from the second token).
COMPILE_MODES = ("auto", "aot", "off", "inductor", "inductor-cpp", "cuda-graph")
# What the serving engine's ``compile=`` (``archopt serve --compile``) takes, besides a compiled
# paged step: "auto": the step from the cache folder, else eager while it is built in the
# background; "aot": build it now if it is not there; "off": eager.
SERVE_COMPILE_MODES = ("auto", "aot", "off")

# The serving engine's speculative decoding (``archopt.serve.speculate``): up to SPECULATE
# drafts a plain greedy request verifies a step, while at most SPECULATE_BATCH requests decode.
# Measured on SmolLM2-135M (2 threads, 128-token answers): one stream +7-10% tokens/s; two
# streams with drafts -1 to -5%, four -12% (a batch already reads the weights for several
# rows, and more rows cost more than the drafts give back; benchmarks/RESULTS.md, serving).
SPECULATE, SPECULATE_BATCH = 3, 1

# The serving engine's KV cache: "auto" keeps keys and values in the model's dtype (the tokens
# of one request alone, of ``generate``); float16 or bfloat16 halve the pool's memory and what
# attention reads (a float32 model's values rounded as written; llama.cpp's default is f16).
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16")

__all__ = [
    "COMPILE_MODES", "KV_CACHE_DTYPES", "SERVE_COMPILE_MODES", "SPECULATE", "SPECULATE_BATCH",
    "WEIGHT_CHOICES", "WEIGHT_FORMATS", "WeightFormat", "check_weights",
]  # fmt: skip
