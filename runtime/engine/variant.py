"""Re-encoding a GGUF model's weights into another tensor type (``fleetform variant``).

This module owns the conversion of one GGUF file into a *variant*: the same model, metadata and
tensors, with the weights stored as Q8_0, F16 or Q4_0. Each tensor is de-quantised with
:func:`gguf.quants.dequantize`, re-encoded with :func:`gguf.quants.quantize` (Q8_0, Q4_0) or a
numpy ``float16`` cast (F16), and streamed out one tensor at a time with :class:`gguf.GGUFWriter`,
so memory stays at about one tensor however large the model is.

Which type each tensor gets (the rule, as in llama.cpp's ``quantize``/``convert_hf_to_gguf``):

* A float tensor with at least 2 dimensions whose row length (ggml ``ne[0]``, numpy's last axis) is
  a multiple of the target's block size (32 for Q8_0/Q4_0, 1 for F16) is stored in the target type.
  If the source already holds it in the target type, its bytes are copied unchanged (lossless, as
  llama.cpp does) instead of being re-quantised.
* Every other float tensor is stored as F32: 1-D tensors (RMSNorm gains, biases, ``rope_freqs``),
  which are tiny and precision-sensitive, and matrices whose rows do not divide into blocks.
* Integer tensors (I8..I64) and F64 are copied unchanged.

Unlike llama.cpp we apply no per-tensor mixed precision (llama.cpp would store ``output.weight``,
or a tied ``token_embd.weight``, as Q6_K in a Q4_0 file; ``gguf`` has no Q6_K quantiser).

Metadata is copied key by key with its original value type and order; only ``general.file_type``
changes (to ``MOSTLY_Q8_0``/``MOSTLY_F16``/``MOSTLY_Q4_0``). Tensor names, order and shapes are
unchanged. The file is written next to the output and renamed into place, so a failed conversion
never leaves a truncated GGUF behind.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType
from gguf.quants import dequantize, quantize

# The project's reader subclass parses a 49k-token vocabulary ~9x faster than the stock one.
from runtime.engine.gguf_model import _FastGGUFReader

__all__ = [
    "BUILTIN_MODEL",
    "TARGETS",
    "VariantError",
    "VariantResult",
    "convert_variant",
    "resolve_source",
    "target_tensor_type",
]

#: ``MODEL`` argument that names the shipped SmolLM2 GGUF.
BUILTIN_MODEL = "builtin"

#: ``--to`` name -> the tensor type weights get and the ``general.file_type`` the file declares.
TARGETS: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}

_VERBATIM_TYPES = frozenset(
    {
        GGMLQuantizationType.I8,
        GGMLQuantizationType.I16,
        GGMLQuantizationType.I32,
        GGMLQuantizationType.I64,
        GGMLQuantizationType.F64,
    }
)
_GGUF_MAGIC = b"GGUF"


class VariantError(ValueError):
    """A problem the user can fix (bad path, not a GGUF, unsupported type). One line of text."""


@dataclass(frozen=True)
class VariantResult:
    """What a conversion did: counts, sizes and time."""

    source: Path
    output: Path
    target: str
    file_type: int
    converted: int  # tensors re-encoded into the target type
    unchanged: int  # tensors the source already held in the target type (bytes copied)
    kept: int  # tensors stored in another type (F32 by the rule, or integer tensors as they were)
    bytes_before: int
    bytes_after: int
    seconds: float
    tensor_types: dict[str, str] = field(default_factory=dict)  # name -> output type name

    def as_json(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "output": str(self.output),
            "to": self.target,
            "file_type": self.file_type,
            "tensors": {
                "converted": self.converted,
                "unchanged": self.unchanged,
                "kept": self.kept,
            },
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        mib = 1024 * 1024
        return (
            f"{self.target} variant {self.output}: {self.converted} tensors converted, "
            f"{self.unchanged} already {self.target}, {self.kept} kept "
            f"(norms and unblockable shapes stay F32); "
            f"{self.bytes_before / mib:.1f} MiB -> {self.bytes_after / mib:.1f} MiB "
            f"in {self.seconds:.1f} s"
        )


def resolve_source(model: str | os.PathLike[str]) -> Path:
    """``model`` as a path; ``"builtin"`` means the shipped SmolLM2 GGUF."""
    if str(model) == BUILTIN_MODEL:
        from runtime.engine.model_files import ModelNotFoundError, default_model_path

        try:
            return default_model_path()
        except ModelNotFoundError as exc:
            raise VariantError(str(exc)) from exc
    return Path(model).expanduser()


def target_tensor_type(
    source_type: GGMLQuantizationType, shape: tuple[int, ...], target: GGMLQuantizationType
) -> GGMLQuantizationType:
    """The type a tensor of ``shape`` (numpy order) is stored in for ``target`` (see the rule)."""
    if source_type in _VERBATIM_TYPES:
        return source_type
    block_size, _ = gguf.GGML_QUANT_SIZES[target]
    if len(shape) >= 2 and shape[-1] % block_size == 0:
        return target
    return GGMLQuantizationType.F32


def _nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block_size * type_size


def _check_paths(source: Path, output: Path, force: bool) -> None:
    if not source.exists():
        raise VariantError(f"model file {str(source)!r} does not exist")
    if not source.is_file():
        raise VariantError(f"model {str(source)!r} is not a file")
    try:
        with source.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise VariantError(f"cannot read {str(source)!r}: {exc.strerror or exc}") from exc
    if magic != _GGUF_MAGIC:
        raise VariantError(f"{str(source)!r} is not a GGUF file (no GGUF magic)")
    if output.is_dir():
        raise VariantError(f"output {str(output)!r} is a directory")
    if output.exists():
        if output.resolve() == source.resolve():
            raise VariantError(f"output {str(output)!r} is the source model; choose another path")
        if not force:
            raise VariantError(f"output {str(output)!r} exists; pass --force to overwrite it")
    parent = output.parent
    if not parent.exists():
        raise VariantError(f"output directory {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise VariantError(f"output parent {str(parent)!r} is not a directory")
    # We write a temporary file in this directory and rename it, so the directory must be writable.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VariantError(f"output directory {str(parent)!r} is not writable")


def _open_reader(source: Path) -> gguf.GGUFReader:
    try:
        reader = _FastGGUFReader(source)
    except (ValueError, IndexError, KeyError, OSError) as exc:
        # The magic matched, so this is a truncated or corrupt file (or an unknown GGUF version).
        raise VariantError(f"{str(source)!r} is not a readable GGUF file: {exc}") from exc
    if reader.byte_order == "S":
        # Quantised blocks of a byte-swapped file would need per-type swapping; rare, refuse it.
        raise VariantError(f"{str(source)!r} is a byte-swapped (big-endian) GGUF; not supported")
    return reader


def _copy_metadata(
    reader: gguf.GGUFReader, writer: gguf.GGUFWriter, file_type: LlamaFileType
) -> None:
    """Every key with its original type and in its original order; ``general.file_type`` set."""
    seen_file_type = False
    for name, f in reader.fields.items():
        # GGUF.* are the header's own counts; the writer adds general.architecture itself.
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = f.types[0]
        sub_type = f.types[-1] if vtype == GGUFValueType.ARRAY and len(f.types) > 1 else None
        value = f.contents()
        if name == gguf.Keys.General.FILE_TYPE:
            value, seen_file_type = int(file_type), True
        elif name == gguf.Keys.General.ALIGNMENT:
            # Tensor data offsets must honour the source's declared alignment.
            writer.data_alignment = int(value)
        if vtype == GGUFValueType.ARRAY and not value:
            continue  # GGUFWriter refuses to write an empty array, so such a key is dropped
        writer.add_key_value(name, value, vtype, sub_type=sub_type)
    if not seen_file_type:
        writer.add_key_value(gguf.Keys.General.FILE_TYPE, int(file_type), GGUFValueType.UINT32)


def _encode(name: str, values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """``values`` (float32, numpy order) stored as ``qtype``: an F32/F16 array or quant blocks."""
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        out = values.astype(np.float16)
        # A silent inf would corrupt the model; such weights need a wider type.
        if not np.isfinite(out).all() and np.isfinite(values).all():
            raise VariantError(f"tensor {name!r} has values beyond the F16 range; use q8_0")
        return out
    return quantize(values, qtype)


def convert_variant(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    to: str,
    *,
    force: bool = False,
) -> VariantResult:
    """Write ``output``: the GGUF ``source`` with its weights re-encoded as ``to``.

    ``to`` is ``q8_0``, ``f16`` or ``q4_0`` (case-insensitive); ``source`` may be ``"builtin"``.
    An existing ``output`` is replaced only with ``force``. Raises :class:`VariantError` for
    anything the user can fix.
    """
    start = time.perf_counter()
    target_name = str(to).strip().lower()
    if target_name not in TARGETS:
        raise VariantError(f"--to: unsupported type {to!r}; choose one of {', '.join(TARGETS)}")
    target, file_type = TARGETS[target_name]
    src = resolve_source(source)
    out = Path(output).expanduser()
    _check_paths(src, out, force)

    reader = _open_reader(src)
    arch = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch is None:
        raise VariantError(f"{str(src)!r} lacks general.architecture")

    # Plan every tensor first: GGUF's tensor-info table precedes the data.
    plan: list[tuple[Any, tuple[int, ...], GGMLQuantizationType]] = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml order -> numpy order
        plan.append((t, shape, target_tensor_type(t.tensor_type, shape, target)))

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, str(arch.contents()))
    converted = unchanged = kept = 0
    types: dict[str, str] = {}
    try:
        _copy_metadata(reader, writer, file_type)
        for t, shape, qtype in plan:
            # The dtype argument only matters without raw_dtype or for byte shapes (uint8); we
            # always pass the element shape and the raw type.
            writer.add_tensor_info(
                t.name, shape, np.dtype(np.float32), _nbytes(shape, qtype), qtype
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, shape, qtype in plan:
            if qtype == t.tensor_type:
                data = t.data  # same type: copy the bytes, no re-quantisation loss
                if qtype == target:
                    unchanged += 1
                else:
                    kept += 1
            else:
                try:
                    values = dequantize(t.data, t.tensor_type).reshape(shape)
                except NotImplementedError as exc:
                    raise VariantError(
                        f"tensor {t.name!r}: cannot read {t.tensor_type.name} ({exc})"
                    ) from exc
                data = _encode(t.name, values, qtype)
                if qtype == target:
                    converted += 1
                else:
                    kept += 1
            writer.write_tensor_data(data)
            types[t.name] = qtype.name
        writer.close()
        os.replace(tmp, out)
    except OSError as exc:
        raise VariantError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from exc
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)

    return VariantResult(
        source=src,
        output=out,
        target=target_name,
        file_type=int(file_type),
        converted=converted,
        unchanged=unchanged,
        kept=kept,
        bytes_before=src.stat().st_size,
        bytes_after=out.stat().st_size,
        seconds=time.perf_counter() - start,
        tensor_types=types,
    )
