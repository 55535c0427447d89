"""The paged KV pool: bounded, all-or-nothing reservations, consistent slot/run mapping."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.engine.kv_cache import KVCache, kv_bytes_per_token
from runtime.scheduler import KVCapacity


def _pool(blocks: int = 32, block_size: int = 4) -> KVCache:
    return KVCache(
        num_layers=2,
        num_kv_heads=2,
        head_dim=8,
        capacity_tokens=blocks * block_size,
        block_size=block_size,
    )


def test_is_a_kv_capacity_and_reports_bytes() -> None:
    kv = _pool()
    assert isinstance(kv, KVCapacity)
    stats = kv.stats()
    assert stats.capacity_tokens == 128
    assert stats.bytes_per_token == 2 * 2 * 2 * 8 * 4
    assert kv.keys.nbytes + kv.values.nbytes == stats.capacity_bytes
    assert kv.reserve("a", 10)
    assert kv.stats().used_tokens == 12 and kv.stats().used_bytes == 12 * stats.bytes_per_token


def test_reservation_is_all_or_nothing() -> None:
    kv = _pool(blocks=8)
    assert kv.reserve("a", 20)  # 5 blocks
    assert not kv.reserve("b", 13)  # needs 4, only 3 free
    assert not kv.has("b") and kv.free_tokens == 12
    assert not kv.reserve("a", 33)
    assert kv.reserved_tokens("a") == 20
    assert kv.reserve("b", 12)
    assert kv.free_tokens == 0
    kv.release("a")
    kv.release("a")
    assert kv.free_tokens == 20


def test_slots_and_runs_agree_and_never_overlap() -> None:
    rng = np.random.default_rng(0)
    kv = _pool(blocks=64)
    lengths: dict[str, int] = {}
    for _ in range(300):
        sid = f"s{rng.integers(0, 10)}"
        if rng.random() < 0.15:
            kv.release(sid)
            lengths.pop(sid, None)
            continue
        new = lengths.get(sid, 0) + int(rng.integers(1, 9))
        if kv.reserve(sid, new):
            lengths[sid] = new
    owner: dict[int, str] = {}
    for sid, n in lengths.items():
        slots = kv.slots(sid, 0, n)
        from_runs = np.concatenate([np.arange(a, a + m) for a, m in kv.runs(sid, n)])
        assert np.array_equal(slots, from_runs)
        for s in slots.tolist():
            assert s not in owner, "two sequences share a KV slot"
            owner[s] = sid


def test_growth_stays_contiguous_when_neighbours_leave_room() -> None:
    kv = _pool(blocks=64)
    for sid in ("a", "b", "c"):
        assert kv.reserve(sid, 8)
    for n in range(9, 60):
        for sid in ("a", "b", "c"):
            assert kv.reserve(sid, n)
    # Mid-gap placement leaves each sequence room to grow in place: few runs per sequence.
    assert all(len(kv.runs(sid, 59)) <= 2 for sid in ("a", "b", "c"))


def test_int8_pool_round_trips_within_half_a_step_and_reports_its_bytes() -> None:
    kv = KVCache(
        num_layers=2, num_kv_heads=2, head_dim=8, capacity_tokens=64, block_size=4, dtype=np.int8
    )
    # K and V int8 plus one float32 scale per (layer, head, token) for each.
    assert kv.stats().bytes_per_token == kv_bytes_per_token(2, 2, 8, np.int8) == 2 * 2 * 2 * (8 + 4)
    assert kv.reserve("a", 10)
    rng = np.random.default_rng(0)
    keys = rng.normal(0, 3, (2, 10, 8)).astype(np.float32)
    values = rng.normal(0, 0.01, (2, 10, 8)).astype(np.float32)  # tiny values keep precision
    slots = kv.slots("a", 0, 10)
    kv.write(1, slots, keys, values)
    [(start, length)] = kv.runs("a", 10)
    got_k, got_v = kv.dequantize(1, start, length)
    for want, got in ((keys, got_k), (values, got_v)):
        step = np.abs(want).max(axis=2, keepdims=True) / 127  # one scale per head vector
        assert np.all(np.abs(got - want) <= step / 2 + 1e-7)
        assert not np.array_equal(got, want)  # it is quantised, not stored exactly
    # Layer 0 was not written: its slots still read as zeros.
    assert not kv.dequantize(0, start, length)[0].any()


def test_pool_refuses_other_storage_types() -> None:
    with pytest.raises(ValueError, match="float32 or int8"):
        KVCache(2, 2, 8, 64, 4, dtype=np.float16)
