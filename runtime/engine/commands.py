"""CLI entry functions for the embedded engine (wired into ``fleetform`` by runtime.cli).

This module owns argument definitions and user-facing output of ``fleetform generate``,
``fleetform bench engine`` and ``fleetform variant``. Errors a user can fix (missing model, bad
arguments) print one line on stderr and return exit code 2, without a traceback. Heavy imports
happen inside the functions so ``fleetform --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from runtime.cli_errors import usage_error

__all__ = [
    "bench_engine_main",
    "configure_bench_engine_parser",
    "configure_generate_parser",
    "configure_variant_parser",
    "generate_main",
    "variant_main",
]


def configure_generate_parser(p: argparse.ArgumentParser) -> None:
    """Arguments of ``fleetform generate "PROMPT"``."""
    p.add_argument("prompt", help="prompt text (used raw unless --chat)")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat template"
    )
    p.add_argument(
        "--max-tokens", type=int, default=128, help="maximum tokens to generate (default 128)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 = greedy, deterministic (default 0)",
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)"
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="sample among the k most likely tokens (default 0 = off)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)"
    )
    p.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens"
    )
    p.add_argument(
        "--model-path", default=None, help="Llama-architecture GGUF file (default: SmolLM2-135M)"
    )
    p.add_argument("--json", action="store_true", help="print a JSON object instead of plain text")


def generate_main(args: argparse.Namespace) -> int:
    """Run one completion and print it. Returns the process exit code."""
    from runtime.engine.base import SamplingParams
    from runtime.engine.model_files import ModelNotFoundError, resolve_model_path

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop),
            ignore_eos=args.ignore_eos,
        )
        model_path = resolve_model_path(args.model_path)
    except (ValueError, ModelNotFoundError) as exc:
        return usage_error("generate", exc)

    from runtime.engine.core import EngineCore
    from runtime.engine.numpy_engine import NumpyEngine

    try:
        engine = NumpyEngine(model_path, kv_cache_tokens=8192)
        core = EngineCore(engine, max_num_seqs=1)
        stream_text = not args.json and sys.stdout.isatty()
        last = None
        pieces: list[str] = []
        token_ids: list[int] = []
        for out in core.stream(args.prompt, params, chat=args.chat):
            pieces.append(out.new_text)
            token_ids.extend(out.new_token_ids)
            if stream_text and out.new_text:
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
            last = out
    except (ValueError, ModelNotFoundError, OSError) as exc:
        return usage_error("generate", exc)
    except KeyboardInterrupt:
        return 130
    assert last is not None
    result: dict[str, Any] = {
        "text": "".join(pieces),
        "token_ids": token_ids,
        "prompt_tokens": last.num_prompt_tokens,
        "finish_reason": last.finish_reason,
    }
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    elif stream_text:
        sys.stdout.write("\n")
    else:
        print(result["text"])
    return 0


def configure_bench_engine_parser(p: argparse.ArgumentParser) -> None:
    """Arguments of ``fleetform bench engine``."""
    from runtime.engine.bench import configure_parser

    configure_parser(p)


def bench_engine_main(args: argparse.Namespace) -> int:
    """Run the engine benchmark. Returns the process exit code."""
    from runtime.engine.bench import run_from_args

    return run_from_args(args)


def configure_variant_parser(p: argparse.ArgumentParser) -> None:
    """Arguments of ``fleetform variant MODEL --to TYPE -o OUT``."""
    p.add_argument("model", metavar="MODEL", help="source GGUF file, or 'builtin' (SmolLM2-135M)")
    # Validated by variant_main rather than argparse `choices`, so a wrong value is one stderr line.
    p.add_argument(
        "--to", required=True, metavar="TYPE", help="weight type of the variant: q8_0, f16 or q4_0"
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="GGUF file to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a summary")


def variant_main(args: argparse.Namespace) -> int:
    """Write a re-encoded copy of a GGUF model and print what changed. Returns the exit code."""
    from runtime.engine.variant import VariantError, convert_variant

    try:
        result = convert_variant(args.model, args.output, args.to, force=args.force)
    except VariantError as exc:
        return usage_error("variant", exc)
    except KeyboardInterrupt:  # the partial file is removed by convert_variant
        return 130
    print(json.dumps(result.as_json()) if args.json else result.summary())
    return 0
