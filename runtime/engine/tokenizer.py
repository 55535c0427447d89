"""Tokenizer and chat template built from GGUF metadata.

This module owns text <-> token ids for the embedded engine. The tokenizer is assembled with the
``tokenizers`` library from ``tokenizer.ggml.*`` metadata (no hand-written BPE):

* ``gpt2`` vocabularies (byte-level BPE with explicit merges). ``tokenizer.ggml.pre`` selects the
  pre-tokenizer split, mirroring llama.cpp's table (``smollm``/``starcoder`` split digits
  individually, ``llama3`` groups up to three, ``default``/``gpt2`` use GPT-2's regex...).
* ``llama`` (SentencePiece) vocabularies, as a BPE model whose merges are recovered from the
  token scores, with SentencePiece's ``▁`` space handling and byte fallback.

Control tokens (``token_type == 3``, e.g. ``<|im_start|>``) are registered as special tokens so a
chat-formatted prompt encodes them as single ids. Chat templates are rendered with a sandboxed
jinja2 environment.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

__all__ = ["ChatTemplate", "GGUFTokenizer", "TokenizerError"]

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_BYTE = 6

# Pre-tokenizer regexes from llama.cpp's llama-vocab.cpp, keyed by `tokenizer.ggml.pre`.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Each entry: list of regexes applied in sequence (each isolates its matches), as llama.cpp does.
_PRE_SPLITS: dict[str, list[str]] = {
    "default": [_GPT2_RE],
    "gpt2": [_GPT2_RE],
    "gpt-2": [_GPT2_RE],
    "phi-2": [_GPT2_RE],
    "jina-es": [_GPT2_RE],
    "jina-de": [_GPT2_RE],
    "smollm": [r"\p{N}", _GPT2_RE],
    "starcoder": [r"\p{N}", _GPT2_RE],
    "refact": [r"\p{N}", _GPT2_RE],
    "codeshell": [r"\p{N}", _GPT2_RE],
    "llama3": [_LLAMA3_RE],
    "llama-v3": [_LLAMA3_RE],
    "llama-bpe": [_LLAMA3_RE],
    "smaug-bpe": [_LLAMA3_RE],
    "dbrx": [_LLAMA3_RE],
    "falcon3": [_LLAMA3_RE],
    "qwen2": [_QWEN2_RE],
    "deepseek-r1-qwen": [_QWEN2_RE],
}


class TokenizerError(ValueError):
    """The GGUF's tokenizer metadata is missing or of an unsupported kind."""


