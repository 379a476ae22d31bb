"""Serving: continuous batching over a paged KV cache, and an OpenAI-compatible HTTP server.

``Engine`` (engine.py) steps the model over many requests at once; ``Scheduler``
(scheduler.py) decides who runs; logits.py holds a request's own logit bias, penalties and
log-probabilities, detokenize.py its text; ``app.py`` serves it over HTTP (starlette and uvicorn,
imported only there), with ``protocol.py`` for the OpenAI API's requests (parsed and
checked, errors) and ``responses.py`` for its answers (whole, and streamed as server-sent
events).
"""

from archopt.serve.engine import Engine
from archopt.serve.scheduler import QueueFull, Request, SamplingParams, Scheduler

__all__ = ["Engine", "QueueFull", "Request", "SamplingParams", "Scheduler"]
