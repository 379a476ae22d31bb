"""Whether the code running now is being recorded into a graph rather than run.

Inside ``torch.compile``'s tracing, and while a CUDA graph captures, the checks that read a
tensor's value on the host (a device sync, a data-dependent branch) must not run: a compiled or
captured step is checked once, by the caller, before it is built.
"""

from __future__ import annotations

import torch


def in_graph() -> bool:
    """True while torch.compile traces or a CUDA stream captures a graph."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
