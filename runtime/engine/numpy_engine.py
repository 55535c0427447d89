"""The embedded engine: a Llama forward pass in numpy float32 with a paged KV cache.

This module owns the model math. One :meth:`NumpyEngine.step` runs every scheduled sequence
together: the token rows of all sequences (prefill chunks and decode tokens alike) go through the
QKV projection, output projection and SwiGLU MLP as single matrix multiplies; only attention is per
sequence, against that sequence's own KV cache. Decode attention is arranged to keep Python work
per sequence to two GEMM calls per layer: scores of all decode sequences go into one flat buffer and
the softmax runs once over it with segmented reductions. The vocabulary projection runs only for
rows that need a sampled token.

Layout choices (see :mod:`runtime.engine.gguf_model` for the weight side): Q/K rows are un-permuted
at load, so rotary embeddings use the rotate-half form on contiguous half-heads; the attention scale
``1/sqrt(head_dim)`` is folded into the Q projection; RMSNorm gains are folded into the following
projection (the final norm gain is applied to the few sampled rows).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.engine.base import (
    Engine,
    EngineCapacity,
    SamplingParams,
    SeqInput,
    StepInput,
    StepOutput,
)
from runtime.engine.gguf_model import GGUFModel, LlamaConfig, load_gguf
from runtime.engine.kv_cache import KVCache
from runtime.engine.memory import release_memory
from runtime.engine.model_files import resolve_model_path
from runtime.engine.sampling import sample_rows
from runtime.engine.tokenizer import GGUFTokenizer

__all__ = ["KV_DTYPES", "NumpyEngine"]

DEFAULT_KV_CACHE_TOKENS = 16384
# Storage formats of the KV pool: name -> numpy dtype (see runtime.engine.kv_cache).
KV_DTYPES: dict[str, type] = {"float32": np.float32, "int8": np.int8}


def _row_sq_norms(x: np.ndarray) -> np.ndarray:
    # np.vecdot (numpy >= 2.0) is ~2x faster than einsum for this; keep working on numpy 1.26.
    if _VECDOT is not None:
        return _VECDOT(x, x)
    return np.einsum("ij,ij->i", x, x)


_VECDOT = getattr(np, "vecdot", None)
DEFAULT_MAX_MODEL_LEN = 4096
# Query tokens per block of prefill attention (see NumpyEngine._prefill_attention).
_PREFILL_BLOCK = 64


@dataclass
class _DecodePlan:
    """Decode sequences of one step, their scores' place in a flat buffer, and per-run views."""

    rows: np.ndarray  # row index in the step's token matrix, per decode sequence
    all_rows: bool  # the step is decode only: rows are 0..n-1 and need no gather/scatter
    offsets: np.ndarray  # start of each sequence's segment in the score buffer
    segment: np.ndarray  # sequence index of every score column
    scores: np.ndarray  # (kv_heads, group, sum of context lengths)
    peak: np.ndarray  # like scores: each column's segment maximum
    out: np.ndarray | None  # (sequences, kv_heads, group, head_dim) unless all_rows
    # (b, keys^T of one run over all layers, its score segment) for every run
    score_ops: list[tuple[int, Any, np.ndarray]]
    # (b, score segment, values of the run over all layers) for one-run sequences
    value_ops: list[tuple[int, np.ndarray, Any]]
    multi: list[tuple[int, list[tuple[np.ndarray, Any]]]]  # sequences stored in several runs
    int8: _Int8Scratch | None = None  # int8 pools only


@dataclass
class _Int8Scratch:
    """What decode attention over an int8 KV pool needs besides the float32 plan."""

    tokens: np.ndarray  # pool token index of every score column
    scale: np.ndarray  # (kv_heads, sum of lengths): gathered key or value scales
    keys: np.ndarray  # (kv_heads, longest run, head_dim) float32 scratch for one run
    values: np.ndarray  # same, for values


@dataclass
class _PrefillPlan:
    row0: int
    n: int
    ctx: int
    runs: list[tuple[int, int]]


@dataclass
class _StepPlan:
    total: int
    ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    decode: _DecodePlan | None
    prefills: list[_PrefillPlan]
    out_rows: list[int]


