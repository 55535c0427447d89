"""The numpy engine against transformers loading the same GGUF (an independent implementation).

Both dequantise the same Q4_1/Q8_0 weights to float32, so differences are float rounding only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from runtime.engine.base import SamplingParams

# Tolerances: measured max |diff| is ~1e-4 on logits of magnitude ~30; we allow 20x headroom for
# BLAS summation-order differences, and demand exact top-1 agreement.
LOGITS_ATOL = 2e-3
GREEDY_TOKENS = 32

LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1492, Columbus sailed the ocean blue. "
    "Photosynthesis converts light energy into chemical energy stored in glucose. "
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"
    "Les élèves étudient la littérature française; 東京は日本の首都です。 "
) * 3


def _reference_logits(reference: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].float().numpy()


def _reference_greedy(reference: Any, ids: list[int], n: int) -> list[int]:
    import torch

    out: list[int] = []
    with torch.no_grad():
        res = reference(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            res = reference(
                torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True
            )
    return out


def test_logits_match_reference(engine: Any, reference: Any) -> None:
    ids = engine.encode(LONG_TEXT)
    assert len(ids) >= 300, len(ids)
    ids = ids[:320]
    ours = engine.prompt_logits(ids)
    ref = _reference_logits(reference, ids)
    assert ours.shape == ref.shape == (len(ids), engine.config.vocab_size)
    diff = np.abs(ours - ref)
    assert diff.max() < LOGITS_ATOL, f"max |diff| {diff.max():.2e}"
    agree = (ours.argmax(axis=1) == ref.argmax(axis=1)).mean()
    assert agree == 1.0, f"top-1 agreement {agree:.4f}"


def test_chunked_prefill_matches_reference(engine: Any, reference: Any) -> None:
    # Prefill in uneven chunks through step(): the last-position logits must match the reference.
    from runtime.engine.base import SeqInput, StepInput

    ids = engine.encode(LONG_TEXT)[:150]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    assert engine.kv.reserve("chunked", len(ids))
    try:
        done = 0
        for size in (7, 64, 1, 50):
            engine.step(
                StepInput([SeqInput("chunked", ids[done : done + size], done, False, params)])
            )
            done += size
        out = engine.step(StepInput([SeqInput("chunked", ids[done:], done, True, params)]))
    finally:
        engine.free("chunked")
    ref = _reference_logits(reference, ids)
    assert out.sampled["chunked"] == int(ref[-1].argmax())


@pytest.mark.parametrize(
    "prompt",
    [
        "The capital of France is",
        "def quicksort(arr):",
        "Once upon a time, in a small village by the sea,",
    ],
)
def test_greedy_generation_matches_reference(core: Any, reference: Any, prompt: str) -> None:
    ids = core.engine.encode(prompt)
    expected = _reference_greedy(reference, ids, GREEDY_TOKENS)
    [result] = core.generate(
        [ids], SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    )
    assert result.token_ids == expected


TOKENIZER_CASES = [
    "Hello, world!",
    "  leading spaces\tand\ttabs\n\nnewlines  ",
    "naïve café — “quotes” 日本語 😀🎉",
    "<|im_start|>user\nhi<|im_end|>\n",
    "x = 12345 + 67.89",
    "don't you'll I'm WE'RE",
    "",
    " ",
    "\n\n\n",
    "ÅÄÖ åäö ß Ω Привет мир",
    "def f(x):\n    return x**2  # square\n",
    "http://example.com/path?q=1&r=2",
    "\u00a0non-breaking\u2003em space\u200bzero width",
]


@pytest.mark.parametrize("text", TOKENIZER_CASES)
def test_tokenizer_matches_reference(engine: Any, reference_tokenizer: Any, text: str) -> None:
    ours = engine.encode(text)
    assert ours == reference_tokenizer.encode(text)
    assert engine.decode(ours, skip_special_tokens=False) == text


def test_chat_template_matches_reference(engine: Any, reference_tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    ours = engine.apply_chat_template(messages)
    ref = reference_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ours == ref
    no_system = engine.apply_chat_template(messages[1:2])
    assert no_system.startswith("<|im_start|>system\n")
    assert no_system.endswith("<|im_start|>assistant\n")
