"""Sampling: validation, seeds, top-k/top-p support, logit bias, stop strings."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from runtime.engine.base import SamplingParams
from runtime.engine.sampling import TextStream, sample_row, sample_rows

VOCAB = 50


def _logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 2, VOCAB).astype(np.float32)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -3}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kwargs)


def test_params_normalise_stop_and_bias() -> None:
    p = SamplingParams(stop="END", logit_bias={"3": 2})
    assert p.stop == ("END",)
    assert p.logit_bias == {3: 2.0}


def test_greedy_is_argmax_and_ignores_rng() -> None:
    logits = _logits()
    p = SamplingParams(temperature=0.0)
    assert sample_row(logits, p, np.random.default_rng(1)) == int(np.argmax(logits))


def test_seed_reproducible_and_keyed_by_position() -> None:
    logits = np.tile(_logits(), (3, 1))
    p = SamplingParams(temperature=1.0, seed=1234)
    draws_a = [
        sample_rows(logits.copy(), [p] * 3, [i, i, i], np.random.default_rng(i)) for i in range(20)
    ]
    draws_b = [
        sample_rows(logits.copy(), [p] * 3, [i, i, i], np.random.default_rng(99 + i))
        for i in range(20)
    ]
    assert draws_a == draws_b  # the default generator is not used for seeded requests
    assert all(len(set(row)) == 1 for row in draws_a)  # same seed + position: same token in a batch
    assert len({row[0] for row in draws_a}) > 1  # different positions draw differently
    other = [
        sample_rows(
            logits.copy(), [SamplingParams(temperature=1.0, seed=99)], [i], np.random.default_rng()
        )[0]
        for i in range(20)
    ]
    assert other != [row[0] for row in draws_a]


def test_top_k_restricts_support() -> None:
    logits = _logits(3)
    allowed = set(np.argsort(-logits)[:3].tolist())
    p = SamplingParams(temperature=5.0, top_k=3)
    rng = np.random.default_rng(0)
    seen = {sample_row(logits.copy(), p, rng) for _ in range(500)}
    assert seen == allowed


def test_top_p_restricts_support_to_the_nucleus() -> None:
    logits = np.zeros(VOCAB, dtype=np.float32)
    # Probabilities ~0.232, 0.141, 0.085; the 47 others ~0.0115 each.
    logits[[4, 9, 17]] = [3.0, 2.5, 2.0]
    rng = np.random.default_rng(0)
    assert {sample_row(logits.copy(), SamplingParams(top_p=0.2), rng) for _ in range(100)} == {4}
    assert {sample_row(logits.copy(), SamplingParams(top_p=0.3), rng) for _ in range(300)} == {4, 9}
    assert {sample_row(logits.copy(), SamplingParams(top_p=0.4), rng) for _ in range(300)} == {
        4,
        9,
        17,
    }
    seen = {sample_row(logits.copy(), SamplingParams(top_p=0.99), rng) for _ in range(3000)}
    assert len(seen) > 40  # nearly the whole vocabulary is inside a 0.99 nucleus


def test_top_p_beyond_preselection_uses_whole_vocabulary() -> None:
    logits = np.zeros(2000, dtype=np.float32)  # uniform: nucleus of 0.9 is 1800 tokens
    rng = np.random.default_rng(0)
    seen = {sample_row(logits.copy(), SamplingParams(top_p=0.9), rng) for _ in range(3000)}
    assert max(seen) > 600  # would be impossible if only the 512 preselected were eligible


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = np.tile(_logits(5), (2, 1))
    best = int(np.argmax(logits[0]))
    forced = sample_rows(
        logits.copy(),
        [SamplingParams(temperature=0.0, logit_bias={11: 100})] * 2,
        [0, 0],
        np.random.default_rng(),
    )
    assert forced == [11, 11]
    banned = sample_rows(
        logits.copy(),
        [SamplingParams(temperature=0.0, logit_bias={best: -100})],
        [0],
        np.random.default_rng(),
    )
    assert banned[0] != best


def test_logit_bias_through_the_engine(core: Any) -> None:
    prompt = "The capital of France is"
    [plain] = core.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3))
    banned = plain.token_ids[0]
    [biased] = core.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=3, logit_bias={banned: -100})
    )
    assert biased.token_ids[0] != banned
    with pytest.raises(ValueError, match="logit_bias"):
        core.add_request(prompt, SamplingParams(logit_bias={10**6: 1.0}))


def test_seeded_sampling_reproducible_through_the_engine(core: Any) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=16, ignore_eos=True)
    a, b = core.generate(["Tell me a story", "Tell me a story"], [p, p])
    assert a.token_ids == b.token_ids
    [c] = core.generate(
        ["Tell me a story"],
        SamplingParams(temperature=1.0, top_p=0.95, seed=43, max_tokens=16, ignore_eos=True),
    )
    assert c.token_ids != a.token_ids


# -- stop strings ---------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character, plus multi-byte UTF-8 split across tokens for id >= 1000."""

    def __init__(self) -> None:
        self.pieces: dict[int, bytes] = {}

    def ids(self, text: str) -> list[int]:
        out = []
        for ch in text:
            data = ch.encode()
            if len(data) == 1:
                self.pieces[ord(ch)] = data
                out.append(ord(ch))
            else:  # split multi-byte characters into one token per byte
                for b in data:
                    self.pieces[1000 + b] = bytes([b])
                    out.append(1000 + b)
        return out

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def _stream(text: str, stop: list[str]) -> tuple[str, TextStream, list[str]]:
    tok = CharTokenizer()
    ids = tok.ids(text)
    s = TextStream(tok.decode, stop)
    parts = []
    for i in ids:
        parts.append(s.push(i))
        if s.stopped:
            break
    parts.append(s.flush())
    return "".join(parts), s, parts


def test_stop_string_across_token_boundaries() -> None:
    out, s, parts = _stream("Hello world. STOP here", ["STOP"])
    assert out == "Hello world. "
    assert s.stopped and s.stop_string == "STOP"
    # Held-back text never leaks: no emitted piece contains a prefix of the stop string.
    assert "S" not in "".join(parts)


def test_earliest_stop_string_wins_and_partial_prefix_is_released() -> None:
    out, s, _ = _stream("abc ST xyz END more", ["STOP", "END"])
    assert out == "abc ST xyz "
    assert s.stop_string == "END"


def test_no_stop_string_releases_everything_including_multibyte() -> None:
    text = "naïve 日本 🎉 done"
    out, s, parts = _stream(text, ["zzz"])
    assert out == text and not s.stopped
    assert all("\ufffd" not in p for p in parts)


def test_stop_string_at_start_and_multibyte_stop() -> None:
    assert _stream("END right away", ["END"])[0] == ""
    assert _stream("price: 5€ total", ["€"])[0] == "price: 5"


def test_stop_strings_through_the_engine(core: Any) -> None:
    [full] = core.generate(
        ["Count: one, two, three,"], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    )
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    [cut] = core.generate(
        ["Count: one, two, three,"],
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]),
    )
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert len(cut.token_ids) < len(full.token_ids)