class NumpyEngine(Engine):
    """Llama-architecture GGUF runner on CPU with numpy.

    ``kv_cache_tokens`` sizes the KV pool (float32: ``2 * layers * kv_heads * head_dim * 4`` bytes
    per token, 45 KiB for SmolLM2-135M). ``kv_dtype="int8"`` stores K/V as int8 with a float32
    scale per head vector (``2 * layers * kv_heads * (head_dim + 4)`` bytes, 11.9 KiB per token):
    3.8x the tokens in the same memory, at a cost in accuracy (SmolLM2 over 320 positions: mean
    |logit diff| 0.13, top-1 agreement 98.7%; see tests/engine/test_int8_kv.py).
    ``max_model_len`` defaults to ``min(context_length, 4096, kv_cache_tokens)``.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 256,
        block_size: int = 16,
        seed: int | None = None,
        kv_dtype: str = "float32",
    ) -> None:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype: must be one of {', '.join(KV_DTYPES)} (got {kv_dtype!r})")
        for name, value in (
            ("kv_cache_tokens", kv_cache_tokens),
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("block_size", block_size),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1 (got {value!r})")
        if max_model_len is not None and (not isinstance(max_model_len, int) or max_model_len < 2):
            raise ValueError(f"max_model_len: must be an integer >= 2 (got {max_model_len!r})")
        self._model_path = model_path
        self._kv_tokens = kv_cache_tokens
        self._max_model_len_arg = max_model_len
        self._max_num_seqs = max_num_seqs
        self._max_batched = max_num_batched_tokens
        self._block_size = block_size
        self._kv_dtype = kv_dtype
        self._rng = np.random.default_rng(seed)
        self._loaded = False
        self._num_cached: dict[str, int] = {}
        self.model: GGUFModel | None = None
        self.tokenizer: GGUFTokenizer | None = None
        self.load_seconds = 0.0
        self._ws: _Workspace | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def load(self) -> None:
        if self._loaded:
            return
        start = time.perf_counter()
        path = resolve_model_path(self._model_path)
        model = load_gguf(path)
        cfg = model.config
        tokenizer = GGUFTokenizer(model.metadata)
        # The pool holds whole blocks, so its usable size may round down below kv_cache_tokens.
        pool_tokens = (self._kv_tokens // self._block_size) * self._block_size
        if pool_tokens < 2:
            raise ValueError(f"kv_cache_tokens: {self._kv_tokens} holds no complete block")
        max_len = self._max_model_len_arg or min(
            cfg.context_length, DEFAULT_MAX_MODEL_LEN, pool_tokens
        )
        if max_len > pool_tokens:
            raise ValueError(
                f"max_model_len: {max_len} exceeds the KV pool ({pool_tokens} tokens of kv_cache_tokens)"
            )
        # Fold the attention scale into the Q projection (rotary embedding is linear, so it commutes).
        scale = np.float32(1.0 / np.sqrt(cfg.head_dim))
        for layer in model.weights.layers:
            layer.wqkv[:, : cfg.q_dim] *= scale
            if layer.bqkv is not None:
                layer.bqkv[: cfg.q_dim] *= scale
            # Negate gate and up (exact): the SwiGLU then needs no separate negation pass.
            np.negative(layer.wgu, out=layer.wgu)
        positions = np.arange(max_len, dtype=np.float64) / cfg.rope_scaling_factor
        angles = np.outer(positions, model.weights.inv_freq)
        cos, sin = np.cos(angles), np.sin(angles)
        # RoPE tables for the rotate-half form on whole heads: x * [cos, cos] + swap(x) * [-sin, sin]
        self._rope_cos = np.concatenate([cos, cos], axis=1).astype(np.float32)
        self._rope_sin = np.stack([-sin, sin], axis=1).astype(np.float32)
        # Additive causal mask of a diagonal block of queries (rows: token * group + member).
        key_pos = np.arange(_PREFILL_BLOCK)
        query_pos = np.repeat(key_pos, cfg.group_size)
        self._causal_mask = np.where(key_pos[None, :] > query_pos[:, None], -np.inf, 0.0).astype(
            np.float32
        )
        self._kv = KVCache(
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            self._kv_tokens,
            self._block_size,
            dtype=KV_DTYPES[self._kv_dtype],
        )
        self.model = model
        self.tokenizer = tokenizer
        self.config: LlamaConfig = cfg
        self._max_model_len = max_len
        self._loaded = True
        # De-quantising leaves ~50 MB of freed temporaries in glibc's arenas; give them back.
        release_memory()
        self.load_seconds = time.perf_counter() - start

    def _require(self) -> None:
        if not self._loaded:
            raise RuntimeError("engine not loaded: call load() first")

    @property
    def capacity(self) -> EngineCapacity:
        self._require()
        return EngineCapacity(
            max_num_batched_tokens=self._max_batched,
            max_num_seqs=self._max_num_seqs,
            kv_capacity_tokens=self._kv.capacity_tokens,
            max_model_len=self._max_model_len,
            kv_block_size=self._block_size,
        )

    @property
    def kv(self) -> KVCache:
        self._require()
        return self._kv

    @property
    def vocab_size(self) -> int | None:
        return self.config.vocab_size if self._loaded else None

    def free(self, seq_id: str) -> None:
        self._num_cached.pop(seq_id, None)
        if self._loaded:
            self._kv.release(seq_id)

    def close(self) -> None:
        self._num_cached.clear()

    # -- tokenizer ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self._require()
        assert self.tokenizer is not None
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self._require()
        assert self.tokenizer is not None
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        self._require()
        assert self.tokenizer is not None
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt
        )

    @property
    def eos_token_ids(self) -> frozenset[int]:
        self._require()
        assert self.tokenizer is not None
        return self.tokenizer.eos_token_ids

    # -- stepping -------------------------------------------------------------------------------

    def held_tokens(self, seq_id: str) -> int:
        """Tokens of ``seq_id`` currently in the KV cache (0 after a release/preemption)."""
        return self._num_cached.get(seq_id, 0) if self._kv.has(seq_id) else 0

    def step(self, batch: StepInput) -> StepOutput:
        self._require()
        start = time.perf_counter()
        seqs = list(batch.seqs)
        if not seqs:
            return StepOutput(sampled={}, num_tokens=0, seconds=0.0)
        sample_seqs = [i for i, s in enumerate(seqs) if s.sample]
        hidden = self._forward(seqs, want="last")
        sampled: dict[str, int] = {}
        if sample_seqs:
            logits = self._logits(hidden)
            params = [seqs[i].params for i in sample_seqs]
            tokens = sample_rows(
                logits, params, [seqs[i].num_generated for i in sample_seqs], self._rng
            )
            for i, tok in zip(sample_seqs, tokens, strict=True):
                sampled[seqs[i].seq_id] = tok
        n_tokens = sum(len(s.token_ids) for s in seqs)
        return StepOutput(sampled=sampled, num_tokens=n_tokens, seconds=time.perf_counter() - start)

    def prompt_logits(
        self, token_ids: Sequence[int], seq_id: str = "__prompt_logits__"
    ) -> np.ndarray:
        """Logits (float32, ``(len(token_ids), vocab)``) at every position of a fresh sequence.

        For tests and scoring; uses and then frees KV space under ``seq_id``.
        """
        self._require()
        n = len(token_ids)
        if not self._kv.reserve(seq_id, n):
            raise RuntimeError("KV cache too small for prompt_logits")
        try:
            params = SamplingParams(temperature=0.0, max_tokens=1)
            out = []
            done = 0
            while done < n:  # respect the engine's per-step token budget
                chunk = list(token_ids[done : done + self._max_batched])
                hidden = self._forward([SeqInput(seq_id, chunk, done, False, params)], want="all")
                out.append(self._logits(hidden))
                done += len(chunk)
            return np.concatenate(out, axis=0)
        finally:
            self.free(seq_id)

    # -- the forward pass -------------------------------------------------------------------------

    def _logits(self, hidden: np.ndarray) -> np.ndarray:
        w = self.model.weights  # type: ignore[union-attr]
        h = np.empty_like(hidden)
        self._rms_into(hidden, h)
        h *= w.final_norm
        return h @ w.head_t

    def _validate(self, s: SeqInput) -> None:
        n = len(s.token_ids)
        if n == 0:
            raise ValueError(f"token_ids: sequence {s.seq_id!r} has no tokens to process")
        held = self.held_tokens(s.seq_id)
        if s.num_computed_tokens != held:
            raise ValueError(
                f"num_computed_tokens: sequence {s.seq_id!r} says {s.num_computed_tokens}, engine holds {held}"
            )
        end = s.num_computed_tokens + n
        if end > self._max_model_len:
            raise ValueError(f"token_ids: sequence {s.seq_id!r} would reach {end} > max_model_len")
        if self._kv.reserved_tokens(s.seq_id) < end:
            raise ValueError(f"kv: sequence {s.seq_id!r} has no KV reservation for {end} tokens")

    def _workspace(self, rows: int) -> _Workspace:
        ws = self._ws
        if ws is None or ws.rows < rows:
            ws = self._ws = _Workspace(max(rows, self._max_batched), self.config)
        return ws

    def _plan(self, seqs: list[SeqInput], want: str) -> _StepPlan:
        """Token rows, positions, KV slots and the attention layout of one step."""
        kv = self._kv
        ids: list[int] = []
        positions: list[int] = []
        slot_parts: list[np.ndarray] = []
        dec_rows: list[int] = []
        dec_runs: list[list[tuple[int, int]]] = []
        dec_lens: list[int] = []
        prefills: list[_PrefillPlan] = []
        out_rows: list[int] = []
        row = 0
        for s in seqs:
            n = len(s.token_ids)
            c = s.num_computed_tokens
            ctx = c + n
            ids.extend(s.token_ids)
            runs = kv.runs(s.seq_id, ctx)
            if n == 1:
                positions.append(c)
                slot_parts.append(kv.slots(s.seq_id, c, 1))
                dec_rows.append(row)
                dec_runs.append(runs)
                dec_lens.append(ctx)
            else:
                positions.extend(range(c, ctx))
                slot_parts.append(kv.slots(s.seq_id, c, n))
                prefills.append(_PrefillPlan(row0=row, n=n, ctx=ctx, runs=runs))
            if want == "all":
                out_rows.extend(range(row, row + n))
            elif s.sample:
                out_rows.append(row + n - 1)
            row += n
        dec = None
        if dec_rows:
            dec = self._decode_plan(dec_rows, dec_runs, dec_lens, all_rows=len(dec_rows) == row)
        return _StepPlan(
            total=row,
            ids=np.asarray(ids, dtype=np.int64),
            positions=np.asarray(positions, dtype=np.int64),
            slots=np.concatenate(slot_parts),
            decode=dec,
            prefills=prefills,
            out_rows=out_rows,
        )

    def _decode_plan(
        self,
        rows: list[int],
        runs: list[list[tuple[int, int]]],
        lengths: list[int],
        all_rows: bool,
    ) -> _DecodePlan:
        """Precompute, once per step, every view the per-layer decode attention needs.

        The views span all layers (``keys[:, :, run]``), so a layer only indexes them with ``[li]``.
        """
        cfg = self.config
        nkv, group, hd = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
        kv = self._kv
        lens = np.asarray(lengths, dtype=np.int64)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lens[:-1], out=offsets[1:])
        total = int(lens.sum())
        scores = np.empty((nkv, group, total), dtype=np.float32)
        out = None if all_rows else np.empty((len(rows), nkv, group, hd), dtype=np.float32)
        # float32: scores read keys through a transposed view (a BLAS flag, no copy); int8: the
        # run is converted into a float32 scratch first, so the plan keeps the plain view.
        keys = kv.keys if kv.quantized else kv.keys.transpose(0, 1, 3, 2)
        score_ops: list[tuple[int, Any, np.ndarray]] = []
        value_ops: list[tuple[int, np.ndarray, Any]] = []
        multi: list[tuple[int, list[tuple[np.ndarray, Any]]]] = []
        tokens: list[np.ndarray] = []
        for b, seq_runs in enumerate(runs):
            off = int(offsets[b])
            parts = []
            for start, length in seq_runs:
                seg = scores[:, :, off : off + length]
                run = slice(start, start + length)
                score_ops.append((b, keys[:, :, run] if kv.quantized else keys[..., run], seg))
                parts.append((seg, kv.values[:, :, run]))
                if kv.quantized:
                    tokens.append(np.arange(start, start + length))
                off += length
            if len(parts) == 1:
                value_ops.append((b, parts[0][0], parts[0][1]))
            else:
                multi.append((b, parts))
        scales = None
        if kv.quantized:
            longest = max(length for seq_runs in runs for _, length in seq_runs)
            scales = _Int8Scratch(
                tokens=np.concatenate(tokens),
                scale=np.empty((nkv, total), dtype=np.float32),
                keys=np.empty((nkv, longest, hd), dtype=np.float32),
                values=np.empty((nkv, longest, hd), dtype=np.float32),
            )
        return _DecodePlan(
            rows=np.asarray(rows, dtype=np.int64),
            all_rows=all_rows,
            offsets=offsets,
            segment=np.repeat(np.arange(len(rows)), lens),
            scores=scores,
            peak=np.empty((nkv, group, total), dtype=np.float32),
            out=out,
            score_ops=score_ops,
            value_ops=value_ops,
            multi=multi,
            int8=scales,
        )

    def _forward(self, seqs: list[SeqInput], want: str) -> np.ndarray:
        """Run all layers over the step's tokens; return final hidden rows.

        ``want="last"``: the last row of every sequence with ``sample=True``;
        ``want="all"``: every row (single-sequence scoring).
        """
        cfg = self.config
        w = self.model.weights  # type: ignore[union-attr]
        kv = self._kv
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        half = hd // 2
        qd, kd = cfg.q_dim, cfg.kv_dim
        inter = cfg.intermediate_size

        for s in seqs:
            self._validate(s)
        if len(seqs) > self._max_num_seqs:
            raise ValueError(
                f"seqs: {len(seqs)} sequences exceed max_num_seqs {self._max_num_seqs}"
            )
        plan = self._plan(seqs, want)
        total = plan.total
        dec = plan.decode
        slots = plan.slots
        cos = self._rope_cos[plan.positions][:, None, :]  # (total, 1, hd)
        sin = self._rope_sin[plan.positions][:, None, :, :]  # (total, 1, 2, half)

        # Every per-layer intermediate lives in a buffer reused across layers and steps: numpy would
        # otherwise allocate (and page-fault) a few MB per layer at prefill sizes.
        ws = self._workspace(total)
        h = ws.h[:total]
        qkv = ws.qkv[:total]
        rot = ws.rot[:total]
        tmp = ws.tmp[:total]
        attn = ws.attn[:total]
        proj = ws.proj[:total]
        gu = ws.gu[:total]
        qk = qkv[:, : qd + kd].reshape(total, nh + nkv, hd)
        # rotate_half(x) = [-x2, x1] is x's halves swapped (a view) times [-sin, sin].
        qk_swapped = qk.reshape(total, nh + nkv, 2, half)[:, :, ::-1]
        rot_flat = tmp.reshape(total, nh + nkv, hd)
        q = rot[:, :nh]
        k_new = rot[:, nh:].transpose(1, 0, 2)
        v_new = qkv[:, qd + kd :].reshape(total, nkv, hd).transpose(1, 0, 2)
        attn2d = attn.reshape(total, qd)
        gate = gu[:, :inter]
        up = gu[:, inter:]

        x = w.embed(plan.ids)
        with np.errstate(over="ignore"):
            for li, lw in enumerate(w.layers):
                # --- attention block ---
                self._rms_into(x, h)
                np.matmul(h, lw.wqkv, out=qkv)
                if lw.bqkv is not None:
                    qkv += lw.bqkv
                np.multiply(qk, cos, out=rot)
                np.multiply(qk_swapped, sin, out=tmp)
                rot += rot_flat
                kv.write(li, slots, k_new, v_new)

                if dec is not None:
                    if dec.int8 is None:
                        self._decode_attention(li, q, dec, attn)
                    else:
                        self._decode_attention_int8(li, q, dec, attn, kv)
                for pf in plan.prefills:
                    self._prefill_attention(li, q, pf, attn, ws)

                np.matmul(attn2d, lw.wo, out=proj)
                if lw.bo is not None:
                    proj += lw.bo
                x += proj

                # --- SwiGLU MLP ---
                # Gate and up columns are stored negated (see load): with g' = -gate, u' = -up,
                # silu(gate) * up = gate * up / (1 + e^-gate) = g' * u' / (1 + e^g').
                self._rms_into(x, h)
                np.matmul(h, lw.wgu, out=gu)
                np.multiply(gate, up, out=up)
                np.exp(gate, out=gate)
                gate += 1.0
                np.divide(up, gate, out=gate)
                np.matmul(gate, lw.wd, out=proj)
                x += proj

        # Advance bookkeeping only after the whole forward succeeded.
        for s in seqs:
            self._num_cached[s.seq_id] = s.num_computed_tokens + len(s.token_ids)
        out_rows = plan.out_rows
        if want == "all" and len(out_rows) == total:
            return x
        return x[out_rows]

    @staticmethod
    def _decode_attention(li: int, q: np.ndarray, dec: _DecodePlan, attn: np.ndarray) -> None:
        """Attention of every one-token (decode) sequence against its own KV runs.

        Two small GEMMs per sequence (scores, then values) are the Python work; the softmax runs
        once over all sequences' scores laid end to end, with segmented reductions. The division
        by the normaliser is deferred to the (much smaller) attention output.
        """
        qg, out = NumpyEngine._decode_io(q, dec, attn)
        matmul = np.matmul
        for b, keys_t, seg in dec.score_ops:
            matmul(qg[b], keys_t[li], out=seg)
        norm = NumpyEngine._segmented_softmax(dec)
        for b, seg, values in dec.value_ops:
            matmul(seg, values[li], out=out[b])
        for b, parts in dec.multi:
            acc = None
            for seg, values in parts:
                part = matmul(seg, values[li])
                acc = part if acc is None else acc + part
            out[b] = acc
        NumpyEngine._decode_finish(dec, out, norm, attn)

    @staticmethod
    def _decode_attention_int8(
        li: int, q: np.ndarray, dec: _DecodePlan, attn: np.ndarray, kv: KVCache
    ) -> None:
        """:meth:`_decode_attention` over an int8 pool.

        Each run is converted to float32 in a small scratch buffer (it stays in cache) before its
        GEMM; the per-token scales are applied to the flat score buffer: key scales to the scores,
        value scales to the probabilities after the normaliser is taken.
        """
        qg, out = NumpyEngine._decode_io(q, dec, attn)
        scratch = dec.int8
        assert scratch is not None
        matmul = np.matmul
        copyto = np.copyto
        for b, keys, seg in dec.score_ops:
            k = scratch.keys[:, : seg.shape[2]]
            copyto(k, keys[li])
            matmul(qg[b], k.transpose(0, 2, 1), out=seg)
        np.take(kv.key_scales[li], scratch.tokens, axis=1, out=scratch.scale)
        dec.scores *= scratch.scale[:, None, :]
        norm = NumpyEngine._segmented_softmax(dec)
        np.take(kv.value_scales[li], scratch.tokens, axis=1, out=scratch.scale)
        dec.scores *= scratch.scale[:, None, :]
        for b, seg, values in dec.value_ops:
            v = scratch.values[:, : seg.shape[2]]
            copyto(v, values[li])
            matmul(seg, v, out=out[b])
        for b, parts in dec.multi:
            acc = None
            for seg, values in parts:
                v = scratch.values[:, : seg.shape[2]]
                copyto(v, values[li])
                part = matmul(seg, v)
                acc = part if acc is None else acc + part
            out[b] = acc
        NumpyEngine._decode_finish(dec, out, norm, attn)

    @staticmethod
    def _decode_io(
        q: np.ndarray, dec: _DecodePlan, attn: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Queries grouped by KV head, and where the attention output goes."""
        nkv, group = dec.scores.shape[0], dec.scores.shape[1]
        b_count, hd = len(dec.rows), q.shape[2]
        if dec.all_rows:  # decode-only step: views, no gather or scatter
            return q.reshape(b_count, nkv, group, hd), attn.reshape(b_count, nkv, group, hd)
        assert dec.out is not None
        return q[dec.rows].reshape(b_count, nkv, group, hd), dec.out

    @staticmethod
    def _segmented_softmax(dec: _DecodePlan) -> np.ndarray:
        """Exponentiate each sequence's score segment (max-shifted) in place; return the sums."""
        scores = dec.scores
        if len(dec.rows) == 1:
            scores -= scores.max(axis=2, keepdims=True)
        else:
            peak = np.maximum.reduceat(scores, dec.offsets, axis=2)
            scores -= np.take(peak, dec.segment, axis=2, out=dec.peak)
        np.exp(scores, out=scores)
        return np.add.reduceat(scores, dec.offsets, axis=2)

    @staticmethod
    def _decode_finish(
        dec: _DecodePlan, out: np.ndarray, norm: np.ndarray, attn: np.ndarray
    ) -> None:
        out /= norm.transpose(2, 0, 1)[..., None]
        if not dec.all_rows:
            attn[dec.rows] = out.reshape(len(dec.rows), -1, out.shape[3])

    def _prefill_attention(
        self, li: int, q: np.ndarray, pf: _PrefillPlan, attn: np.ndarray, ws: _Workspace
    ) -> None:
        """Causal attention of one multi-token chunk, by KV head and by block of queries.

        A block of ``_PREFILL_BLOCK`` query tokens only scores the keys up to its last token (the
        upper triangle of the chunk is never computed), and only its diagonal sub-block needs the
        causal mask. Each score block is at most ``_PREFILL_BLOCK * group * ctx`` floats, so it stays
        in cache across the softmax passes.
        """
        kv = self._kv
        nkv = kv.keys.shape[1]
        n = pf.n
        nh, hd = q.shape[1], q.shape[2]
        group = nh // nkv
        cached = pf.ctx - n
        if len(pf.runs) == 1 and not kv.quantized:
            start, length = pf.runs[0]
            keys = kv.keys[li, :, start : start + length]
            values = kv.values[li, :, start : start + length]
        else:
            parts = [kv.dequantize(li, a, m) for a, m in pf.runs]
            keys = np.concatenate([k for k, _ in parts], axis=1)
            values = np.concatenate([v for _, v in parts], axis=1)
        # (kv_heads, tokens * group, head_dim): the queries sharing a KV head, token-major.
        qh = np.ascontiguousarray(
            q[pf.row0 : pf.row0 + n].reshape(n, nkv, group, hd).transpose(1, 0, 2, 3)
        ).reshape(nkv, n * group, hd)
        out = np.empty_like(qh)
        block = _PREFILL_BLOCK
        scratch = ws.prefill_scores(block * group * pf.ctx)
        peak = np.empty((block * group, 1), dtype=np.float32)
        norm = np.empty((block * group, 1), dtype=np.float32)
        for b0 in range(0, n, block):
            b1 = min(n, b0 + block)
            r0, r1 = b0 * group, b1 * group
            rows = r1 - r0
            visible = cached + b1
            pk, nm = peak[:rows], norm[:rows]
            sc = scratch[: rows * visible].reshape(rows, visible)
            for kh in range(nkv):
                np.matmul(qh[kh, r0:r1], keys[kh, :visible].T, out=sc)
                sc[:, cached + b0 :] += self._causal_mask[:rows, : b1 - b0]
                np.max(sc, axis=1, keepdims=True, out=pk)
                sc -= pk
                np.exp(sc, out=sc)
                np.sum(sc, axis=1, keepdims=True, out=nm)
                o = out[kh, r0:r1]
                np.matmul(sc, values[kh, :visible], out=o)
                o /= nm
        attn[pf.row0 : pf.row0 + n] = (
            out.reshape(nkv, n, group, hd).transpose(1, 0, 2, 3).reshape(n, nh, hd)
        )

    def _rms_into(self, x: np.ndarray, out: np.ndarray) -> None:
        """``out = x / rms(x)`` row-wise (the gain is folded into the next projection)."""
        ms = _row_sq_norms(x)
        ms *= 1.0 / x.shape[1]
        ms += self.config.rms_norm_eps
        np.sqrt(ms, out=ms)
        np.divide(x, ms[:, None], out=out)


class _Workspace:
    """Per-layer intermediates of a step of up to ``rows`` token rows, reused across steps."""

    def __init__(self, rows: int, cfg: LlamaConfig) -> None:
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        f32 = np.float32
        self.rows = rows
        self.h = np.empty((rows, cfg.hidden_size), dtype=f32)
        self.qkv = np.empty((rows, cfg.q_dim + 2 * cfg.kv_dim), dtype=f32)
        self.rot = np.empty((rows, nh + nkv, hd), dtype=f32)
        self.tmp = np.empty((rows, nh + nkv, 2, hd // 2), dtype=f32)
        self.attn = np.empty((rows, nh, hd), dtype=f32)
        self.proj = np.empty((rows, cfg.hidden_size), dtype=f32)
        self.gu = np.empty((rows, 2 * cfg.intermediate_size), dtype=f32)
        self._scores = np.empty(0, dtype=f32)

    def prefill_scores(self, size: int) -> np.ndarray:
        if self._scores.size < size:
            self._scores = np.empty(size, dtype=np.float32)
        return self._scores[:size]
