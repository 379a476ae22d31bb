"""The tokenizer of a GGUF's vocabulary, with its chat template.

Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are built directly with
``tokenizers`` from the metadata already read: going through
``AutoTokenizer.from_pretrained(gguf_file=...)`` re-reads the file with ``GGUFReader`` and takes
about 4 s, and it ignores the per-digit split that llama.cpp (and the original Hugging Face
tokenizer) apply for SmolLM's ``smollm`` pre-tokenizer. Other vocabularies (sentencepiece
``llama``, the regex-split BPE families) go through transformers.
"""

from __future__ import annotations

from archopt.errors import CheckpointError
from archopt.loading.gguf.reader import GGUFFile

# llama.cpp's pre-tokenizers that are GPT-2's byte-level regex, alone or after splitting every
# digit apart (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*). Others need transformers' tables.
_GPT2_PRE = {"default", "gpt2", "mpt", "olmo", "jais"}
_DIGIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone"}


def gguf_tokenizer(gf: GGUFFile):
    """A tokenizer for the vocabulary in ``gf``, with its chat template.

    Byte-level BPE vocabularies get ``archopt.loading.tokenizer.Tokenizer`` (``tokenizers``
    alone, no transformers); others go through transformers. None when the file carries no
    vocabulary; ImportError when the library it needs is missing; ``CheckpointError`` (a
    ValueError) naming the field for vocabularies it cannot build.
    """
    meta = gf.metadata
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        return None
    _check_vocabulary(gf)
    template = meta.get("tokenizer.chat_template")
    if kind == "gpt2" and (pre in _GPT2_PRE or pre in _DIGIT_PRE):
        from archopt.loading.tokenizer import Tokenizer

        tokens = meta["tokenizer.ggml.tokens"]

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            ok = isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens)
            return tokens[i] if ok else None

        try:
            core = _byte_level_bpe(meta, digits=pre in _DIGIT_PRE)
        except ImportError:
            raise
        except Exception as e:  # tokenizers raises its own bare Exception for bad tables
            raise CheckpointError(
                f"{gf.path}: cannot build its byte-level BPE tokenizer from "
                f"tokenizer.ggml.tokens and tokenizer.ggml.merges: {e}"
            ) from e
        return Tokenizer(
            core,
            bos_token=token("bos"),
            eos_token=token("eos"),
            unk_token=token("unknown"),
            pad_token=token("padding"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=template,
        )
    # ImportError without transformers: load_gguf_llama records it and loads without one.
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gf.path.parent), gguf_file=gf.path.name)
    except Exception as e:  # transformers raises many kinds; the caller needs one
        raise CheckpointError(
            f"{gf.path}: cannot build its {kind!r} tokenizer (pre-tokenizer "
            f"{pre!r}) through transformers: {e}; load with tokenizer=False "
            "to skip it"
        ) from e
    if template is not None:
        tok.chat_template = template
    return tok


def _check_vocabulary(gf: GGUFFile) -> None:
    """The vocabulary's fields, each of the type the format gives it."""
    meta = gf.metadata

    def fail(key: str, expected: str) -> CheckpointError:
        got = meta[key]
        got = f"a list starting {got[:4]!r}" if isinstance(got, list) else got
        return CheckpointError(f"{gf.path}: {key}", expected, got)

    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        if key in meta and not isinstance(meta[key], str):
            raise fail(key, "a string")
    tokens = meta["tokenizer.ggml.tokens"]
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise fail("tokenizer.ggml.tokens", "an array of strings")
    merges = meta.get("tokenizer.ggml.merges", [])
    if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
        raise fail("tokenizer.ggml.merges", "an array of strings 'left right'")
    types = meta.get("tokenizer.ggml.token_type", [])
    ints = isinstance(types, list) and all(isinstance(k, int) for k in types)
    if not ints or (types and len(types) != len(tokens)):
        raise fail(
            "tokenizer.ggml.token_type", f"an array of {len(tokens)} integers (one per token)"
        )


def _byte_level_bpe(meta: dict, digits: bool):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    # Token types (llama.cpp): 3 control (special, e.g. <|im_start|>), 4 user-defined; both are
    # matched whole in the text instead of being split by BPE.
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    )
    return tok
