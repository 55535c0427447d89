"""Loading a Llama-architecture GGUF file: hyper-parameters, tokenizer metadata and weights.

This module owns the translation from llama.cpp's on-disk layout to the layout the numpy engine
computes with. It reads with :class:`gguf.GGUFReader` and dequantises with
:func:`gguf.quants.dequantize` (any type the ``gguf`` package supports: F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_x, K-quants...). What it adds on top:

* ggml lists tensor dimensions fastest-first; numpy wants them slowest-first, so every tensor is
  reshaped to ``reversed(tensor.shape)``, giving PyTorch's ``(out_features, in_features)``.
* llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` so that rotary embeddings can
  rotate *adjacent* pairs (GPT-J / "normal" layout). We undo that permutation so each head is laid
  out as ``[first half | second half]`` and the engine can use the cheaper rotate-half (NeoX/HF)
  formulation on contiguous slices.
* Weights are stored transposed and contiguous for ``x @ W``; Q/K/V and gate/up are fused into one
  matrix each, and the RMSNorm gains preceding them are folded into their rows
  (``(x * r * g) @ W == (x * r) @ (g[:, None] * W)``), which removes two passes per layer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize

__all__ = [
    "GGUFModel",
    "LayerWeights",
    "LlamaConfig",
    "LlamaWeights",
    "load_gguf",
    "read_file_metadata",
    "read_metadata",
]

SUPPORTED_ARCHITECTURES = ("llama",)


class _FastGGUFReader(gguf.GGUFReader):
    """``GGUFReader`` that parses the header through a plain ndarray view of its memmap.

    The stock reader slices an ``np.memmap`` once per metadata item; every slice runs the memmap
    subclass' ``__array_finalize__``, which makes a 49k-token vocabulary take ~9 s to parse. A base
    ``ndarray`` view of the same mapping behaves identically (the mapping stays alive through
    ``.base``) and parses in ~1 s. Only the storage type changes; all parsing is the package's.
    """

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = value.view(np.ndarray)


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-architecture model, read from GGUF metadata."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int
    tied_embeddings: bool
    rope_scaling_factor: float = 1.0  # linear position scaling ("rope.scaling.type" == linear)
    file_type: str = ""

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, kv_dtype: str = "float32") -> int:
        """Bytes of K+V cache one token occupies across all layers in a ``kv_dtype`` pool."""
        from runtime.engine.kv_cache import kv_bytes_per_token

        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, kv_dtype)


@dataclass
class LayerWeights:
    """One transformer block, transposed for ``x @ W`` with norm gains folded in."""

    wqkv: np.ndarray  # (hidden, q_dim + 2 * kv_dim); attn_norm folded into rows
    bqkv: np.ndarray | None  # (q_dim + 2 * kv_dim,) or None
    wo: np.ndarray  # (q_dim, hidden)
    bo: np.ndarray | None
    wgu: np.ndarray  # (hidden, 2 * intermediate); ffn_norm folded into rows; [gate | up]
    wd: np.ndarray  # (intermediate, hidden)


@dataclass
class LlamaWeights:
    """All weights as contiguous float32 arrays."""

    head_t: np.ndarray  # (hidden, vocab): output projection, transposed for ``x @ head_t``
    embedding: np.ndarray | None  # (vocab, hidden) when not tied; tied models embed from head_t
    final_norm: np.ndarray  # (hidden,)
    layers: list[LayerWeights]
    inv_freq: np.ndarray  # (head_dim // 2,) rotary inverse frequencies (float64)

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """Embedding rows for ``token_ids`` as a fresh (n, hidden) float32 array."""
        if self.embedding is not None:
            return self.embedding[token_ids]
        return np.ascontiguousarray(self.head_t[:, token_ids].T)

    def nbytes(self) -> int:
        total = self.head_t.nbytes + self.final_norm.nbytes
        if self.embedding is not None:
            total += self.embedding.nbytes
        for layer in self.layers:
            total += layer.wqkv.nbytes + layer.wo.nbytes + layer.wgu.nbytes + layer.wd.nbytes
        return total


@dataclass
class GGUFModel:
    """A loaded GGUF: config, weights, and the raw metadata (incl. tokenizer fields)."""

    path: Path
    config: LlamaConfig
    weights: LlamaWeights
    metadata: dict[str, Any]
    load_seconds: float = 0.0
    tensor_types: dict[str, int] = field(default_factory=dict)


def _field_value(reader_field: Any) -> Any:
    value = reader_field.contents()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All key/value metadata of a reader as plain Python values (strings, numbers, lists)."""
    return {
        name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")
    }


