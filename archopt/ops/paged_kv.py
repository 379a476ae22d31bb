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

Attention (``attend``) has three plans, chosen per step by ``attention``:

- ``"auto"`` (the default): every row alone, as if it were the only sequence. A row whose
  blocks are consecutive (the usual case: the allocator hands out the lowest free ids) reads
  them in place, a strided view of each layer's pool; other rows copy their own blocks out.
  One SDPA call per row, over that row's whole blocks only: its sums are then the same numbers
  in the same order whether it runs alone or batched, which is what keeps greedy decoding
  identical alone and batched even with bf16 activations (as the GGUF kernels use), where any
  other order of summation flips near ties. Padding rows to a common width does not: SDPA
  tiles keys by their padded length (benchmarks/RESULTS.md, issue 18);
- ``"span"``: no copy at any batch size. The batch's blocks lie within one span of block ids, a
  strided view of the pool; all rows are scored against the span at once under a mask from the
  block tables (llama.cpp's unified KV cache does the same). It reads every slot once but
  multiplies rows by slots, and its sums depend on where the other rows' blocks lie, so it is
  exact only up to rounding.
- ``"gather"``: the reference, every step copied out (what ``update`` returns too).

Two ways in: the ``KVCache`` protocol (``make_cache("paged:16")``: one sequence per batch row,
as ``generate`` uses it), and the engine's calls (``add_sequence`` with prefix matching,
``ensure``, ``bind``, ``commit``, ``fork``, ``free``) that ``archopt.serve`` schedules.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "span", "gather")


