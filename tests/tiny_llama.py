"""A tiny Llama with sharpened random weights, and helpers the decoding tests share."""

import torch

import archopt


def sharp_tiny_llama(max_positions: int = 160) -> torch.nn.Module:
    torch.manual_seed(0)
    m = archopt.create_model("llama-tiny", max_position_embeddings=max_positions).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init: fewer near-ties
        for p in m.parameters():
            p.mul_(4.0)
    return m


def assert_close(a, b):
    # Sums in a different order (chunked vs one-shot): relative to the logit scale.
    scale = 1e-12 if b.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(a, b, rtol=0, atol=scale * b.abs().max().item())


def rand_ids(*shape, seed=0):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))
