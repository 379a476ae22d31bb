"""Speculative decoding's parts: the n-gram drafter against a scan by hand, the count of
confirmed drafts, and the paged cache's rewind past rejected drafts. The engine's exactness
with drafts is in tests/test_serve.py, beside the compiled step it needs."""

import random

import pytest
import torch

from archopt.ops.paged_kv import PagedKVCache
from archopt.serve.speculate import NgramDrafter, accepted


def drafts_by_hand(tokens, k, min_n, max_n):
    """The longest n in [min_n, max_n] whose last-n tokens occur earlier; what followed their
    latest earlier occurrence."""
    for n in range(max_n, min_n - 1, -1):
        if len(tokens) <= n:
            continue
        tail = tokens[-n:]
        for s in range(len(tokens) - n - 1, -1, -1):
            if tokens[s : s + n] == tail:
                return tokens[s + n : s + n + k]
    return []


@pytest.mark.parametrize("seed", range(6))
def test_the_drafter_fed_token_by_token_proposes_what_a_scan_finds(seed):
    rng = random.Random(seed)
    min_n = rng.randint(1, 3)
    max_n = rng.randint(min_n, 5)
    vocab = rng.choice([2, 3, 5, 50])  # small vocabularies repeat often, large ones rarely
    tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]  # a prompt
    drafter = NgramDrafter(min_n, max_n)
    for _ in range(120):
        k = rng.randint(0, 6)
        assert drafter.propose(tokens, k) == (drafts_by_hand(tokens, k, min_n, max_n) if k else [])
        tokens += [rng.randrange(vocab) for _ in range(rng.choice([1, 1, 1, 3]))]


def test_the_drafter_finds_a_repeated_phrase_and_never_its_own_tail():
    d = NgramDrafter(min_n=2, max_n=3)
    assert d.propose([1, 2, 3, 4, 9, 2, 3], 3) == [4, 9, 2]  # "2 3" came before: "4 9 2" next
    assert d.propose([5, 5], 2) == []  # the tail is the only "5 5"
    assert NgramDrafter(1, 1).propose([5, 5], 2) == [5]
    assert d.propose([1, 2, 3, 4, 9, 2, 3], 0) == []
    with pytest.raises(ValueError, match="min_n <= max_n"):
        NgramDrafter(3, 2)
    with pytest.raises(ValueError, match="1 <= min_n"):
        NgramDrafter(0, 2)


def test_accepted_counts_the_drafts_up_to_the_first_the_model_overrules():
    assert accepted([4, 5, 6], [4, 5, 6]) == 3
    assert accepted([4, 5, 6], [4, 7, 6]) == 1  # 6 stood on a 5 the model did not choose
    assert accepted([4, 5, 6], [1, 5, 6]) == 0
    assert accepted([], []) == 0


def pool(**kw):
    args = dict(num_layers=2, kv_heads=2, head_dim=4, capacity=64, block_size=4, num_blocks=8)
    return PagedKVCache(**{**args, **kw})


def write(cache, seq, n):
    """n tokens of ``seq`` through the eager protocol (positions continuing its length)."""
    start = cache.sequence_length(seq)
    cache.bind([seq])
    pos = torch.arange(start, start + n).view(1, n)
    for layer in range(cache.num_layers):
        k = torch.randn(1, cache.kv_heads, n, cache.head_dim)
        cache.attend(layer, k.repeat(1, 1, 1, 1), k, k, pos)


def test_rewind_forgets_uncommitted_tokens_and_frees_the_blocks_only_they_used():
    cache = pool()
    cache.add_sequence(0)
    write(cache, 0, 5)
    cache.commit(0, [1, 2, 3, 4, 5])
    write(cache, 0, 6)  # 6 drafts: positions 5..10, into blocks 1 and 2
    assert cache.sequence_length(0) == 11 and len(cache.block_table(0)) == 3
    free_before = cache.allocator.num_unused
    cache.rewind(0, 6)  # one draft kept
    assert cache.sequence_length(0) == 6 and len(cache.block_table(0)) == 2
    assert cache.allocator.num_unused == free_before + 1
    table = cache.block_table(0)
    slots = [table[p // 4] * 4 + p % 4 for p in range(6)]
    assert cache.slot_pos[slots].tolist() == list(range(6))
    assert (cache.slot_pos[table[1] * 4 + 2 : table[1] * 4 + 4] == -1).all()  # 6, 7 forgotten
    cache.commit(0, [6])
    with pytest.raises(ValueError, match=r"rewind to 6\.\.6 tokens"):
        cache.rewind(0, 5)  # below what is committed
    with pytest.raises(ValueError, match="got 7"):
        cache.rewind(0, 7)  # past what is written
    write(cache, 0, 2)  # decoding goes on from 6 into the kept block
    cache.commit(0, [7, 8])
    assert cache.sequence_length(0) == 8
    cache.free(0)
    assert cache.allocator.num_used == 0


def test_blocks_for_drafts_are_only_unused_ones():
    """A guess takes no cached prefix and grows no pool: ``ensure(unused_only=True)``."""
    cache = pool(num_blocks=4, max_blocks=8)
    cache.add_sequence(0, [1, 2, 3, 4, 5])
    write(cache, 0, 5)  # blocks 0 and 1
    cache.commit(0, [1, 2, 3, 4, 5])  # block 0 full: registered in the prefix cache
    cache.add_sequence(1)
    write(cache, 1, 2)  # block 2
    cache.commit(1, [9, 9])
    cache.free(0)  # its full block stays cached, its second one is free
    assert cache.allocator.num_cached == 1 and cache.allocator.num_unused == 2
    assert not cache.ensure(1, 14, unused_only=True)  # 3 more blocks: would evict or grow
    assert cache.num_blocks == 4 and cache.allocator.num_cached == 1
    assert cache.ensure(1, 10, unused_only=True)  # 2 more blocks: the free ones
    assert cache.allocator.num_cached == 1 and len(cache.block_table(1)) == 3
    assert cache.allocator.num_unused == 0 and cache.num_blocks == 4
