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
from runtime.engine.model_files import resolve_model_path
from runtime.engine.sampling import sample_rows
from runtime.engine.tokenizer import GGUFTokenizer

__all__ = ["NumpyEngine"]

DEFAULT_KV_CACHE_TOKENS = 16384


def _row_sq_norms(x: np.ndarray) -> np.ndarray:
    # np.vecdot (numpy >= 2.0) is ~2x faster than einsum for this; keep working on numpy 1.26.
    if _VECDOT is not None:
        return _VECDOT(x, x)
    return np.einsum("ij,ij->i", x, x)


_VECDOT = getattr(np, "vecdot", None)
DEFAULT_MAX_MODEL_LEN = 4096


@dataclass
class _DecodePlan:
    """Decode sequences of one step and where their scores live in the flat buffer."""

    rows: np.ndarray  # row index in the step's token matrix, per decode sequence
    offsets: np.ndarray  # start of each sequence's segment in the score buffer
    lengths: np.ndarray  # context length of each sequence
    total: int  # sum of lengths
    # Per sequence: list of (pool_start, length, buffer_offset) runs.
    runs: list[list[tuple[int, int, int]]]
    single: list[tuple[int, int, int, int]]  # (b, pool_start, length, offset) for one-run seqs
    multi: list[int]  # indices b of sequences stored in several runs


@dataclass
class _PrefillPlan:
    row0: int
    n: int
    runs: list[tuple[int, int]]
    mask: np.ndarray  # (n * group, ctx) additive causal mask


