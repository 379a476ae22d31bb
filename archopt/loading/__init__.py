"""Checkpoints: ``load_llm`` (the door for language models), GGUF, and the key maps of the
reference implementations (timm, Hugging Face) for the image models and Longformer.

``llm``: ``load_llm`` (by the one ``WEIGHT_FORMATS`` table, in ``archopt.choices``);
``prepared``: loaded models kept in the cache folder; ``gguf/``: llama.cpp's files;
``llama``, ``tokenizer``: Hugging Face Llama checkpoints and tokenizers; ``keymap``,
``mobilenet_v1``, ``mobilevit``, ``vit``, ``longformer``: key maps. Imports ops and models
(blocks from ops, never from models' files); never generate, measure or above.
"""

from archopt.choices import WEIGHT_FORMATS
from archopt.loading.keymap import rename_keys
from archopt.loading.llama import llama_config_from_hf
from archopt.loading.llm import load_llm
from archopt.loading.longformer import longformer_config_from_hf, longformer_from_hf
from archopt.loading.mobilenet_v1 import (
    mobilenet_v1_config_from_hf,
    mobilenet_v1_from_hf,
    mobilenet_v1_from_timm,
)
from archopt.loading.mobilevit import (
    mobilevit_config_from_hf,
    mobilevit_from_hf,
    mobilevit_from_timm,
)
from archopt.loading.vit import vit_from_timm

# GGUF needs the optional `gguf` package: imported on first use, so `archopt.loading` works
# without it.
_GGUF_EXPORTS = ("GGUFFile", "GGUFTensor", "load_gguf_llama", "read_gguf")


def __getattr__(name: str):
    if name in _GGUF_EXPORTS:
        from archopt.loading import gguf

        return getattr(gguf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "WEIGHT_FORMATS",
    "GGUFFile",
    "GGUFTensor",
    "llama_config_from_hf",
    "load_gguf_llama",
    "load_llm",
    "longformer_config_from_hf",
    "longformer_from_hf",
    "mobilenet_v1_config_from_hf",
    "mobilenet_v1_from_hf",
    "mobilenet_v1_from_timm",
    "mobilevit_config_from_hf",
    "mobilevit_from_hf",
    "mobilevit_from_timm",
    "read_gguf",
    "rename_keys",
    "vit_from_timm",
]