def _merges_from_scores(vocab: dict[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two known
    pieces, ranked by the merged piece's score (higher first), then by the parts' ids."""
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, piece_id in vocab.items():
        if len(piece) < 2:
            continue
        score = scores[piece_id]
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


class ChatTemplate:
    """A Hugging Face style chat template rendered in a sandboxed jinja2 environment."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ValueError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.source = source
        self._template = env.from_string(source)
        self._bos = bos_token
        self._eos = eos_token

    def render(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        for i, message in enumerate(messages):
            if "role" not in message or "content" not in message:
                raise ValueError(f"messages[{i}] needs 'role' and 'content'")
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self._bos,
            eos_token=self._eos,
            **extra,
        )


@dataclass(frozen=True)
class _SpecialIds:
    bos: int | None
    eos: int | None
    eot: int | None
    unk: int | None
    pad: int | None


class GGUFTokenizer:
    """Encode/decode with the vocabulary stored in a GGUF file's metadata."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        model_kind = metadata.get("tokenizer.ggml.model")
        tokens: list[str] | None = metadata.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("GGUF has no tokenizer.ggml.tokens")
        token_types: list[int] = list(
            metadata.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
        )
        self.pre: str = str(metadata.get("tokenizer.ggml.pre", "default"))
        self.model_kind = str(model_kind)
        if model_kind == "gpt2":
            self._tk = self._build_byte_level(tokens, metadata.get("tokenizer.ggml.merges") or [])
        elif model_kind == "llama":
            scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            self._tk = self._build_sentencepiece(tokens, token_types, scores, metadata)
        else:
            raise TokenizerError(
                f"unsupported tokenizer.ggml.model {model_kind!r} (supported: gpt2, llama)"
            )

        special = [
            AddedToken(tok, special=True, normalized=False)
            for tok, kind in zip(tokens, token_types, strict=True)
            if kind == TOKEN_TYPE_CONTROL and tok
        ]
        if special:
            self._tk.add_special_tokens(special)
        user = [
            AddedToken(tok, special=False, normalized=False)
            for tok, kind in zip(tokens, token_types, strict=True)
            if kind == TOKEN_TYPE_USER_DEFINED and tok
        ]
        if user:
            self._tk.add_tokens(user)

        def opt_id(key: str) -> int | None:
            value = metadata.get(key)
            return None if value is None else int(value)

        self.special = _SpecialIds(
            bos=opt_id("tokenizer.ggml.bos_token_id"),
            eos=opt_id("tokenizer.ggml.eos_token_id"),
            eot=opt_id("tokenizer.ggml.eot_token_id"),
            unk=opt_id("tokenizer.ggml.unknown_token_id"),
            pad=opt_id("tokenizer.ggml.padding_token_id"),
        )
        # llama.cpp's default: SentencePiece vocabularies add BOS unless told otherwise.
        self.add_bos: bool = bool(
            metadata.get("tokenizer.ggml.add_bos_token", model_kind == "llama")
        )
        self.add_eos: bool = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        self.vocab_size = len(tokens)
        self._tokens = tokens
        self._control_ids = frozenset(
            i for i, k in enumerate(token_types) if k == TOKEN_TYPE_CONTROL
        )

        template_src = metadata.get("tokenizer.chat_template")
        self.chat_template: ChatTemplate | None = None
        if template_src:
            self.chat_template = ChatTemplate(
                str(template_src),
                bos_token=self.id_to_token(self.special.bos)
                if self.special.bos is not None
                else "",
                eos_token=self.id_to_token(self.special.eos)
                if self.special.eos is not None
                else "",
            )

    # -- construction -------------------------------------------------------------------------

    def _build_byte_level(self, tokens: list[str], merges: list[str]) -> Tokenizer:
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = []
        for merge in merges:
            left, _, right = merge.partition(" ")
            pairs.append((left, right))
        tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        splits = _PRE_SPLITS.get(self.pre, _PRE_SPLITS["default"])
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tk.decoder = decoders.ByteLevel()
        return tk

    def _build_sentencepiece(
        self,
        tokens: list[str],
        token_types: list[int],
        scores: Sequence[float],
        metadata: dict[str, Any],
    ) -> Tokenizer:
        vocab = {tok: i for i, tok in enumerate(tokens)}
        unk_id = metadata.get("tokenizer.ggml.unknown_token_id", 0)
        byte_fallback = any(k == TOKEN_TYPE_BYTE for k in token_types)
        merges = _merges_from_scores(
            {
                t: i
                for t, i in vocab.items()
                if token_types[i] in (TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED)
            },
            scores,
        )
        tk = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=merges,
                unk_token=tokens[int(unk_id)],
                fuse_unk=True,
                byte_fallback=byte_fallback,
            )
        )
        add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        norm = [normalizers.Replace(" ", "▁")]
        if add_prefix:
            norm.insert(0, normalizers.Prepend("▁"))
        tk.normalizer = normalizers.Sequence(norm)
        decs = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            decs.append(decoders.Strip(content=" ", left=1, right=0))
        tk.decoder = decoders.Sequence(decs)
        return tk

    # -- public API ---------------------------------------------------------------------------

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS and, if the file names one, end-of-turn."""
        return frozenset(i for i in (self.special.eos, self.special.eot) if i is not None)

    @property
    def bos_token_id(self) -> int | None:
        return self.special.bos

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[token_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``. Special-token text (``<|im_start|>``) maps to its id.

        With ``add_special_tokens`` BOS/EOS are added only if the GGUF asks for them
        (``tokenizer.ggml.add_bos_token`` / ``add_eos_token``).
        """
        ids: list[int] = self._tk.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if (
                self.add_bos
                and self.special.bos is not None
                and (not ids or ids[0] != self.special.bos)
            ):
                ids.insert(0, self.special.bos)
            if self.add_eos and self.special.eos is not None:
                ids.append(self.special.eos)
        return ids

    def encode_batch(
        self, texts: Iterable[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for ``token_ids``; incomplete UTF-8 sequences decode to U+FFFD."""
        return self._tk.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render ``messages`` with the GGUF's chat template (a ChatML fallback if it has none)."""
        template = self.chat_template
        if template is None:
            template = ChatTemplate(_CHATML_FALLBACK)
        return template.render(messages, add_generation_prompt=add_generation_prompt)


_CHATML_FALLBACK = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
