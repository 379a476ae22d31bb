"""Where the serving engine's compiled paged step comes from, and which kind it is.

Given, found in the cache folder, built now (``compile="aot"``), or, with ``"auto"`` and none
on disk, built by a process of its own in the background (``archopt.background_build``) while
the engine serves eager, and taken once it lands. The engine asks ``busy`` (a build in
flight, or its process still running: it may go on to build what a later start loads) to
keep to one thread meanwhile, and ``poll`` for the step.
"""

from __future__ import annotations

import time

import torch

from archopt import background_build, decode_step
from archopt.choices import KV_CACHE_DTYPES, SERVE_COMPILE_MODES

POLL_BUILD_S = 2.0


def check_compile(mode) -> None:
    if not isinstance(mode, decode_step.CompiledPagedStep) and mode not in SERVE_COMPILE_MODES:
        raise ValueError(
            f"compile must be one of {', '.join(SERVE_COMPILE_MODES)} or a compiled paged step, "
            f"got {mode!r}"
        )


def kv_cache_kind(model, kv_cache_dtype: str) -> tuple[torch.dtype, str]:
    """The KV pool's dtype for ``kv_cache_dtype`` (``KV_CACHE_DTYPES``), and the kind of
    compiled step that reads it (``archopt.step_graphs.KINDS``)."""
    own = model.embed.weight.dtype
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}"
        )
    dtype = own if kv_cache_dtype == "auto" else getattr(torch, kv_cache_dtype)
    if dtype == own:
        return dtype, "paged"
    if own != torch.float32:
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r} needs a model computing in float32, got one in "
            f"{str(own).removeprefix('torch.')} (keep kv_cache_dtype='auto')"
        )
    return dtype, f"paged-{kv_cache_dtype}"


class StepSource:
    """``model``'s compiled paged step of ``kind`` (``"paged"``, or ``"paged-float16"`` for
    pools of that dtype: ``archopt.step_graphs.KINDS``) per ``mode`` (``SERVE_COMPILE_MODES`` or
    a step): ``step`` (None while there is none) and ``how`` (what was chosen, in words)."""

    def __init__(self, model, mode, progress: bool = False, kind: str = "paged") -> None:
        check_compile(mode)
        self.model, self.kind = model, kind
        self.step: decode_step.CompiledPagedStep | None = None
        self.threads = torch.get_num_threads()  # the step's key names the thread count
        self._building: object = None  # the folder a background build writes, polled
        self._builder: int | None = None  # that build's process, until it exits
        self._next_poll = 0.0
        self.how = self._plan(mode, progress)

    def _plan(self, mode, progress: bool) -> str:
        if isinstance(mode, decode_step.CompiledPagedStep):
            if mode.kind != self.kind:
                raise ValueError(
                    f"the compiled step given is a {mode.kind!r} step; this cache needs a "
                    f"{self.kind!r} one (compile_step(model, kind={self.kind!r}))"
                )
            self.step = mode
            return "aot (given)"
        if mode == "off":
            return "eager"
        if self.model.embed.weight.device.type != "cpu":
            if mode == "aot":
                raise ValueError("compile='aot' runs on the CPU, got a model on another device")
            return "eager (the compiled step is for the CPU)"
        if mode == "aot":
            self.step = decode_step.compile_step(self.model, kind=self.kind, progress=progress)
            return "aot"
        self.step = decode_step.cached_step(self.model, self.kind)
        if self.step is not None:
            return "aot (compiled step from cache)"
        folder = decode_step.step_folder(self.model, self.kind)
        if folder is not None and background_build.building(folder):
            self._building = folder
        elif background_build.can_build_in_background(self.model):
            self._building = background_build.build_in_background(self.model, self.kind)
        if self._building is None:
            return "eager"
        self._builder = background_build.builder(self._building)
        return "eager until the compiled step is built (in the background)"

    @property
    def busy(self) -> bool:
        """A background build in flight, or its process still running."""
        return self._building is not None or self._builder is not None

    def poll(self) -> bool:
        """Look (at most every ``POLL_BUILD_S``) whether the background build has landed, and
        take its step; note when the build's process ends. True when ``step`` changed."""
        now = time.perf_counter()
        if now < self._next_poll:
            return False
        self._next_poll = now + POLL_BUILD_S
        if self._builder is not None and not background_build.alive(self._builder):
            self._builder = None
        if self._building is None or background_build.building(self._building):
            return False
        self._building = None
        torch.set_num_threads(self.threads)
        self.step = decode_step.cached_step(self.model, self.kind)
        self.how = "aot (built in the background)" if self.step else "eager"
        return True
