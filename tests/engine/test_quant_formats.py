"""Loading Llama GGUFs of several tensor types, written here with ``gguf.GGUFWriter``.

A tiny random Llama (2 layers, hidden 64, GQA 4:2, SmolLM2's tokenizer) is written as F32, F16,
Q8_0, Q4_0 and Q4_1 (weights quantised with ``gguf.quants.quantize``, Q/K rows permuted the way
llama.cpp's converter does). Each file must load and give the logits of an independent float64
reference forward computed here from the same (de-quantised) weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from runtime.engine.numpy_engine import NumpyEngine

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
THETA, EPS = 10000.0, 1e-5

# Logits of the tiny model are O(1); float32 vs float64 differences are ~1e-6.
EXACT_ATOL = 2e-4


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permutation of Q/K rows (HF rotate-half -> GGUF layout)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _random_weights(vocab: int, untied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def mat(out: int, inp: int) -> np.ndarray:
        return rng.normal(0, 1 / np.sqrt(inp), (out, inp)).astype(np.float32)

    w: dict[str, np.ndarray] = {
        "token_embd.weight": rng.normal(0, 1, (vocab, HIDDEN)).astype(np.float32)
    }
    for i in range(LAYERS):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = (1 + 0.1 * rng.normal(size=HIDDEN)).astype(np.float32)
        w[p + "ffn_norm.weight"] = (1 + 0.1 * rng.normal(size=HIDDEN)).astype(np.float32)
        w[p + "attn_q.weight"] = mat(HEADS * HEAD_DIM, HIDDEN)  # HF layout; permuted when written
        w[p + "attn_k.weight"] = mat(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "attn_v.weight"] = mat(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "attn_output.weight"] = mat(HIDDEN, HEADS * HEAD_DIM)
        w[p + "ffn_gate.weight"] = mat(FFN, HIDDEN)
        w[p + "ffn_up.weight"] = mat(FFN, HIDDEN)
        w[p + "ffn_down.weight"] = mat(HIDDEN, FFN)
    w["output_norm.weight"] = (1 + 0.1 * rng.normal(size=HIDDEN)).astype(np.float32)
    if untied:
        w["output.weight"] = mat(vocab, HIDDEN) * 4
    return w


def _store(w: np.ndarray, qtype: Q) -> np.ndarray:
    """What the file holds for ``w`` (F32 stays, others quantised)."""
    return w if qtype == Q.F32 else quantize(w, qtype)


def _write_gguf(
    path: Path, weights: dict[str, np.ndarray], qtype: Q, meta: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Write the GGUF; return the float32 weights the file effectively contains (HF layout)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(THETA)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    writer.add_add_bos_token(False)
    effective: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        if w.ndim == 1:  # norms stay F32, as llama.cpp keeps them
            writer.add_tensor(name, w)
            effective[name] = w
            continue
        stored = w
        if name.endswith("attn_q.weight"):
            stored = _permute(w, HEADS)
        elif name.endswith("attn_k.weight"):
            stored = _permute(w, KV_HEADS)
        data = _store(stored, qtype)
        if qtype == Q.F16:
            data = stored.astype(np.float16)
            writer.add_tensor(name, data)
        elif qtype == Q.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=qtype)
        # Row-wise quantisation commutes with the row permutation, so de-quantising the HF-layout
        # matrix gives exactly the weights the file encodes.
        if qtype == Q.F16:
            effective[name] = w.astype(np.float16).astype(np.float32)
        else:
            effective[name] = (
                dequantize(_store(w, qtype), qtype).reshape(w.shape).astype(np.float32)
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return effective


def _reference_logits(w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Plain float64 Llama forward (HF formulation: rotate-half rotary, causal softmax)."""
    f = {k: v.astype(np.float64) for k, v in w.items()}
    x = f["token_embd.weight"][ids]
    n = len(ids)
    inv = 1.0 / THETA ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    ang = np.outer(np.arange(n), inv)
    cos = np.concatenate([np.cos(ang)] * 2, axis=1)
    sin = np.concatenate([np.sin(ang)] * 2, axis=1)

    def norm(v: np.ndarray, g: np.ndarray) -> np.ndarray:
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + EPS) * g

    def rope(t: np.ndarray) -> np.ndarray:  # (n, heads, d)
        half = HEAD_DIM // 2
        rot = np.concatenate([-t[..., half:], t[..., :half]], axis=-1)
        return t * cos[:, None] + rot * sin[:, None]

    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(LAYERS):
        p = f"blk.{i}."
        h = norm(x, f[p + "attn_norm.weight"])
        q = rope((h @ f[p + "attn_q.weight"].T).reshape(n, HEADS, HEAD_DIM))
        k = rope((h @ f[p + "attn_k.weight"].T).reshape(n, KV_HEADS, HEAD_DIM))
        v = (h @ f[p + "attn_v.weight"].T).reshape(n, KV_HEADS, HEAD_DIM)
        out = np.empty((n, HEADS, HEAD_DIM))
        for hh in range(HEADS):
            kv = hh // (HEADS // KV_HEADS)
            s = q[:, hh] @ k[:, kv].T / np.sqrt(HEAD_DIM) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, hh] = (s / s.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + out.reshape(n, -1) @ f[p + "attn_output.weight"].T
        h = norm(x, f[p + "ffn_norm.weight"])
        g = h @ f[p + "ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ f[p + "ffn_up.weight"].T)) @ f[p + "ffn_down.weight"].T
    head = f.get("output.weight", f["token_embd.weight"])
    return norm(x, f["output_norm.weight"]) @ head.T


@pytest.fixture(scope="module")
def tokenizer_meta(engine: Any) -> dict[str, Any]:
    return engine.model.metadata


@pytest.fixture(scope="module")
def prompt(engine: Any) -> list[int]:
    return engine.encode(
        "Tiny models still need correct rotary embeddings and grouped attention, 123!"
    )


CASES = [
    (Q.F32, False, None),
    (Q.F16, False, 0.01),
    (Q.Q8_0, True, 0.03),
    (Q.Q4_0, False, 0.35),
    (Q.Q4_1, True, 0.35),
]


@pytest.mark.parametrize(
    ("qtype", "untied", "rel_err_vs_f32"), CASES, ids=[c[0].name for c in CASES]
)
def test_quantised_gguf_loads_and_matches_reference(
    engine: Any,
    tmp_path: Path,
    tokenizer_meta: dict[str, Any],
    prompt: list[int],
    qtype: Q,
    untied: bool,
    rel_err_vs_f32: float | None,
) -> None:
    vocab = len(tokenizer_meta["tokenizer.ggml.tokens"])
    weights = _random_weights(vocab, untied)
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    effective = _write_gguf(path, weights, qtype, tokenizer_meta)

    eng = NumpyEngine(path, kv_cache_tokens=512, max_model_len=256)
    eng.load()
    assert eng.config.num_layers == LAYERS and eng.config.num_kv_heads == KV_HEADS
    assert eng.config.tied_embeddings is (not untied)
    assert eng.model.tensor_types["blk.0.attn_q.weight"] == int(qtype)
    assert eng.encode("hello world, 123") == engine.encode("hello world, 123")
    ours = eng.prompt_logits(prompt)

    ref = _reference_logits(effective, prompt)
    np.testing.assert_allclose(ours, ref, atol=EXACT_ATOL, rtol=0)
    assert (ours.argmax(1) == ref.argmax(1)).all()

    if rel_err_vs_f32 is not None:  # quantisation noise is bounded relative to the F32 model
        full = _reference_logits(weights, prompt)
        rel = np.linalg.norm(ours - full) / np.linalg.norm(full)
        assert rel < rel_err_vs_f32, rel
