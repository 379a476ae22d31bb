"""A tokenizer over the ``tokenizers`` library alone, with a chat template, for GGUF vocabularies.

Importing transformers costs about 2 s of a 3 s command; the byte-level BPE vocabularies in GGUF
files (SmolLM, GPT-2, Llama 3 style) need only ``tokenizers`` (its Rust core) and the chat
template only jinja2 (a dependency of torch). This class offers the handful of methods of a
transformers tokenizer that archopt calls (``encode``, ``decode``, ``apply_chat_template``, the
special tokens); ``tests/test_gguf.py`` checks it against transformers on the same file.
"""

from __future__ import annotations

import json
from functools import cache


@cache
def _template(source: str):
    """A compiled chat template, in a sandbox, with the helpers chat templates expect."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
        x, ensure_ascii=False, indent=indent
    )
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    from jinja2 import TemplateError

    try:
        return env.from_string(source)
    except TemplateError as e:  # a checkpoint's template is the checkpoint's fault
        raise ValueError(f"the chat template does not compile: {e}") from None


class Tokenizer:
    """``tokenizers.Tokenizer`` with the special tokens and chat template of a checkpoint."""

    def __init__(
        self,
        core,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.core = core
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_template = chat_template

    def __len__(self) -> int:
        return self.core.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.core.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.core.token_to_id(tokens)
        return [self.core.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.core.id_to_token(ids)
        return [self.core.id_to_token(i) for i in ids]

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.core.token_to_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.core.token_to_id(self.bos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.core.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token and self.eos_token_id is not None:
                ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.core.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_tensors: str | None = None,
        **kwargs,
    ):
        """The conversation as the template writes it; token ids unless ``tokenize=False``
        (``return_tensors="pt"``: a (1, T) tensor, as transformers returns)."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        from jinja2 import TemplateError

        try:
            text = _template(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except TemplateError as e:
            raise ValueError(f"the chat template failed on these messages: {e}") from None
        if not tokenize:
            return text
        # The template writes the special tokens itself: no BOS/EOS added on top.
        ids = self.encode(text, add_special_tokens=False)
        if return_tensors == "pt":
            import torch

            return torch.tensor([ids])
        return ids
