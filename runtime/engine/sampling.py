"""Token sampling and stop-string handling.

This module owns turning a row of logits into a token id under :class:`SamplingParams`
(greedy, temperature, top-k, top-p, logit bias, per-request seeds) and turning a stream of token ids
into text while watching for stop strings (:class:`TextStream`).

Seeded requests draw from a generator keyed by ``(seed, index of the token being generated)``, so a
seed gives the same tokens whether the request runs alone, batched, or is preempted and recomputed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from runtime.engine.base import SamplingParams

__all__ = ["TextStream", "apply_logit_bias", "request_rng", "sample_row", "sample_rows"]

# Candidates considered before falling back to a full sort for nucleus sampling.
_TOP_P_PRESELECT = 512


def request_rng(seed: int, token_index: int) -> np.random.Generator:
    """The generator for the ``token_index``-th output token of a request seeded with ``seed``."""
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed & (2**63 - 1), token_index]))
    )


def apply_logit_bias(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Add ``params.logit_bias`` to a 1-D logits row, in place; returns the row."""
    if params.logit_bias:
        ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64, count=len(params.logit_bias))
        bias = np.fromiter(
            params.logit_bias.values(), dtype=np.float32, count=len(params.logit_bias)
        )
        np.add.at(logits, ids, bias)
    return logits


def _candidates(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Token ids allowed by top-k/top-p and their renormalised probabilities (descending)."""
    scaled = logits.astype(np.float64) / params.temperature
    vocab = scaled.shape[0]
    k = params.top_k if 0 < params.top_k < vocab else vocab
    if params.top_p < 1.0 and k == vocab:
        k = min(_TOP_P_PRESELECT, vocab)
        preselected = True
    else:
        preselected = False
    ids = np.argpartition(-scaled, k - 1)[:k] if k < vocab else np.arange(vocab)
    order = np.argsort(-scaled[ids], kind="stable")
    ids = ids[order]
    top = scaled[ids]
    mx = scaled.max()
    weights = np.exp(top - mx)
    if params.top_p < 1.0:
        # Mass of the candidates relative to the full (or top-k) distribution.
        total = np.exp(scaled - mx).sum() if preselected else weights.sum()
        cum = np.cumsum(weights) / total
        if preselected and cum[-1] < params.top_p:
            # The nucleus is wider than the preselection: redo over the whole vocabulary.
            ids = np.argsort(-scaled, kind="stable")
            weights = np.exp(scaled[ids] - mx)
            cum = np.cumsum(weights) / weights.sum()
        keep = int(np.searchsorted(cum, params.top_p, side="left")) + 1
        ids, weights = ids[:keep], weights[:keep]
    probs = weights / weights.sum()
    return ids, probs


def sample_row(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Sample one token id from a 1-D logits row (bias must already be applied)."""
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    ids, probs = _candidates(logits, params)
    u = rng.random()
    idx = int(np.searchsorted(np.cumsum(probs), u, side="right"))
    return int(ids[min(idx, len(ids) - 1)])


def sample_rows(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    token_indices: Sequence[int],
    default_rng: np.random.Generator,
) -> list[int]:
    """Sample one token per row of ``logits`` (shape ``(n, vocab)``, modified in place).

    ``token_indices[i]`` is how many tokens row ``i``'s request has generated so far; it keys the
    seeded generator so draws do not depend on batching.
    """
    if all(p.temperature == 0.0 and not p.logit_bias for p in params):
        # All greedy (the common batch): argmax in place, without gathering rows into a copy.
        return [int(t) for t in np.argmax(logits, axis=1).tolist()]
    out = [0] * len(params)
    greedy_rows: list[int] = []
    for i, p in enumerate(params):
        if p.logit_bias:
            apply_logit_bias(logits[i], p)
        if p.temperature == 0.0:
            greedy_rows.append(i)
            continue
        rng = request_rng(p.seed, token_indices[i]) if p.seed is not None else default_rng
        out[i] = sample_row(logits[i], p, rng)
    if greedy_rows:
        best = np.argmax(logits[greedy_rows], axis=1)
        for i, tok in zip(greedy_rows, best.tolist(), strict=True):
            out[i] = int(tok)
    return out


class TextStream:
    """Incremental detokenizer with stop-string detection.

    Feed generated token ids one at a time with :meth:`push`; it returns the text that can be shown
    now. Text is held back while it ends in an incomplete UTF-8 sequence or could be the start of a
    stop string. When a stop string appears (also across token boundaries), the text is cut just
    before it and :attr:`stopped` becomes true. Call :meth:`flush` when generation ends for another
    reason to release held-back text.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._max_hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0  # start of the ids window re-decoded for context
        self._read = 0  # ids up to here are already in self._text
        self._text = ""  # all decoded text so far (complete characters only)
        self._emitted = 0  # chars of self._text handed out
        self.stopped = False
        self.stop_string: str | None = None

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text[: self._emitted]

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            self._text += full[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self._ids)
        return self._release()

    def flush(self) -> str:
        """Emit everything still held back (generation has ended)."""
        if self.stopped:
            return ""
        if self._read < len(self._ids):
            full = self._decode(self._ids[self._prefix :])
            prefix_text = self._decode(self._ids[self._prefix : self._read])
            self._text += full[len(prefix_text) :]
            self._read = len(self._ids)
        out = self._text[self._emitted :]
        self._emitted = len(self._text)
        return out

    def _release(self) -> str:
        if self._stop:
            # A stop string may begin inside text already emitted only if it was held back, so
            # searching from (emitted - longest stop + 1) covers matches across token boundaries.
            search_from = max(0, self._emitted - self._max_hold)
            best: tuple[int, str] | None = None
            for s in self._stop:
                at = self._text.find(s, search_from)
                if at != -1 and (best is None or at < best[0]):
                    best = (at, s)
            if best is not None:
                at, s = best
                out = self._text[self._emitted : at]
                self._text = self._text[:at]
                self._emitted = at
                self.stopped = True
                self.stop_string = s
                return out
            hold = self._held_suffix()
        else:
            hold = 0
        end = len(self._text) - hold
        if end <= self._emitted:
            return ""
        out = self._text[self._emitted : end]
        self._emitted = end
        return out

    def _held_suffix(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        text = self._text
        for n in range(min(self._max_hold, len(text) - self._emitted), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0
