"""GGUF files (llama.cpp's format) and LLaMA models from them, one job per module:

- ``reader``: the header, metadata and raw tensors (``read_gguf``, ``GGUFFile``, ``GGUFTensor``);
- ``dequant``: raw blocks to fp32 (``dequantize``, ``supported_types``);
- ``llama``: the LLaMA config, tensor names and Q/K permutation (``llama_config_from_gguf``,
  ``gguf_llama_hf_state_dict``, ``unpermute_qk``);
- ``quantized``: Q4_0 / Q4_1 / Q8_0 blocks kept as quantized linears (``keep_quantized_linears``);
- ``tokenizer``: the vocabulary's tokenizer (``gguf_tokenizer``);
- ``load``: all of it together, ``load_gguf_llama``.

Imports go reader/dequant -> llama -> quantized, tokenizer -> load. The weights match what
``transformers`` loads from the same file exactly; the tests check it on SmolLM2-135M-Instruct
and on random models. Needs the optional ``gguf`` package (its type tables, and the reference
dequantizer for the block types decoded at numpy speed).
"""

from archopt.loading.gguf.dequant import QType, dequantize, supported_types
from archopt.loading.gguf.llama import (
    ROPE_FREQS,
    SUPPORTED_ARCHITECTURES,
    gguf_llama_hf_state_dict,
    llama_config_from_gguf,
    unpermute_qk,
)
from archopt.loading.gguf.load import load_gguf_llama
from archopt.loading.gguf.quantized import keep_quantized_linears
from archopt.loading.gguf.reader import GGUFFile, GGUFTensor, read_gguf
from archopt.loading.gguf.tokenizer import gguf_tokenizer

__all__ = [
    "ROPE_FREQS",
    "SUPPORTED_ARCHITECTURES",
    "GGUFFile",
    "GGUFTensor",
    "QType",
    "dequantize",
    "gguf_llama_hf_state_dict",
    "gguf_tokenizer",
    "keep_quantized_linears",
    "llama_config_from_gguf",
    "load_gguf_llama",
    "read_gguf",
    "supported_types",
    "unpermute_qk",
]
