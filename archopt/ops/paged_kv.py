"""A paged KV cache: one pool of fixed-size blocks per layer, a block table per sequence.

After vLLM's PagedAttention (Kwon et al., 2023, arXiv:2309.06180). A sequence holds the blocks
its tokens fill, so the memory it holds is its length rounded up to a block (under one block of
waste per sequence), and sequences come and go without moving anyone's keys. Block ``b`` holds
the tokens of slots ``b * block_size ... (b + 1) * block_size - 1`` of every layer's pool;
``slot_pos`` records each slot's token position (-1: empty), so the attention mask comes from
block tables and positions alone, as the other caches derive it from positions.

Prefix reuse by chained block hashes, as vLLM's automatic prefix caching does: a full block's
key is a digest of its tokens chained with its parent block's digest, so equal keys mean equal
whole prefixes, and a new prompt's cached prefix is found by walking its full blocks through one
dict. We chose this over SGLang's radix tree because the block is already the unit of sharing
and of memory: a dict from digest to block shares whole blocks with no tree to keep in step
with the allocator, eviction is per block (least recently used among unreferenced cached
blocks), and the only loss is a partial last block (under ``block_size`` tokens a request). The
digest is a 128-bit BLAKE2b, not Python's ``hash``, so a collision (wrong keys served to another
request) is not a practical concern. Shared blocks are reference counted; a write into a shared
(or registered) block first copies it (copy-on-write).

Attention (``attend``) follows one of three plans per step, chosen by ``attention``: ``"auto"``
(every row alone over its own blocks, so a request's sums do not depend on its batch),
``"span"`` (no copy, exact up to rounding) and ``"gather"`` (the reference); see
``archopt.ops.paged_attention``, whose docstring says why each exists.

The plans are in ``archopt.ops.paged_attention``, with the view a compiled one-token step reads
the pool through (``decode_inputs`` prepares its tensors; the serving engine decodes with it);
block bookkeeping (ids, reference counts, LRU, digests) is in ``archopt.ops.paged_blocks``.

Two ways in: the ``KVCache`` protocol (``make_cache("paged:16")``: one sequence per batch row,
as ``generate`` uses it), and the engine's calls (``add_sequence`` with prefix matching,
``ensure``, ``bind``, ``commit``, ``fork``, ``free``) that ``archopt.serve`` schedules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from archopt.ops.paged_attention import (
    ATTENTION_BACKENDS,
    attend_planned,
    gathered,
    grouped_plan,
    plan_attention,
    table_slots,
    visible,
)
from archopt.ops.paged_blocks import BlockAllocator, block_digest

__all__ = ["ATTENTION_BACKENDS", "PagedKVCache"]


@dataclass
class _Seq:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # tokens whose keys and values are in the cache
    tokens: list[int] = field(default_factory=list)  # their ids, when the caller commits them
    digests: list[bytes] = field(default_factory=list)  # of the leading full blocks


class PagedKVCache:
    """Keys and values in a pool of blocks; see the module docstring.

    ``num_blocks``: the pool's first size; it grows by doubling up to ``max_blocks`` when a
    sequence needs a block and none is free or cached (``None``: no limit but ``capacity``).
    ``batch``: sequences 0..batch-1 made up front, one per row, for the ``KVCache`` protocol.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_blocks: int | None = None,
        batch: int = 0,
        reserve: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        prefix_cache: bool = True,
        attention: str = "auto",
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1 token, got {block_size}")
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 token, got {capacity}")
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention!r}"
            )
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.block_size, self.capacity = block_size, capacity
        self.dtype, self.device = dtype, torch.device(device)
        self.prefix_cache, self.attention = prefix_cache, attention
        per_seq = -(-min(reserve or 256, capacity) // block_size)
        if num_blocks is None:
            num_blocks = max(batch, 1) * per_seq
        self.max_blocks = max_blocks
        if max_blocks is not None:
            num_blocks = min(num_blocks, max_blocks)
        self.allocator = BlockAllocator(num_blocks)
        self._alloc_pool(num_blocks)
        self.seqs: dict[int, _Seq] = {}
        for i in range(batch):
            self.add_sequence(i)
        self.rows: list[int] = list(range(batch))
        self.length = 0  # protocol: forward columns seen (generate's default positions)
        self.copies = 0  # copy-on-write block copies made
        self._step: tuple | None = None

    # -- storage ---------------------------------------------------------------------------
    def _alloc_pool(self, num_blocks: int) -> None:
        slots = num_blocks * self.block_size + 1  # the last slot takes padding's writes
        shape = (self.num_layers, self.kv_heads, slots, self.head_dim)
        old = getattr(self, "keys", None)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        slot_pos = torch.full((slots,), -1, dtype=torch.long, device=self.device)
        if old is not None:
            n = self.slot_pos.shape[0] - 1
            keys[:, :, :n], values[:, :, :n] = old[:, :, :n], self.values[:, :, :n]
            slot_pos[:n] = self.slot_pos[:n]
        self.keys, self.values, self.slot_pos = keys, values, slot_pos
        self._trash = slots - 1
        self._layer_pools: tuple[list, list] | None = None

    def layer_pools(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's keys and values pool (Hkv, slots, d), contiguous views made once per
        pool (a compiled step takes them as 2 * layers inputs at every step)."""
        if self._layer_pools is None:
            self._layer_pools = (list(self.keys.unbind(0)), list(self.values.unbind(0)))
        return self._layer_pools

    @property
    def trash_slot(self) -> int:
        """The pool's last slot: padding writes go there; it is never visible."""
        return self._trash

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block over all layers, keys and values."""
        per = self.num_layers * self.kv_heads * self.block_size * self.head_dim
        return 2 * per * self.keys.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds (allocated blocks, whether used, cached or free)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    @property
    def used_nbytes(self) -> int:
        """Bytes of the blocks some sequence references."""
        return self.allocator.num_used * self.block_nbytes

    def stats(self) -> dict[str, int]:
        a = self.allocator
        return {
            "blocks_in_pool": a.num_blocks,
            "blocks_used": a.num_blocks - a.num_free,
            "blocks_cached": a.num_cached,
            "blocks_free": a.num_free - a.num_cached,
            "block_size": self.block_size,
            "sequences": len(self.seqs),
            "evictions_total": a.evictions,
            "cow_copies_total": self.copies,
        }

    def _new_block(self) -> int | None:
        block = self.allocator.allocate()
        if block is None and (self.max_blocks is None or self.num_blocks < self.max_blocks):
            grown = 2 * self.num_blocks
            if self.max_blocks is not None:
                grown = min(grown, self.max_blocks)
            self._alloc_pool(grown)
            self.allocator.grow(grown)
            block = self.allocator.allocate()
        if block is not None:
            bs = self.block_size
            self.slot_pos[block * bs : (block + 1) * bs] = -1
        return block

    def _copy_block(self, src: int, dst: int, upto: int) -> None:
        bs = self.block_size
        s, d = slice(src * bs, src * bs + upto), slice(dst * bs, dst * bs + upto)
        self.keys[:, :, d] = self.keys[:, :, s]
        self.values[:, :, d] = self.values[:, :, s]
        self.slot_pos[d] = self.slot_pos[s]
        self.copies += 1

    # -- sequences (the engine's calls) ----------------------------------------------------
    def add_sequence(self, seq_id: int, prompt: Sequence[int] | None = None) -> int:
        """Start sequence ``seq_id``; with its ``prompt``, share the cached blocks of its
        longest cached prefix (whole blocks). Returns how many prompt tokens are cached (at
        most len(prompt) - 1: the last one always runs, for its logits)."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already exists in this cache")
        seq = self.seqs[seq_id] = _Seq()
        if not prompt or not self.prefix_cache:
            return 0
        bs, digest = self.block_size, b""
        for i in range(len(prompt) // bs):
            tokens = prompt[i * bs : (i + 1) * bs]
            digest = block_digest(digest, tokens)
            block = self.allocator.lookup(digest)
            if block is None:
                break
            self.allocator.ref(block)
            seq.blocks.append(block)
            seq.digests.append(digest)
            seq.tokens.extend(tokens)
        # The whole prompt cached: its last token runs again (for its logits), written into a
        # copy of the last block (copy-on-write, see ``ensure``).
        seq.length = min(len(seq.tokens), len(prompt) - 1)
        del seq.tokens[seq.length :]
        return seq.length

    def fork(self, src: int, dst: int) -> None:
        """``dst`` shares every block of ``src`` (the partial last one too: copy-on-write)."""
        if dst in self.seqs:
            raise ValueError(f"sequence {dst} already exists in this cache")
        s = self.seqs[src]
        for b in s.blocks:
            self.allocator.ref(b)
        self.seqs[dst] = _Seq(list(s.blocks), s.length, list(s.tokens), list(s.digests))

    def free(self, seq_id: int) -> None:
        """Release the sequence's blocks (last first, so leaves are evicted before roots)."""
        seq = self.seqs.pop(seq_id)
        for b in reversed(seq.blocks):
            self.allocator.release(b)

    def ensure(self, seq_id: int, n: int, *, unused_only: bool = False) -> bool:
        """Blocks for the next ``n`` tokens of ``seq_id``, the one they start in made private
        (copy-on-write). False, with nothing taken, when the pool cannot provide them; with
        ``unused_only``, also when that would evict a cached block or grow the pool."""
        seq, bs = self.seqs[seq_id], self.block_size
        if seq.length + n > self.capacity:
            raise ValueError(
                f"sequence {seq_id} would hold {seq.length + n} tokens, past the cache's "
                f"capacity of {self.capacity}"
            )
        first, last = seq.length // bs, (seq.length + n - 1) // bs
        needed = max(last + 1 - len(seq.blocks), 0)
        cow = n > 0 and first < len(seq.blocks) and self._shared(seq.blocks[first])
        if unused_only and needed + cow > self.allocator.num_unused:
            return False
        taken = []
        for _ in range(needed + cow):
            block = self._new_block()
            if block is None:
                for b in taken:
                    self.allocator.release(b)
                return False
            taken.append(block)
        if cow:
            old, new = seq.blocks[first], taken.pop()
            if self.allocator.refs[old] > 1:
                self._copy_block(old, new, seq.length - first * bs)
                seq.blocks[first] = new
                self.allocator.release(old)
            else:  # only ours, but registered: it is about to hold other tokens
                self.allocator.release(new)
                self.allocator.unregister(old)
            del seq.digests[first:]
        seq.blocks.extend(taken)
        return True

    def rewind(self, seq_id: int, length: int) -> None:
        """Forget the tokens of ``seq_id`` written past ``length`` and not committed (a
        speculative step's rejected drafts): their slots hold no position any more, and the
        blocks only they used go back to the free list."""
        seq, bs = self.seqs[seq_id], self.block_size
        if not len(seq.tokens) <= length <= seq.length:
            raise ValueError(
                f"sequence {seq_id} can rewind to {len(seq.tokens)}..{seq.length} tokens (its "
                f"uncommitted ones), got {length}"
            )
        gone = [seq.blocks[p // bs] * bs + p % bs for p in range(length, seq.length)]
        if gone:
            self.slot_pos[gone] = -1
        seq.length = length
        while len(seq.blocks) > -(-length // bs):
            self.allocator.release(seq.blocks.pop())

    def _shared(self, block: int) -> bool:
        return self.allocator.refs[block] > 1 or block in self.allocator.digest_of

    def commit(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Record the ids of the tokens just written for ``seq_id`` (in order) and register the
        blocks they fill for reuse by later prompts."""
        seq = self.seqs[seq_id]
        seq.tokens.extend(int(t) for t in tokens)
        if len(seq.tokens) != seq.length:
            raise ValueError(
                f"sequence {seq_id}: {len(seq.tokens)} token ids committed for "
                f"{seq.length} tokens in the cache"
            )
        if not self.prefix_cache:
            return
        bs = self.block_size
        while len(seq.digests) < seq.length // bs:
            i = len(seq.digests)
            parent = seq.digests[-1] if seq.digests else b""
            digest = block_digest(parent, seq.tokens[i * bs : (i + 1) * bs])
            seq.digests.append(digest)
            self.allocator.register(seq.blocks[i], digest)

    def bind(self, seq_ids: Sequence[int]) -> None:
        """The sequence of each batch row in the next forward."""
        for s in seq_ids:
            if s not in self.seqs:
                raise ValueError(f"bind: no sequence {s} in this cache")
        self.rows = list(seq_ids)

    def sequence_length(self, seq_id: int) -> int:
        return self.seqs[seq_id].length

    def block_table(self, seq_id: int) -> list[int]:
        return list(self.seqs[seq_id].blocks)

    # -- the KVCache protocol --------------------------------------------------------------
    def reset(self) -> None:
        for s in list(self.seqs):
            self.free(s)
        for s in self.rows:
            self.add_sequence(s)
        self.length = 0

    def crop(self, length: int) -> None:
        raise ValueError("a paged cache cannot crop: free the sequence and start it again")

    def _advance(self, positions: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
        """Take blocks for this forward's tokens (B, T positions, -1 = padding) and record
        their positions; the slot of each token (B*T,: padding's go to the trash slot) and
        the rows' block tables."""
        b, t = positions.shape
        if b != len(self.rows):
            raise ValueError(
                f"cache is bound to {len(self.rows)} sequences, got positions for {b} rows"
            )
        bs = self.block_size
        for sid, row in zip(self.rows, positions.tolist()):
            real = [p for p in row if p >= 0]
            if not real:
                continue
            seq = self.seqs[sid]
            if real[0] != seq.length or real != list(range(seq.length, seq.length + len(real))):
                raise ValueError(
                    f"sequence {sid} holds {seq.length} tokens: the next positions must "
                    f"continue from {seq.length}, got {real[0]}..{real[-1]}"
                )
            if self._needs_blocks(seq, len(real)) and not self.ensure(sid, len(real)):
                raise self._full()
            seq.length += len(real)
        tables = [self.seqs[s].blocks for s in self.rows]
        width = max(max((len(tb) for tb in tables), default=0), 1)
        trash_block = self._trash // bs  # = num_blocks: slot num_blocks * bs is the trash
        table = torch.tensor(
            [tb + [trash_block] * (width - len(tb)) for tb in tables], dtype=torch.long
        ).to(self.device)
        valid = positions >= 0
        p = positions.clamp(min=0)
        slots = table.gather(1, p // bs) * bs + p % bs
        slots = torch.where(valid, slots, self._trash).reshape(-1)
        self.slot_pos[slots] = positions.reshape(-1)
        self.slot_pos[self._trash] = -1
        self.length += t
        return slots, tables

    def _begin(self, positions: torch.Tensor) -> None:
        """Slots of this forward's tokens (written by every layer) and the attention plan."""
        slots, tables = self._advance(positions)
        args = (tables, positions, self.slot_pos, self.block_size, self._trash)
        self._step = (slots, plan_attention(self.attention, *args))

    def _needs_blocks(self, seq: _Seq, n: int) -> bool:
        """Whether ``n`` more tokens of ``seq`` need ``ensure``: a new block, or a private copy
        of the shared block they start in."""
        bs, held = self.block_size, len(seq.blocks)
        if (seq.length + n - 1) // bs >= held:
            return True
        return seq.length < held * bs and self._shared(seq.blocks[seq.length // bs])

    def _full(self) -> ValueError:
        return ValueError(
            f"the paged cache is full ({self.num_blocks} blocks of {self.block_size}): "
            "raise max_blocks, or free sequences"
        )

    def decode_inputs(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a compiled step (``archopt.ops.paged_attention.DecodeView``) over the bound
        rows at ``positions`` (B, 1), all real, one token a row; a sequence may be bound to
        several rows, at consecutive positions (a prompt chunk). Take their blocks and return
        the slot each token goes to (B,) and each row's slots to read (B, S), padded with the
        trash slot. The pools (``keys``/``values``, maybe grown now) are read after this call.

        ``_advance`` for one token a row, in Python ints: a decode step takes 4-6 ms, and the
        tensor ops of the general path took 0.1-0.2 ms of it."""
        b, t = positions.shape
        if t != 1 or b != len(self.rows):
            raise ValueError(
                f"a compiled step takes one real token per row, one row for each of the "
                f"{len(self.rows)} bound rows, got positions of shape {tuple(positions.shape)}"
            )
        bs, pos = self.block_size, positions.view(-1).tolist()
        after: dict[int, int] = {}  # every row checked before any is advanced
        for sid, p in zip(self.rows, pos):
            held = after.get(sid, self.seqs[sid].length)
            if p != held:
                raise ValueError(
                    f"a compiled step takes each sequence's tokens at its next positions: "
                    f"sequence {sid} holds {held} tokens, got position {p}"
                )
            after[sid] = p + 1
        write: list[int] = []
        for sid, p in zip(self.rows, pos):
            seq = self.seqs[sid]
            if self._needs_blocks(seq, 1) and not self.ensure(sid, 1):
                for done in self.rows[: len(write)]:  # as before the call (blocks taken stay)
                    self.seqs[done].length -= 1
                raise self._full()
            seq.length += 1
            write.append(seq.blocks[p // bs] * bs + p % bs)
        slots = torch.tensor(write, dtype=torch.long, device=self.device)
        self.slot_pos.index_put_((slots,), positions.view(-1).to(self.device))
        self.length += 1
        return slots, self._slots_of([self.seqs[s].blocks for s in self.rows])

    def _slots_of(self, tables: list[list[int]]) -> torch.Tensor:
        return table_slots(tables, self.block_size, self._trash, self.device)

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slots = self._step[0]
        h, d = self.kv_heads, self.head_dim
        # (B, Hkv, T, d) -> (Hkv, B*T, d): one row of each head per slot written.
        k, v = k.to(self.dtype), v.to(self.dtype)  # a half-precision cache rounds them here
        self.keys[layer].index_copy_(1, slots, k.transpose(0, 1).reshape(h, -1, d))
        self.values[layer].index_copy_(1, slots, v.transpose(0, 1).reshape(h, -1, d))

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The ``KVCache`` protocol: write, then return every row's keys and values gathered
        in table order (a copy: the reference; ``attend`` reads the pool in place)."""
        if layer == 0:
            self._begin(positions)
        self._write(layer, k, v)
        slots = self._slots_of([self.seqs[s].blocks for s in self.rows])
        keys, values = gathered(self.keys[layer], self.values[layer], slots)
        return keys.to(k.dtype), values.to(k.dtype), visible(positions, self.slot_pos[slots])

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """Write ``k``/``v`` (B, Hkv, T, d) and return attention (B, Hq, T, d) for ``q``
        (B, Hq, T, d), by the step's plan (``plan_attention``)."""
        if layer == 0:
            self._begin(positions)
            slots, plan = self._step
            self._step = (slots, grouped_plan(plan, q.shape[2], q.shape[1] // k.shape[1]))
        self._write(layer, k, v)
        return attend_planned(self._step[1], q, self.keys[layer], self.values[layer])
