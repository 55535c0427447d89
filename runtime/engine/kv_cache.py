"""The numpy engine's KV cache: a pre-allocated, paged pool of key/value vectors.

This module owns KV memory. The pool holds ``num_blocks`` blocks of ``block_size`` tokens for every
layer, allocated once, so memory is bounded by construction and reported by :meth:`KVCache.stats`.
Sequences reserve blocks as they grow (:meth:`reserve`, all-or-nothing: ``False`` is the scheduler's
signal to preempt) and return them with :meth:`release`. ``KVCache`` satisfies the scheduler's
:class:`runtime.scheduler.KVCapacity` protocol.

Physical layout (per layer)::

    keys   (num_kv_heads, num_tokens, head_dim)   # token-major, like values: writing a token
    values (num_kv_heads, num_tokens, head_dim)   # touches one contiguous row per head

Storage is float32 (exact) or int8 (``dtype=np.int8``: a quarter of the bytes, so four times the
tokens in the same memory, at a cost in accuracy). An int8 pool also holds one float32 scale per
(layer, head, token) for keys and for values (``key_scales``/``value_scales``): each head vector is
stored as ``round(x / s)`` with ``s = max|x| / 127``, and reads as ``int8 * s``. Write through
:meth:`KVCache.write` so the format is applied.

A sequence's blocks are not required to be adjacent, but attention reads one contiguous *run* of
blocks per matmul, so fewer runs means fewer numpy calls per layer. Placement therefore tries to
keep sequences contiguous: a sequence grows into the block right after its last one when free, and a
new run starts in the middle of the largest free gap, leaving room for both neighbours to grow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["KVCache", "KVStats", "kv_bytes_per_token"]


def kv_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: np.dtype | type = np.float32
) -> int:
    """Bytes one token takes in a pool of ``dtype`` (K and V, all layers; int8 adds its scales)."""
    dt = np.dtype(dtype)
    scale_bytes = 4 if dt == np.dtype(np.int8) else 0
    return 2 * num_layers * num_kv_heads * (head_dim * dt.itemsize + scale_bytes)


@dataclass(frozen=True)
class KVStats:
    """Occupancy of the pool; ``*_bytes`` count K and V over all layers."""

    block_size: int
    num_blocks: int
    used_blocks: int
    num_sequences: int
    bytes_per_token: int

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def used_tokens(self) -> int:
        return self.used_blocks * self.block_size

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_tokens * self.bytes_per_token

    @property
    def used_bytes(self) -> int:
        return self.used_tokens * self.bytes_per_token

    @property
    def usage(self) -> float:
        return self.used_blocks / self.num_blocks if self.num_blocks else 0.0


class _SeqBlocks:
    __slots__ = ("blocks", "runs", "table")

    def __init__(self) -> None:
        self.blocks: list[int] = []
        # Maximal runs of physically consecutive blocks, as [first_block, num_blocks] pairs.
        self.runs: list[list[int]] = []
        self.table: np.ndarray | None = None  # cached np.array(blocks)

    def append(self, block: int) -> None:
        self.blocks.append(block)
        self.table = None
        if self.runs and self.runs[-1][0] + self.runs[-1][1] == block:
            self.runs[-1][1] += 1
        else:
            self.runs.append([block, 1])


class KVCache:
    """Paged KV pool for ``num_layers`` layers; see the module docstring for the layout."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity_tokens: int,
        block_size: int = 16,
        dtype: np.dtype | type = np.float32,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if capacity_tokens < block_size:
            raise ValueError(
                f"capacity_tokens must be >= block_size ({block_size}), got {capacity_tokens}"
            )
        self._block_size = block_size
        self.num_blocks = capacity_tokens // block_size
        n_tok = self.num_blocks * block_size
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.int8)):
            raise ValueError(f"dtype must be float32 or int8, got {self.dtype}")
        self.quantized = self.dtype == np.dtype(np.int8)
        # np.zeros maps pages lazily; RSS grows with the tokens actually written, but never
        # beyond this fixed allocation.
        # K is token-major too: the scores GEMM reads it through a transposed view (BLAS takes the
        # transpose flag, no copy), while a head_dim-major K made every token write a scatter of
        # head_dim strided stores, which profiled at ~8% of a decode step.
        self.keys = np.zeros((num_layers, num_kv_heads, n_tok, head_dim), dtype=self.dtype)
        self.values = np.zeros((num_layers, num_kv_heads, n_tok, head_dim), dtype=self.dtype)
        scale_shape = (num_layers, num_kv_heads, n_tok) if self.quantized else (0, 0, 0)
        self.key_scales = np.zeros(scale_shape, dtype=np.float32)
        self.value_scales = np.zeros(scale_shape, dtype=np.float32)
        self.bytes_per_token = kv_bytes_per_token(num_layers, num_kv_heads, head_dim, self.dtype)
        self._free = np.ones(self.num_blocks, dtype=bool)
        self._num_free = self.num_blocks
        self._seqs: dict[str, _SeqBlocks] = {}

    # -- KVCapacity protocol --------------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self._block_size

    @property
    def free_tokens(self) -> int:
        return self._num_free * self._block_size

    def reserve(self, seq_id: str, num_tokens: int) -> bool:
        """Make ``seq_id`` able to hold ``num_tokens`` tokens in total.

        All-or-nothing: returns ``False`` (and changes nothing) when the pool lacks free blocks.
        Never shrinks a reservation.
        """
        seq = self._seqs.get(seq_id)
        have = len(seq.blocks) if seq is not None else 0
        need = -(-num_tokens // self._block_size) - have
        if need <= 0:
            return True
        if need > self._num_free:
            return False
        if seq is None:
            seq = self._seqs[seq_id] = _SeqBlocks()
        # Grow in place while the physically next block is free.
        while (
            need
            and seq.blocks
            and seq.blocks[-1] + 1 < self.num_blocks
            and self._free[seq.blocks[-1] + 1]
        ):
            self._take(seq, seq.blocks[-1] + 1)
            need -= 1
        while need:
            start, length = self._largest_gap()
            take = min(need, length)
            # Start mid-gap unless the gap opens the pool (nobody before it will grow into it).
            first = start if start == 0 else start + (length - take) // 2
            for block in range(first, first + take):
                self._take(seq, block)
            need -= take
        return True

    def release(self, seq_id: str) -> None:
        """Return all blocks of ``seq_id`` to the pool (no-op for unknown ids)."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        self._free[seq.blocks] = True
        self._num_free += len(seq.blocks)

    # -- engine-side access -------------------------------------------------------------------

    def write(self, layer: int, slots: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
        """Store ``keys``/``values`` (float32, ``(num_kv_heads, len(slots), head_dim)``) of
        ``layer`` at pool token indices ``slots``."""
        if not self.quantized:
            self.keys[layer][:, slots, :] = keys
            self.values[layer][:, slots, :] = values
            return
        for x, store, scales in (
            (keys, self.keys, self.key_scales),
            (values, self.values, self.value_scales),
        ):
            scale = np.max(np.abs(x), axis=2)
            scale *= np.float32(1 / 127)
            np.maximum(scale, np.finfo(np.float32).tiny, out=scale)
            q = np.rint(x / scale[..., None])
            np.clip(q, -127, 127, out=q)
            store[layer][:, slots, :] = q
            scales[layer][:, slots] = scale

    def dequantize(self, layer: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Float32 copies of keys and values of pool tokens ``start .. start+length-1``."""
        sl = slice(start, start + length)
        keys = self.keys[layer][:, sl].astype(np.float32)
        values = self.values[layer][:, sl].astype(np.float32)
        if self.quantized:
            keys *= self.key_scales[layer][:, sl, None]
            values *= self.value_scales[layer][:, sl, None]
        return keys, values

    def has(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def reserved_tokens(self, seq_id: str) -> int:
        seq = self._seqs.get(seq_id)
        return 0 if seq is None else len(seq.blocks) * self._block_size

    def slots(self, seq_id: str, start: int, count: int) -> np.ndarray:
        """Pool token indices of positions ``start .. start+count-1`` of ``seq_id``."""
        seq = self._seqs[seq_id]
        if (start + count) > len(seq.blocks) * self._block_size:
            raise IndexError(
                f"sequence {seq_id!r}: positions up to {start + count} exceed its reservation"
            )
        if seq.table is None:
            seq.table = np.asarray(seq.blocks, dtype=np.int64)
        pos = np.arange(start, start + count, dtype=np.int64)
        return seq.table[pos // self._block_size] * self._block_size + pos % self._block_size

    def runs(self, seq_id: str, length: int) -> list[tuple[int, int]]:
        """``(first_token_index, num_tokens)`` runs covering positions ``0 .. length-1`` in order."""
        out: list[tuple[int, int]] = []
        bs = self._block_size
        remaining = length
        for first_block, n_blocks in self._seqs[seq_id].runs:
            if remaining <= 0:
                break
            take = min(remaining, n_blocks * bs)
            out.append((first_block * bs, take))
            remaining -= take
        if remaining > 0:
            raise IndexError(f"sequence {seq_id!r}: length {length} exceeds its reservation")
        return out

    def stats(self) -> KVStats:
        return KVStats(
            block_size=self._block_size,
            num_blocks=self.num_blocks,
            used_blocks=self.num_blocks - self._num_free,
            num_sequences=len(self._seqs),
            bytes_per_token=self.bytes_per_token,
        )

    # -- internals ----------------------------------------------------------------------------

    def _take(self, seq: _SeqBlocks, block: int) -> None:
        self._free[block] = False
        self._num_free -= 1
        seq.append(block)

    def _largest_gap(self) -> tuple[int, int]:
        free = self._free.view(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], free, [0]))))
        starts, ends = edges[0::2], edges[1::2]
        i = int(np.argmax(ends - starts))
        return int(starts[i]), int(ends[i] - starts[i])