def block_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block: its tokens chained with its parent's key (b"" for the first)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockAllocator:
    """Block ids, reference counts, a free list and the prefix cache (digest -> block).

    Bookkeeping only, no tensors. A block is in exactly one state: referenced (``refs > 0``),
    cached (unreferenced but registered under a digest, evictable, least recently used first)
    or free. ``allocate`` takes the lowest free id, so live blocks stay packed at low ids.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks))  # a heap
        self._cached: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self.digest_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}
        self.evictions = 0

    def grow(self, num_blocks: int) -> None:
        for b in range(self.num_blocks, num_blocks):
            self.refs.append(0)
            heapq.heappush(self._free, b)
        self.num_blocks = max(self.num_blocks, num_blocks)

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out (free ones, then cached ones by eviction)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int | None:
        """A block with one reference, or None when every block is referenced."""
        if self._free:
            block = heapq.heappop(self._free)
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            self.unregister(block)
            self.evictions += 1
        else:
            return None
        self.refs[block] = 1
        return block

    def ref(self, block: int) -> None:
        if self.refs[block] == 0:
            self._cached.pop(block)  # only cached blocks are found unreferenced
        self.refs[block] += 1

    def release(self, block: int) -> None:
        if self.refs[block] < 1:
            raise ValueError(f"block {block} released more often than referenced")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.digest_of:
                self._cached[block] = None  # most recently used last
            else:
                heapq.heappush(self._free, block)

    def lookup(self, digest: bytes) -> int | None:
        return self.block_of.get(digest)

    def register(self, block: int, digest: bytes) -> None:
        """Make ``block`` findable by ``digest`` (a block already there keeps the digest)."""
        if digest not in self.block_of and block not in self.digest_of:
            self.block_of[digest] = block
            self.digest_of[block] = digest

    def unregister(self, block: int) -> None:
        digest = self.digest_of.pop(block, None)
        if digest is not None:
            del self.block_of[digest]


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

    def ensure(self, seq_id: int, n: int) -> bool:
        """Blocks for the next ``n`` tokens of ``seq_id``, the one they start in made private
        (copy-on-write). False, with nothing taken, when the pool cannot provide them."""
        seq, bs = self.seqs[seq_id], self.block_size
        if seq.length + n > self.capacity:
            raise ValueError(
                f"sequence {seq_id} would hold {seq.length + n} tokens, past the cache's "
                f"capacity of {self.capacity}"
            )
        first, last = seq.length // bs, (seq.length + n - 1) // bs
        needed = max(last + 1 - len(seq.blocks), 0)
        cow = n > 0 and first < len(seq.blocks) and self._shared(seq.blocks[first])
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

    def _begin(self, positions: torch.Tensor) -> None:
        """Slots of this forward's tokens (written by every layer) and the attention plan."""
        b, t = positions.shape
        if b != len(self.rows):
            raise ValueError(
                f"cache is bound to {len(self.rows)} sequences, got positions for {b} rows"
            )
        bs = self.block_size
        pos_rows = positions.tolist()
        for sid, row in zip(self.rows, pos_rows):
            real = [p for p in row if p >= 0]
            if not real:
                continue
            seq = self.seqs[sid]
            if real[0] != seq.length or real != list(range(seq.length, seq.length + len(real))):
                raise ValueError(
                    f"sequence {sid} holds {seq.length} tokens: the next positions must "
                    f"continue from {seq.length}, got {real[0]}..{real[-1]}"
                )
            needs_blocks = (seq.length + len(real) - 1) // bs >= len(seq.blocks) or (
                seq.length < len(seq.blocks) * bs and self._shared(seq.blocks[seq.length // bs])
            )
            if needs_blocks and not self.ensure(sid, len(real)):
                raise ValueError(
                    f"the paged cache is full ({self.num_blocks} blocks of {bs}): "
                    "raise max_blocks, or free sequences"
                )
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
        self._step = (slots, self._plan(tables, positions))

    def _plan(self, tables: list[list[int]], positions: torch.Tensor) -> tuple:
        """How this step's attention reads the pool: ``("rows", [row plan, ...])``, every row
        alone (``_row_plan``); ``("span", lo, hi, mask)``, every row against the span of the
        batch's blocks; ``("gather", slots, mask)``, each row's blocks copied out in table
        order, padded to the widest. Masks are bool (B, 1, T, S), True = attend."""
        bs = self.block_size
        b = positions.shape[0]
        if self.attention == "auto":
            return (
                "rows",
                [self._row_plan(tb, positions[r : r + 1]) for r, tb in enumerate(tables)],
            )
        if self.attention == "span":
            used = [x for tb in tables for x in tb]
            lo_b, hi_b = min(used), max(used) + 1
            member = torch.zeros(b, hi_b - lo_b, dtype=torch.bool)
            for r, tb in enumerate(tables):
                if tb:
                    member[r, torch.tensor(tb) - lo_b] = True
            member = member.to(self.device).repeat_interleave(bs, dim=1)  # (B, S)
            k_pos = torch.where(member, self.slot_pos[lo_b * bs : hi_b * bs], -1)
            return ("span", lo_b * bs, hi_b * bs, self._visible(positions, k_pos))
        slots = self._table_slots(tables)  # (B, S)
        return ("gather", slots, self._visible(positions, self.slot_pos[slots]))

    def _row_plan(self, table: list[int], positions: torch.Tensor) -> tuple:
        """One row alone: ``(lo, hi, mask)`` for consecutive blocks read in place, or
        ``(slots, None, mask)`` for its own blocks copied out; whole blocks either way."""
        bs = self.block_size
        if table and table == list(range(table[0], table[0] + len(table))):
            lo, hi = table[0] * bs, (table[0] + len(table)) * bs
            return (lo, hi, self._visible(positions, self.slot_pos[lo:hi][None]))
        slots = self._table_slots([table])
        return (slots.reshape(-1), None, self._visible(positions, self.slot_pos[slots]))

    def _table_slots(self, tables: list[list[int]]) -> torch.Tensor:
        """(B, S): each row's slots in table order, padded with the trash slot (never visible)
        to the widest row, S a multiple of the block size."""
        bs = self.block_size
        width = max(max((len(tb) for tb in tables), default=0), 1)
        table = torch.tensor([tb + [-1] * (width - len(tb)) for tb in tables], dtype=torch.long)
        slots = (table[:, :, None] * bs + torch.arange(bs)).reshape(len(tables), -1)
        slots = torch.where(table.repeat_interleave(bs, dim=1) >= 0, slots, self._trash)
        return slots.to(self.device)

    @staticmethod
    def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, T, S) bool: a query at p sees slots holding positions 0..p (rows that see
        nothing, padding queries, fully open); None when every slot is visible."""
        q, k = q_pos[:, :, None], k_pos[:, None, :]
        visible = (k >= 0) & (k <= q)  # (B, T, S)
        if q_pos.shape[1] == 1 and bool(visible.all()):
            return None
        visible |= ~visible.any(dim=-1, keepdim=True)
        return visible[:, None]

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slots = self._step[0]
        h, d = self.kv_heads, self.head_dim
        # (B, Hkv, T, d) -> (Hkv, B*T, d): one row of each head per slot written.
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
        return self._gathered(layer, positions)

    def _gathered(self, layer: int, positions: torch.Tensor):
        slots = self._table_slots([self.seqs[s].blocks for s in self.rows])
        b, h, d = slots.shape[0], self.kv_heads, self.head_dim
        # (Hkv, B*S, d) -> (B, Hkv, S, d): every row's slots, copied out in table order
        keys = self.keys[layer].index_select(1, slots.reshape(-1)).view(h, b, -1, d)
        values = self.values[layer].index_select(1, slots.reshape(-1)).view(h, b, -1, d)
        mask = self._visible(positions, self.slot_pos[slots])
        return keys.transpose(0, 1), values.transpose(0, 1), mask

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """Write ``k``/``v`` (B, Hkv, T, d) and return attention (B, Hq, T, d) for ``q``
        (B, Hq, T, d), by the step's plan (see ``_plan``)."""
        b, hq, t, d = q.shape
        h = self.kv_heads
        g = hq // h
        if layer == 0:
            self._begin(positions)
            kind, *rest = self._step[1]
            if kind == "rows":
                rows = [(a, z, _grouped(m, t, g)) for a, z, m in rest[0]]
                self._step = (self._step[0], (kind, rows))
            else:
                self._step = (self._step[0], (kind, *rest[:-1], _grouped(rest[-1], t, g)))
        self._write(layer, k, v)
        kind, *where = self._step[1]
        qg = q.reshape(b, h, g * t, d)  # grouped-query heads as extra query rows
        if kind == "rows":
            out = [self._attend_row(qg[r : r + 1], layer, *plan) for r, plan in enumerate(where[0])]
            return torch.cat(out).view(b, hq, t, d)
        *where, mask = where
        if kind == "span":
            return self._attend_span(q, layer, *where, mask)
        slots = where[0].reshape(-1)
        keys = self.keys[layer].index_select(1, slots).view(h, b, -1, d).transpose(0, 1)
        values = self.values[layer].index_select(1, slots).view(h, b, -1, d).transpose(0, 1)
        y = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
        return y.view(b, hq, t, d)

    def _attend_row(self, q, layer, lo, hi, mask):
        """One row's attention over its own blocks: in place (``lo:hi``) or copied (slots)."""
        if hi is not None:
            keys = self.keys[layer][None, :, lo:hi]  # (1, Hkv, S, d), in place
            values = self.values[layer][None, :, lo:hi]
        else:
            keys = self.keys[layer].index_select(1, lo)[None]
            values = self.values[layer].index_select(1, lo)[None]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def _attend_span(self, q, layer, lo, hi, mask):
        """Every row against the span of pool slots holding the batch's blocks, masked."""
        b, hq, t, d = q.shape
        h = self.kv_heads
        g = hq // h
        keys, values = self.keys[layer][:, lo:hi], self.values[layer][:, lo:hi]  # (Hkv, S, d)
        # (B, Hkv, g*T, d) -> (Hkv, B*g*T, d): all rows of a kv head against its span at once
        qs = q.reshape(b, h, g * t, d).transpose(0, 1).reshape(h, b * g * t, d)
        if mask is not None:  # (B, 1, g*T, S) -> (B*g*T, S), rows as qs's
            mask = mask.expand(b, 1, g * t, hi - lo).reshape(b * g * t, hi - lo)
        if t == 1:
            scores = torch.matmul(qs, keys.transpose(-1, -2)) * d**-0.5  # (Hkv, rows, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            y = torch.matmul(scores.softmax(dim=-1), values)
        else:
            y = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask)
        # (Hkv, B*g*T, d) -> (B, Hq, T, d)
        return y.view(h, b, g * t, d).transpose(0, 1).reshape(b, hq, t, d)


def _grouped(mask: torch.Tensor | None, t: int, g: int) -> torch.Tensor | None:
    """A (B, 1, T, S) mask for queries laid out as (g, T) rows per kv head."""
    if mask is not None and t > 1 and g > 1:
        return mask.repeat(1, 1, g, 1)
    return mask