class NumpyEngine(Engine):
    """Llama-architecture GGUF runner on CPU with numpy.

    ``kv_cache_tokens`` sizes the KV pool (float32: ``2 * layers * kv_heads * head_dim * 4`` bytes
    per token, 46 KiB for SmolLM2-135M). ``max_model_len`` defaults to
    ``min(context_length, 4096, kv_cache_tokens)``.
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
    ) -> None:
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
        self._rng = np.random.default_rng(seed)
        self._loaded = False
        self._num_cached: dict[str, int] = {}
        self.model: GGUFModel | None = None
        self.tokenizer: GGUFTokenizer | None = None
        self.load_seconds = 0.0

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
        positions = np.arange(max_len, dtype=np.float64) / cfg.rope_scaling_factor
        angles = np.outer(positions, model.weights.inv_freq)
        self._cos = np.cos(angles).astype(np.float32)
        self._sin = np.sin(angles).astype(np.float32)
        self._kv = KVCache(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self._kv_tokens, self._block_size
        )
        self.model = model
        self.tokenizer = tokenizer
        self.config: LlamaConfig = cfg
        self._max_model_len = max_len
        self._loaded = True
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
        h = self._rms(hidden)
        h *= w.final_norm
        return h @ w.head_t

    def _rms(self, x: np.ndarray) -> np.ndarray:
        ms = _row_sq_norms(x)
        ms *= 1.0 / x.shape[1]
        ms += self.config.rms_norm_eps
        np.sqrt(ms, out=ms)
        return x / ms[:, None]

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

    def _forward(self, seqs: list[SeqInput], want: str) -> np.ndarray:
        """Run all layers over the step's tokens; return final hidden rows.

        ``want="last"``: the last row of every sequence with ``sample=True``;
        ``want="all"``: every row (single-sequence scoring).
        """
        cfg = self.config
        w = self.model.weights  # type: ignore[union-attr]
        kv = self._kv
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        group = cfg.group_size
        half = hd // 2
        qd, kd = cfg.q_dim, cfg.kv_dim

        for s in seqs:
            self._validate(s)
        if len(seqs) > self._max_num_seqs:
            raise ValueError(
                f"seqs: {len(seqs)} sequences exceed max_num_seqs {self._max_num_seqs}"
            )

        # ---- plan: token rows, positions, KV slots, attention layout ----
        ids_parts: list[np.ndarray] = []
        pos_parts: list[np.ndarray] = []
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
            ids_parts.append(np.asarray(s.token_ids, dtype=np.int64))
            pos_parts.append(np.arange(c, ctx, dtype=np.int64))
            slot_parts.append(kv.slots(s.seq_id, c, n))
            runs = kv.runs(s.seq_id, ctx)
            if n == 1:
                dec_rows.append(row)
                dec_runs.append(runs)
                dec_lens.append(ctx)
            else:
                key_pos = np.arange(ctx)
                query_pos = np.repeat(np.arange(c, ctx), group)
                mask = np.where(key_pos[None, :] > query_pos[:, None], -np.inf, 0.0).astype(
                    np.float32
                )
                prefills.append(_PrefillPlan(row0=row, n=n, runs=runs, mask=mask))
            if want == "all":
                out_rows.extend(range(row, row + n))
            elif s.sample:
                out_rows.append(row + n - 1)
            row += n
        total = row
        ids = np.concatenate(ids_parts)
        positions = np.concatenate(pos_parts)
        slots = np.concatenate(slot_parts)
        cos = self._cos[positions][:, None, :]
        sin = self._sin[positions][:, None, :]

        dec: _DecodePlan | None = None
        if dec_rows:
            lengths = np.asarray(dec_lens, dtype=np.int64)
            offsets = np.zeros(len(dec_lens), dtype=np.int64)
            np.cumsum(lengths[:-1], out=offsets[1:])
            single: list[tuple[int, int, int, int]] = []
            multi: list[int] = []
            runs_off: list[list[tuple[int, int, int]]] = []
            for b, runs in enumerate(dec_runs):
                off = int(offsets[b])
                lst = []
                for start, length in runs:
                    lst.append((start, length, off))
                    off += length
                runs_off.append(lst)
                if len(runs) == 1:
                    single.append((b, runs[0][0], runs[0][1], int(offsets[b])))
                else:
                    multi.append(b)
            dec = _DecodePlan(
                rows=np.asarray(dec_rows, dtype=np.int64),
                offsets=offsets,
                lengths=lengths,
                total=int(lengths.sum()),
                runs=runs_off,
                single=single,
                multi=multi,
            )
            scores = np.empty((nkv, group, dec.total), dtype=np.float32)
            dec_out = np.empty((len(dec_rows), nkv, group, hd), dtype=np.float32)

        x = w.embed(ids)
        rot = np.empty((total, nh + nkv, hd), dtype=np.float32)
        tmp = np.empty((total, nh + nkv, half), dtype=np.float32)
        attn = np.empty((total, nh, hd), dtype=np.float32)
        inter = cfg.intermediate_size

        with np.errstate(over="ignore"):
            for li, lw in enumerate(w.layers):
                # --- attention block ---
                h = self._rms(x)
                qkv = h @ lw.wqkv
                if lw.bqkv is not None:
                    qkv += lw.bqkv
                qk = qkv[:, : qd + kd].reshape(total, nh + nkv, hd)
                x1, x2 = qk[..., :half], qk[..., half:]
                np.multiply(x1, cos, out=rot[..., :half])
                np.multiply(x2, sin, out=tmp)
                rot[..., :half] -= tmp
                np.multiply(x2, cos, out=rot[..., half:])
                np.multiply(x1, sin, out=tmp)
                rot[..., half:] += tmp
                q = rot[:, :nh]
                k_cache = kv.keys[li]
                v_cache = kv.values[li]
                k_cache[:, slots, :] = rot[:, nh:].transpose(1, 0, 2)
                v_cache[:, slots, :] = qkv[:, qd + kd :].reshape(total, nkv, hd).transpose(1, 0, 2)

                if dec is not None:
                    self._decode_attention(q, k_cache, v_cache, dec, scores, dec_out, attn)
                for pf in prefills:
                    self._prefill_attention(q, k_cache, v_cache, pf, attn)

                o = attn.reshape(total, qd) @ lw.wo
                if lw.bo is not None:
                    o += lw.bo
                x += o

                # --- SwiGLU MLP ---
                h = self._rms(x)
                gu = h @ lw.wgu
                gate = gu[:, :inter]
                up = gu[:, inter:]
                act = np.negative(gate)
                np.exp(act, out=act)
                act += 1.0
                np.divide(gate, act, out=act)  # silu(gate) = gate / (1 + e^-gate)
                act *= up
                x += act @ lw.wd

        # Advance bookkeeping only after the whole forward succeeded.
        for s in seqs:
            self._num_cached[s.seq_id] = s.num_computed_tokens + len(s.token_ids)
        if want == "all" and len(out_rows) == total:
            return x
        return x[out_rows]

    @staticmethod
    def _decode_attention(
        q: np.ndarray,
        k_cache: np.ndarray,
        v_cache: np.ndarray,
        dec: _DecodePlan,
        scores: np.ndarray,
        out: np.ndarray,
        attn: np.ndarray,
    ) -> None:
        nkv, group = scores.shape[0], scores.shape[1]
        hd = q.shape[2]
        qg = q[dec.rows].reshape(len(dec.rows), nkv, group, hd)
        matmul = np.matmul
        for b, start, length, off in dec.single:
            matmul(
                qg[b],
                k_cache[:, start : start + length].transpose(0, 2, 1),
                out=scores[:, :, off : off + length],
            )
        for b in dec.multi:
            for start, length, off in dec.runs[b]:
                matmul(
                    qg[b],
                    k_cache[:, start : start + length].transpose(0, 2, 1),
                    out=scores[:, :, off : off + length],
                )
        # Segmented softmax over each sequence's span of the flat score buffer; the division by
        # the normaliser is deferred to the (much smaller) attention output.
        peak = np.maximum.reduceat(scores, dec.offsets, axis=2)
        scores -= np.repeat(peak, dec.lengths, axis=2)
        np.exp(scores, out=scores)
        norm = np.add.reduceat(scores, dec.offsets, axis=2)
        for b, start, length, off in dec.single:
            matmul(scores[:, :, off : off + length], v_cache[:, start : start + length], out=out[b])
        for b in dec.multi:
            acc = None
            for start, length, off in dec.runs[b]:
                part = matmul(scores[:, :, off : off + length], v_cache[:, start : start + length])
                acc = part if acc is None else acc + part
            out[b] = acc
        out /= norm.transpose(2, 0, 1)[..., None]
        attn[dec.rows] = out.reshape(len(dec.rows), nkv * group, hd)

    @staticmethod
    def _prefill_attention(
        q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pf: _PrefillPlan, attn: np.ndarray
    ) -> None:
        nkv = k_cache.shape[0]
        n = pf.n
        nh, hd = q.shape[1], q.shape[2]
        group = nh // nkv
        qs = (
            q[pf.row0 : pf.row0 + n]
            .reshape(n, nkv, group, hd)
            .transpose(1, 0, 2, 3)
            .reshape(nkv, n * group, hd)
        )
        if len(pf.runs) == 1:
            start, length = pf.runs[0]
            keys = k_cache[:, start : start + length].transpose(0, 2, 1)
            values = v_cache[:, start : start + length]
        else:
            keys = np.concatenate([k_cache[:, a : a + n_] for a, n_ in pf.runs], axis=1).transpose(
                0, 2, 1
            )
            values = np.concatenate([v_cache[:, a : a + n_] for a, n_ in pf.runs], axis=1)
        sc = qs @ keys
        sc += pf.mask
        sc -= sc.max(axis=-1, keepdims=True)
        np.exp(sc, out=sc)
        norm = sc.sum(axis=-1, keepdims=True)
        o = sc @ values
        o /= norm
        attn[pf.row0 : pf.row0 + n] = (
            o.reshape(nkv, n, group, hd).transpose(1, 0, 2, 3).reshape(n, nh, hd)
        )
