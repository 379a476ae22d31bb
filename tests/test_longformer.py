"""Longformer module and encoder against Hugging Face (random init, built locally)."""

import pytest
import torch

import archopt
from archopt.loading.longformer import longformer_config_from_hf, longformer_from_hf
from archopt.measure import count_params
from archopt.models.longformer import LongformerModel

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'archopt[hf]')"
)


def hf_pair(windows=(4, 8), layers=2, **overrides):
    cfg = transformers.LongformerConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        attention_window=list(windows),
        max_position_embeddings=80,
        pad_token_id=1,
        type_vocab_size=1,
    )
    theirs = transformers.LongformerModel(cfg).eval()
    ours = LongformerModel(longformer_config_from_hf(cfg, **overrides)).eval()
    ours.load_state_dict(longformer_from_hf(theirs.state_dict()), strict=True)
    return theirs, ours


def inputs(b=2, n=37, pad=(0, 5), globals_=((0,), (0, 3, 20))):
    ids = torch.randint(3, 97, (b, n))
    mask = torch.ones(b, n, dtype=torch.long)
    for row, p in enumerate(pad):
        if p:
            ids[row, n - p :] = 1
            mask[row, n - p :] = 0
    glob = torch.zeros(b, n, dtype=torch.long)
    for row, idx in enumerate(globals_):
        glob[row, list(idx)] = 1
    return ids, mask, glob


@pytest.mark.parametrize("with_global", [False, True])
@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_model_matches_hf(with_global, with_padding, backend):
    torch.manual_seed(0)
    theirs, ours = hf_pair(backend=backend)
    ids, mask, glob = inputs()
    kwargs = {}
    if with_padding:
        kwargs["attention_mask"] = mask
    if with_global:
        kwargs["global_attention_mask"] = glob
    with torch.no_grad():
        expected = theirs(input_ids=ids, **kwargs)
        got = ours(ids, **kwargs)
    valid = mask.bool() if with_padding else torch.ones_like(mask, dtype=torch.bool)
    # HF's outputs at padded positions are not meaningful (it zeroes them mid-layer and then
    # adds residuals); compare the real tokens, and the pooler.
    torch.testing.assert_close(
        got.last_hidden_state[valid], expected.last_hidden_state[valid], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)


def test_lengths_that_hf_must_pad():
    # HF pads to a multiple of the full window; ours handles any length directly.
    torch.manual_seed(1)
    theirs, ours = hf_pair(windows=(8, 8))
    for n in (1, 9, 23):
        ids, _mask, glob = inputs(b=1, n=n, pad=(0,), globals_=((0,),))
        with torch.no_grad():
            a = theirs(input_ids=ids, global_attention_mask=glob).last_hidden_state
            b = ours(ids, global_attention_mask=glob).last_hidden_state
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_self_attention_module_matches_hf():
    torch.manual_seed(2)
    theirs, ours = hf_pair()
    hf_attn = theirs.encoder.layer[0].attention.self
    attn = ours.layers[0].attn
    b, n = 2, 24  # HF's module needs a multiple of its full window
    h = torch.randn(b, n, 32)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[1, -4:] = True
    glob = torch.zeros(b, n, dtype=torch.bool)
    glob[0, [0, 7]] = True
    glob[1, 2] = True
    hf_mask = torch.zeros(b, n)
    hf_mask[pad] = -10000.0
    hf_mask[glob] = 10000.0
    with torch.no_grad():
        expected = hf_attn(
            h,
            attention_mask=hf_mask,
            is_index_masked=pad,
            is_index_global_attn=glob,
            is_global_attn=True,
        )[0]
        got = attn(h, glob, pad)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_padded_hidden_states_never_reach_local_or_global_rows(bad):
    """Masks win over values: whatever a padded position holds, the real tokens' outputs
    (local rows and the global ones, which attend every token) are those with zeros there."""
    from archopt.models.longformer import LongformerSelfAttention

    torch.manual_seed(3)
    attn = LongformerSelfAttention(32, 4, window=4).eval()
    h = torch.randn(2, 19, 32)
    pad = torch.zeros(2, 19, dtype=torch.bool)
    pad[1, -5:] = True
    glob = torch.zeros(2, 19, dtype=torch.bool)
    glob[:, [0, 6]] = True
    clean, dirty = h.clone(), h.clone()
    clean[pad] = 0.0
    dirty[pad] = bad
    with torch.no_grad():
        want, got = attn(clean, glob, pad), attn(dirty, glob, pad)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_preset_shapes_and_bad_input():
    model = archopt.create_model("longformer_base_4096")
    assert count_params(model) == 148_659_456
    assert model.config.window == 256  # HF's attention_window 512
    small = archopt.create_model("longformer_base_4096", num_layers=1, max_position_embeddings=20)
    with pytest.raises(ValueError, match="sequence length 30 needs 32 position embeddings"):
        small(torch.randint(3, 100, (1, 30)))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(1, 8\)"):
        small(torch.randint(3, 100, (1, 8)), attention_mask=torch.ones(1, 9))
    with pytest.raises(ValueError, match="window must be an int or one value per layer"):
        archopt.create_model("longformer_base_4096", window=(2, 3))