def read_file_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of the GGUF at ``path`` (tokenizer, chat template, hyper-parameters) without
    dequantising any tensor: what a process that only tokenises needs."""
    return read_metadata(_FastGGUFReader(Path(path)))


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's ``permute(w, n_head)`` on the output rows of a Q or K weight (or bias).

    The converter maps HF row ``h*d + s*d/2 + i`` (half s, index i) to GGUF row ``h*d + 2*i + s``.
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    head_dim = rows // n_head
    return w.reshape(n_head, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def _config_from_metadata(
    meta: dict[str, Any], tensor_names: set[str], vocab_rows: int
) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {SUPPORTED_ARCHITECTURES}"
        )

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks required key {arch}.{name}")
        return value

    hidden = int(key("embedding_length"))
    n_heads = int(key("attention.head_count"))
    n_kv = int(key("attention.head_count_kv", n_heads))
    head_dim = int(key("attention.key_length", hidden // n_heads))
    rope_dim = int(key("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(
            f"partial rotary (rope dim {rope_dim} != head dim {head_dim}) is not supported"
        )
    if n_heads % n_kv:
        raise ValueError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    scaling = 1.0
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = float(meta.get(f"{arch}.rope.scaling.factor", 1.0))
    return LlamaConfig(
        name=str(meta.get("general.name", "")),
        vocab_size=int(meta.get(f"{arch}.vocab_size", vocab_rows)),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(key("context_length", 2048)),
        tied_embeddings="output.weight" not in tensor_names,
        rope_scaling_factor=scaling,
        file_type=str(meta.get("general.file_type", "")),
    )


def load_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Read ``path`` and return config, float32 weights and metadata.

    Raises ``ValueError`` for files that are not Llama-architecture or lack required tensors.
    """
    start = time.perf_counter()
    path = Path(path)
    reader = _FastGGUFReader(path)
    meta = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}

    def load(name: str) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"GGUF file {path.name} lacks tensor {name!r}")
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out = np.asarray(arr, dtype=np.float32).reshape(shape)
        if np.may_share_memory(out, t.data):
            # F32 tensors come back as views of the file mapping; copy so it can be unmapped.
            out = out.copy()
        return out

    def maybe(name: str) -> np.ndarray | None:
        return load(name) if name in tensors else None

    embd = load("token_embd.weight")
    cfg = _config_from_metadata(meta, set(tensors), embd.shape[0])
    if embd.shape != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"token_embd shape {embd.shape} does not match config {cfg}")

    layers: list[LayerWeights] = []
    for i in range(cfg.num_layers):
        p = f"blk.{i}."
        attn_norm = load(p + "attn_norm.weight")
        ffn_norm = load(p + "ffn_norm.weight")
        wq = _unpermute_rope_rows(load(p + "attn_q.weight"), cfg.num_heads)
        wk = _unpermute_rope_rows(load(p + "attn_k.weight"), cfg.num_kv_heads)
        wv = load(p + "attn_v.weight")
        wqkv = np.concatenate([wq, wk, wv], axis=0).T * attn_norm[:, None]
        biases = [maybe(p + f"attn_{n}.bias") for n in ("q", "k", "v")]
        bqkv = None
        if any(b is not None for b in biases):
            bq = biases[0] if biases[0] is not None else np.zeros(cfg.q_dim, np.float32)
            bk = biases[1] if biases[1] is not None else np.zeros(cfg.kv_dim, np.float32)
            bv = biases[2] if biases[2] is not None else np.zeros(cfg.kv_dim, np.float32)
            bqkv = np.concatenate(
                [
                    _unpermute_rope_rows(bq, cfg.num_heads),
                    _unpermute_rope_rows(bk, cfg.num_kv_heads),
                    bv,
                ]
            ).astype(np.float32)
        gate = load(p + "ffn_gate.weight")
        up = load(p + "ffn_up.weight")
        wgu = np.concatenate([gate, up], axis=0).T * ffn_norm[:, None]
        layers.append(
            LayerWeights(
                wqkv=np.ascontiguousarray(wqkv, dtype=np.float32),
                bqkv=bqkv,
                wo=np.ascontiguousarray(load(p + "attn_output.weight").T),
                bo=maybe(p + "attn_output.bias"),
                wgu=np.ascontiguousarray(wgu, dtype=np.float32),
                wd=np.ascontiguousarray(load(p + "ffn_down.weight").T),
            )
        )

    output = maybe("output.weight")
    if output is None:
        head_t = np.ascontiguousarray(embd.T)
        embedding = None
    else:
        head_t = np.ascontiguousarray(output.T)
        embedding = np.ascontiguousarray(embd)
    del embd

    inv_freq = 1.0 / (
        cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    )
    rope_freqs = maybe("rope_freqs.weight")  # Llama 3.1-style per-frequency divisors
    if rope_freqs is not None:
        inv_freq = inv_freq / rope_freqs.astype(np.float64)

    weights = LlamaWeights(
        head_t=head_t,
        embedding=embedding,
        final_norm=np.ascontiguousarray(load("output_norm.weight")),
        layers=layers,
        inv_freq=inv_freq,
    )
    types = {name: int(t.tensor_type) for name, t in tensors.items()}
    return GGUFModel(
        path=path,
        config=cfg,
        weights=weights,
        metadata=meta,
        load_seconds=time.perf_counter() - start,
        tensor_types=types,
    )
