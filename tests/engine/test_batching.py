"""Continuous batching on the real engine: batch invariance, preemption, abort, streaming."""

from __future__ import annotations

from typing import Any

from runtime.engine.base import SamplingParams
from runtime.engine.core import EngineCore
from runtime.engine.numpy_engine import NumpyEngine

TARGET = "Explain why the sky is blue in one paragraph."
OTHERS = [
    "Hi",
    "List five fruits:",
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "1, 2, 3, 4,",
    "The history of the Roman Empire begins with the founding of the city of Rome, which according to legend "
    "happened in 753 BC when the twins Romulus and Remus",
    "def add(a, b):",
    "Translate to French: good morning",
    "Q: What is the boiling point of water?\nA:",
    "Once",
    "The mitochondria is",
    "Dear hiring manager, I am writing to apply for",
    "import numpy as np\n\nx = np.",
    "In a shocking finding, scientists discovered a herd of unicorns living in a remote valley",
    "Roses are red,",
    "SELECT name FROM users WHERE",
]


def test_greedy_output_is_batch_invariant(core: Any) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    [alone] = core.generate([TARGET], params, chat=True)

    # Same prompt inside a batch of 16 mixed-length sequences admitted at different steps.
    outputs: dict[str, list[int]] = {}
    first = [
        core.add_request(p, SamplingParams(temperature=0.0, max_tokens=12 + 3 * i, ignore_eos=True))
        for i, p in enumerate(OTHERS[:6])
    ]
    for _ in range(3):
        core.step()
    target_id = core.add_request(TARGET, params, chat=True)
    core.step()
    rest = [
        core.add_request(p, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
        for p in OTHERS[6:]
    ]
    max_batch = 0
    while core.has_unfinished():
        core.step()
        max_batch = max(max_batch, core.scheduler.num_running)
    for rid in [*first, target_id, *rest]:
        res = core.pop_result(rid)
        assert res is not None
        outputs[rid] = res.token_ids
    assert max_batch >= 12, max_batch
    assert len(outputs) == 16
    assert outputs[target_id] == alone.token_ids


def test_preemption_and_recompute_keep_greedy_output(model_path: Any) -> None:
    # A KV pool too small for all requests at once forces preemption + recomputation.
    small = NumpyEngine(
        model_path, kv_cache_tokens=192, max_model_len=192, max_num_seqs=8, block_size=16
    )
    core = EngineCore(small)
    prompts = [OTHERS[4], TARGET, OTHERS[12], OTHERS[10], OTHERS[2], OTHERS[7]]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    expected = []
    for p in prompts:  # each alone: no pressure
        [r] = core.generate([p], params)
        expected.append(r.token_ids)
    ids = [core.add_request(p, params, priority=i % 2) for i, p in enumerate(prompts)]
    core.run_until_done()
    assert core.scheduler.num_preemptions > 0
    got = [core.pop_result(i).token_ids for i in ids]  # type: ignore[union-attr]
    assert got == expected
    assert small.kv.stats().used_blocks == 0


def test_abort_frees_kv_and_reports_abort(core: Any) -> None:
    rid = core.add_request(
        "Tell me a long story", SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    )
    for _ in range(3):
        core.step()
    assert core.engine.kv.reserved_tokens(rid) > 0
    core.abort(rid)
    outs = core.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [(rid, True, "abort")]
    assert core.engine.kv.reserved_tokens(rid) == 0
    res = core.pop_result(rid)
    assert res is not None and res.finish_reason == "abort" and 0 < len(res.token_ids) < 500


def test_stream_yields_increments_with_callbacks(core: Any) -> None:
    seen: list[str] = []
    text = ""
    ids: list[int] = []
    for out in core.stream(
        "The capital of France is", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ):
        text += out.new_text
        ids += out.new_token_ids
        seen.append(out.new_text)
    assert len(ids) == 8
    assert text == core.engine.decode(ids)
    assert len(seen) == 8
