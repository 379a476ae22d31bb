"""``load_gguf_llama``: a ``Llama`` from a GGUF file, dequantized or with its blocks kept, with
its tokenizer. The weights match what ``transformers`` loads from the same file
(``from_pretrained(dir, gguf_file=name)``) exactly; the tests check it on SmolLM2-135M-Instruct
and on random models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from archopt.errors import CheckpointError
from archopt.loading.gguf.llama import (
    ROPE_FREQS,
    check_llama_tensors,
    gguf_llama_hf_state_dict,
    llama_config_from_gguf,
    one_thread,
    rope_freqs,
)
from archopt.loading.gguf.quantized import keep_quantized_linears, kept_tensor_names
from archopt.loading.gguf.reader import read_gguf
from archopt.loading.gguf.tokenizer import gguf_tokenizer
from archopt.loading.llama import build_llama, llama_state_dict_from_hf
from archopt.models.llama import Llama


def load_gguf_llama(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    tokenizer: bool = True,
    keep_quantized: bool = False,
    kernel: bool | str = "auto",
) -> Llama:
    """A ``Llama`` from a GGUF file (dequantized to fp32, or ``dtype``), with its tokenizer.

    ``keep_quantized=True``: the linear layers stored as Q4_0, Q4_1 or Q8_0 keep their blocks
    (see ``keep_quantized_linears``) instead of being dequantized. ``kernel`` (with
    ``keep_quantized``): ``"auto"`` re-encodes them for torch's CPU int4 kernel where it takes
    the shape (``archopt.ops.quant.pack_for_cpu``: the same 4- and 8-bit values, scales rounded
    to bf16, bf16 activations), ``True`` requires it for every layer, ``False`` keeps the
    blocks bit for bit with exact fp32 products.

    A ``rope_freqs`` tensor (how convert_hf_to_gguf stores Llama 3.1's llama3 rope scaling)
    divides the rotary inverse frequencies, as llama.cpp does: it becomes the config's
    ``rope_scaling = {"rope_type": "freq_factors", "factors": [...]}``.

    Without transformers the model loads with ``tokenizer = None`` and the reason in
    ``config.extra["tokenizer_missing"]``, for whoever needs a tokenizer to report.
    """
    from archopt.ops.quant import check_kernel_arg, pack_for_cpu

    check_kernel_arg(kernel)
    gf = read_gguf(path)
    cfg = llama_config_from_gguf(gf)
    check_llama_tensors(gf, cfg)  # names, shapes and types, before any data is read
    freqs = rope_freqs(gf, cfg)
    if freqs is not None:
        if cfg.rope_scaling is not None:
            raise CheckpointError(
                f"{gf.path}: has both {ROPE_FREQS} and rope scaling metadata "
                f"({cfg.rope_scaling['rope_type']}); expected at most one"
            )
        cfg.rope_scaling = {"rope_type": "freq_factors", "factors": freqs.tolist()}
    tok = None
    if tokenizer:  # before the weights: a bad vocabulary fails early and cheaply
        try:
            tok = gguf_tokenizer(gf)
        except ImportError as e:
            cfg.extra["tokenizer_missing"] = f"the tokenizer needs a library that is missing ({e})"
    # Layers that keep their blocks are never dequantized (half the load time of SmolLM2).
    kept = kept_tensor_names(gf, cfg.num_layers) if keep_quantized else set()
    with one_thread():  # the q/k/v and gate/up concatenations too
        sd = llama_state_dict_from_hf(gguf_llama_hf_state_dict(gf, cfg, kept), cfg)
    model = build_llama(cfg, sd, dtype)
    if keep_quantized:
        keep_quantized_linears(model, gf)
        left = [n for n, t in model.state_dict().items() if t.is_meta]
        if left:  # kept_tensor_names and keep_quantized_linears disagree: a bug of ours
            raise RuntimeError(f"{gf.path}: layers left without weights: {left[:5]}")
        if kernel:
            cfg.extra["cpu_kernel"] = pack_for_cpu(model, strict=kernel is True)
    model.tokenizer = tok
    return model
