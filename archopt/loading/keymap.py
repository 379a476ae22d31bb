"""Helpers for renaming checkpoint keys with ordered regex rules."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch

Rule = tuple[str, str | Callable[[re.Match], str]]


def rename_keys(
    state_dict: Mapping[str, torch.Tensor], rules: Iterable[Rule], *, source: str
) -> dict[str, torch.Tensor]:
    """Rename every key with the first rule whose pattern matches it in full.

    A key that no rule matches raises: a silently dropped tensor would make a strict load of the
    result fail far from the cause, or, worse, pass with a layer left at its random init.
    """
    compiled = [(re.compile(p), r) for p, r in rules]
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for pattern, repl in compiled:
            m = pattern.fullmatch(key)
            if m:
                new = repl(m) if callable(repl) else m.expand(repl)
                break
        else:
            raise KeyError(f"unexpected key {key!r} in a {source} state dict: no mapping for it")
        if new in out:
            raise KeyError(f"two {source} keys map to {new!r}")
        out[new] = value
    return out
