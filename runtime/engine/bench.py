"""``fleetform bench engine``: throughput and latency of the embedded engine.

This module owns the benchmark workload and its report. Prompt and output lengths are sampled
(seeded) from the Azure LLM inference conversation trace and scaled down to fit the model context
(``prompt = ContextTokens / prompt_scale``, ``output = GeneratedTokens / output_scale``, clamped so
prompt + output <= ``max_model_len``). Prompts are windows of real English text tokens; requests use
``ignore_eos`` so each produces exactly its sampled output length.

Measured:

* for each concurrency level (closed loop: N streams, a new request enters when one finishes):
  aggregate output tokens/s, TTFT p50/p99, inter-token latency p50/p99, peak RSS;
* decode-only throughput per concurrency level (all streams decoding, no prefill in the window),
  comparable with per-step targets;
* the 16-stream workload run three ways, back to back: one request at a time, static batching
  (a batch of 16 starts only when the previous batch has completely finished), continuous
  batching;
* model load time.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cli_errors import usage_error
from runtime.costmodel import CpuAssumption
from runtime.engine.base import SamplingParams, SeqInput, StepInput
from runtime.engine.core import CompletionOutput, EngineCore
from runtime.engine.model_files import ModelNotFoundError, resolve_model_path
from runtime.engine.numpy_engine import KV_DTYPES, NumpyEngine

__all__ = ["BenchConfig", "build_workload", "configure_parser", "run_bench", "run_from_args"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "data" / "AzureLLMInferenceTrace_conv.csv"

# Requests per concurrency level by default: enough to fill the level a few times over while
# keeping the whole default run within ~5 minutes on a 2-core machine.
DEFAULT_REQUESTS = {1: 4, 4: 12, 16: 32, 64: 64}

_CORPUS = """\
The history of computing is a story of people trying to make machines do arithmetic faster than
they could by hand. Early mechanical calculators used gears and levers; later, relays and vacuum
tubes replaced them, and finally the transistor made it possible to put millions of switches on a
single chip. Each step made computers smaller, cheaper and more reliable, and each step changed what
people believed a computer was for.
In the beginning, computers were used mostly by governments and large companies to calculate
artillery tables, census statistics and payrolls. Programming them meant rewiring panels or punching
holes in cards, and a single mistake could cost a day of work. When high-level languages appeared,
programmers could finally describe what they wanted in something closer to ordinary mathematics, and
compilers translated those descriptions into the instructions the machine understood.
Networks came next. Universities connected their machines so researchers could share data and send
messages, and those small networks grew into the internet. Today a person can look up the weather,
read a newspaper from another continent, or talk to a friend on the other side of the planet in the
time it takes to make a cup of tea. The same networks carry financial transactions, medical records
and the software updates that keep all of it running.
Language models are one of the newest chapters of this story. They read enormous amounts of text and
learn to predict which word is likely to come next. That simple objective turns out to be enough to
answer questions, summarise documents, translate between languages and write small programs. Running
such models efficiently is an engineering problem of its own: the weights must be read from memory
for every token, so serving many requests together, in batches, is what makes them affordable.
A good scheduler keeps the hardware busy without making anyone wait too long. It admits new requests
as soon as there is room, lets finished ones leave immediately, and splits long prompts into pieces
so that they do not stall everyone else. When memory runs short it pauses the least important work
and resumes it later, and it never forgets a request that was accepted.
"""


@dataclass(frozen=True)
class BenchConfig:
    streams: tuple[int, ...] = (1, 4, 16, 64)
    requests: int | None = None  # per level; None = DEFAULT_REQUESTS
    trace: Path = DEFAULT_TRACE
    model_path: str | None = None
    seed: int = 0
    prompt_scale: float = 8.0
    output_scale: float = 4.0
    max_model_len: int = 2048
    max_num_batched_tokens: int = 256
    kv_cache_tokens: int = 16384
    modes: bool = True
    decode_only: bool = True
    decode_steps: int = 16
    kv_dtype: str = "float32"


@dataclass
class RunResult:
    name: str
    streams: int
    requests: int
    prompt_tokens: int
    output_tokens: int
    wall_s: float
    output_tok_s: float
    total_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    peak_rss_mb: float
    preemptions: int


# -- workload ------------------------------------------------------------------------------------


def load_trace(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(context_tokens, generated_tokens)`` columns of an Azure LLM inference trace CSV."""
    ctx: list[int] = []
    gen: list[int] = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            ctx.append(int(row["ContextTokens"]))
            gen.append(int(row["GeneratedTokens"]))
    if not ctx:
        raise ValueError(f"trace: {path} has no rows")
    return np.asarray(ctx), np.asarray(gen)


def build_workload(
    trace: tuple[np.ndarray, np.ndarray],
    n: int,
    seed: int,
    prompt_scale: float,
    output_scale: float,
    max_model_len: int,
) -> list[tuple[int, int]]:
    """``n`` (prompt_len, output_len) pairs sampled with ``seed`` and scaled to the context."""
    ctx, gen = trace
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ctx), size=n)
    out: list[tuple[int, int]] = []
    for i in idx:
        o = int(np.clip(round(gen[i] / output_scale), 1, max_model_len // 4))
        p = int(np.clip(round(ctx[i] / prompt_scale), 4, max_model_len - o - 1))
        out.append((p, o))
    return out


def corpus_tokens(core: EngineCore) -> list[int]:
    ids = core.engine.encode(_CORPUS, add_special_tokens=False)
    return ids


def make_prompts(corpus: list[int], lengths: Sequence[int], seed: int) -> list[list[int]]:
    """Windows of the corpus (tiled as needed) at seeded random offsets."""
    rng = np.random.default_rng(seed + 1)
    prompts = []
    for n in lengths:
        start = int(rng.integers(0, len(corpus)))
        reps = (start + n) // len(corpus) + 1
        tiled = corpus * reps
        prompts.append(tiled[start : start + n])
    return prompts


# -- measurement ----------------------------------------------------------------------------------


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS, giving per-run peaks.
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def blas_info() -> dict[str, Any]:
    """BLAS vendor, core type and thread count as numpy's bundled OpenBLAS reports them."""
    info: dict[str, Any] = {"numpy": np.__version__}
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        info["blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:
        info["blas"] = "unknown"
    try:
        with open("/proc/self/maps") as fh:
            libs = {line.split()[-1] for line in fh if "openblas" in line}
        for lib_path in libs:
            lib = ctypes.CDLL(lib_path)
            for prefix in ("scipy_openblas_", "openblas_"):
                for suffix in ("64_", ""):
                    fn = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                    if fn is not None:
                        info["blas_threads"] = int(fn())
                        core = getattr(lib, f"{prefix}get_corename{suffix}", None)
                        if core is not None:
                            core.restype = ctypes.c_char_p
                            info["blas_core"] = core().decode()
                        return info
    except OSError:
        pass
    return info


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if len(values) else float("nan")


def _summarise(
    name: str, streams: int, results: list[CompletionOutput], wall: float, preemptions: int
) -> RunResult:
    out_tokens = sum(len(r.token_ids) for r in results)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in results)
    ttfts = [r.ttft for r in results if r.ttft is not None]
    itls = [x for r in results for x in r.inter_token_latencies]
    return RunResult(
        name=name,
        streams=streams,
        requests=len(results),
        prompt_tokens=prompt_tokens,
        output_tokens=out_tokens,
        wall_s=round(wall, 3),
        output_tok_s=round(out_tokens / wall, 2),
        total_tok_s=round((out_tokens + prompt_tokens) / wall, 2),
        ttft_p50_ms=round(_pct(ttfts, 50), 1),
        ttft_p99_ms=round(_pct(ttfts, 99), 1),
        itl_p50_ms=round(_pct(itls, 50), 1),
        itl_p99_ms=round(_pct(itls, 99), 1),
        peak_rss_mb=round(_peak_rss_mb(), 1),
        preemptions=preemptions,
    )


def run_closed_loop(
    core: EngineCore, prompts: list[list[int]], outputs: list[int], concurrency: int, name: str
) -> RunResult:
    """Keep ``concurrency`` requests in flight until all are done."""
    pending = deque(zip(prompts, outputs, strict=True))
    in_flight: set[str] = set()
    results: list[CompletionOutput] = []
    pre0 = core.scheduler.num_preemptions
    _reset_peak_rss()
    start = time.perf_counter()
    while pending or in_flight:
        while pending and len(in_flight) < concurrency:
            prompt, n_out = pending.popleft()
            params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
            in_flight.add(core.add_request(prompt, params))
        for out in core.step():
            if out.finished:
                in_flight.discard(out.request_id)
                res = core.pop_result(out.request_id)
                assert res is not None
                results.append(res)
    wall = time.perf_counter() - start
    return _summarise(name, concurrency, results, wall, core.scheduler.num_preemptions - pre0)


def run_static(
    core: EngineCore, prompts: list[list[int]], outputs: list[int], batch: int
) -> RunResult:
    """Static batching: submit ``batch`` requests, wait until *all* finish, then the next batch."""
    results: list[CompletionOutput] = []
    pre0 = core.scheduler.num_preemptions
    _reset_peak_rss()
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids = [
            core.add_request(p, SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True))
            for p, o in zip(prompts[i : i + batch], outputs[i : i + batch], strict=True)
        ]
        core.run_until_done()
        for rid in ids:
            res = core.pop_result(rid)
            assert res is not None
            results.append(res)
    wall = time.perf_counter() - start
    return _summarise("static", batch, results, wall, core.scheduler.num_preemptions - pre0)


def run_decode_only(
    engine: NumpyEngine, streams: int, context: int, steps: int
) -> dict[str, float]:
    """Decode throughput with ``streams`` sequences of ~``context`` tokens, prefill excluded."""
    params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    ids = [f"__decode_{i}" for i in range(streams)]
    tokens = list(range(1000, 1000 + context))
    try:
        for sid in ids:
            if not engine.kv.reserve(sid, context + steps + 1):
                raise RuntimeError("KV cache too small for the decode-only measurement")
        # Prefill in engine-sized chunks (not timed).
        budget = engine.capacity.max_num_batched_tokens
        per_step = max(1, budget // context)
        for i in range(0, streams, per_step):
            engine.step(
                StepInput(
                    [SeqInput(sid, tokens, 0, False, params) for sid in ids[i : i + per_step]]
                )
            )
        n = context
        times = []
        for k in range(steps):
            batch = StepInput([SeqInput(sid, [1234], n, True, params, k) for sid in ids])
            t0 = time.perf_counter()
            engine.step(batch)
            times.append(time.perf_counter() - t0)
            n += 1
    finally:
        for sid in ids:
            engine.free(sid)
    med = float(np.median(times))
    return {
        "streams": streams,
        "context": context,
        "step_ms_median": round(med * 1e3, 2),
        "step_ms_min": round(min(times) * 1e3, 2),
        "tok_s_median": round(streams / med, 1),
    }


def run_prefill_only(engine: NumpyEngine, chunk: int, repeats: int = 5) -> dict[str, float]:
    """Prefill throughput of one ``chunk``-token prompt chunk (compute-bound), median of repeats."""
    params = SamplingParams(temperature=0.0, max_tokens=1)
    tokens = list(range(1000, 1000 + chunk))
    times = []
    for i in range(repeats + 1):
        sid = f"__prefill_{i}"
        if not engine.kv.reserve(sid, chunk):
            raise RuntimeError("KV cache too small for the prefill measurement")
        try:
            t0 = time.perf_counter()
            engine.step(StepInput([SeqInput(sid, tokens, 0, False, params)]))
            if i:  # the first run warms up
                times.append(time.perf_counter() - t0)
        finally:
            engine.free(sid)
    med = float(np.median(times))
    return {"chunk_tokens": chunk, "ms_median": round(med * 1e3, 2), "tok_s": round(chunk / med, 1)}


def batching_gain_bound(
    mean_prompt: float,
    mean_output: float,
    prefill_tok_s: float,
    step_1_s: float,
    step_n_s: float,
    n: int,
) -> float:
    """Most continuous batching over ``n`` streams can gain over one request at a time.

    Prefill is compute-bound, so batching does not make it cheaper: a request costs
    ``prompt / prefill_tok_s`` of machine time either way. Only decode gains, from one step per
    token alone (``step_1_s``) to ``step_n_s / n`` when ``n`` streams share a step. With the
    measured rates this is the throughput ratio a perfect scheduler would reach on the workload.
    """
    prefill = mean_prompt / prefill_tok_s
    alone = prefill + mean_output * step_1_s
    shared = prefill + mean_output * step_n_s / n
    return alone / shared


def run_long_context(
    model_path: str | None, sequences: int, context: int, kv_dtype: str, chunk: int = 256
) -> dict[str, Any]:
    """Memory with ``sequences`` contexts of ``context`` tokens held at once, measured for real.

    A fresh engine whose KV pool holds exactly those tokens prefills every sequence to
    ``context - 1`` tokens (real forward passes over corpus text, ``chunk`` tokens per step), then
    runs one decode step over all of them at ``context`` tokens. Run it in its own process
    (``fleetform bench engine --long-context``): the RSS figures are the whole process's.
    """
    t0 = time.perf_counter()
    engine = NumpyEngine(
        resolve_model_path(model_path),
        kv_cache_tokens=sequences * context,
        max_model_len=context,
        max_num_seqs=sequences,
        max_num_batched_tokens=chunk,
        kv_dtype=kv_dtype,
    )
    engine.load()
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    corpus = corpus_tokens(EngineCore(engine))
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    ids = [f"__long_{i}" for i in range(sequences)]
    t1 = time.perf_counter()
    try:
        for i, sid in enumerate(ids):
            if not engine.kv.reserve(sid, context):
                raise RuntimeError(f"KV pool cannot hold {sequences} x {context} tokens")
            prompt = make_prompts(corpus, [context - 1], i)[0]
            for start in range(0, len(prompt), chunk):
                piece = prompt[start : start + chunk]
                engine.step(StepInput([SeqInput(sid, piece, start, False, params)]))
        prefill_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        out = engine.step(
            StepInput([SeqInput(sid, [1234], context - 1, True, params) for sid in ids])
        )
        decode_ms = (time.perf_counter() - t2) * 1e3
        assert len(out.sampled) == sequences
        stats = engine.kv.stats()
    finally:
        for sid in ids:
            engine.free(sid)
    return {
        "sequences": sequences,
        "context_tokens": context,
        "kv_dtype": kv_dtype,
        "kv_cache_bytes": stats.capacity_bytes,
        "kv_used_tokens": stats.used_tokens,
        "weights_bytes": engine.model.weights.nbytes() if engine.model else None,
        "model_load_s": round(load_s, 3),
        "rss_after_load_mb": round(rss_loaded, 1),
        "prefill_s": round(prefill_s, 1),
        "decode_step_ms": round(decode_ms, 1),
        "rss_mb": round(_rss_mb(), 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def cpu_calibration(report: dict[str, Any]) -> CpuAssumption:
    """Per-vCPU bandwidth and FLOPS for :mod:`runtime.costmodel`, from this run's measurements.

    Single-stream decode reads every weight once per step (plus a little KV); prefill of a full
    chunk does ``2 x parameters`` FLOPs per token. Parameters are float32 weights / 4 bytes.
    """
    single = next((r for r in report.get("decode_only", []) if r["streams"] == 1), None)
    if single is None or "prefill" not in report:
        raise ValueError("calibration needs the 1-stream decode-only and the prefill measurements")
    weights = report["engine"]["weights_bytes"]
    kv_per_token = report["engine"]["kv_cache_bytes"] / report["engine"]["kv_cache_tokens"]
    return CpuAssumption.from_measurement(
        vcpus=report["system"]["cpus"],
        decode_tokens_per_s=single["tok_s_median"],
        bytes_per_decode_step=weights + kv_per_token * single["context"],
        prefill_tokens_per_s=report["prefill"]["tok_s"],
        flops_per_token=2 * weights / 4,
        source=f"fleetform bench engine, {report['model']}, {report['system'].get('blas')}",
    )


def run_bench(cfg: BenchConfig, progress: Any = None) -> dict[str, Any]:
    """Run the whole benchmark and return the report as a JSON-able dict."""

    def say(msg: str) -> None:
        if progress is not None:
            progress(msg)

    trace = load_trace(cfg.trace)
    t0 = time.perf_counter()
    engine = NumpyEngine(
        resolve_model_path(cfg.model_path),
        kv_cache_tokens=cfg.kv_cache_tokens,
        max_model_len=cfg.max_model_len,
        max_num_seqs=max(cfg.streams),
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        kv_dtype=cfg.kv_dtype,
    )
    engine.load()
    load_s = time.perf_counter() - t0
    say(f"model loaded in {load_s:.2f}s")
    core = EngineCore(engine)
    corpus = corpus_tokens(core)
    report: dict[str, Any] = {
        "model": engine.config.name,
        "model_load_s": round(load_s, 3),
        "rss_after_load_mb": round(_rss_mb(), 1),
        "system": {"cpus": os.cpu_count(), **blas_info()},
        "engine": {
            "kv_cache_tokens": engine.kv.capacity_tokens,
            "kv_cache_bytes": engine.kv.stats().capacity_bytes,
            "kv_dtype": cfg.kv_dtype,
            "weights_bytes": engine.model.weights.nbytes() if engine.model else None,
            "max_model_len": cfg.max_model_len,
            "max_num_batched_tokens": cfg.max_num_batched_tokens,
        },
        "workload": {
            "trace": str(cfg.trace),
            "seed": cfg.seed,
            "prompt_scale": cfg.prompt_scale,
            "output_scale": cfg.output_scale,
        },
        "streams": [],
    }

    # Warm-up: first-touch page faults and BLAS thread start-up are not what we measure.
    core.generate([corpus[:64]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))

    workloads: dict[int, tuple[list[list[int]], list[int]]] = {}
    for s in cfg.streams:
        n = cfg.requests or DEFAULT_REQUESTS.get(s, 2 * s)
        wl = build_workload(
            trace, n, cfg.seed + s, cfg.prompt_scale, cfg.output_scale, cfg.max_model_len
        )
        prompts = make_prompts(corpus, [p for p, _ in wl], cfg.seed + s)
        workloads[s] = (prompts, [o for _, o in wl])

    for s in cfg.streams:
        prompts, outputs = workloads[s]
        say(f"continuous batching, {s} streams, {len(prompts)} requests ...")
        res = run_closed_loop(core, prompts, outputs, s, "continuous")
        report["streams"].append(asdict(res))
        say(f"  {res.output_tok_s} output tok/s")
        gc.collect()

    if cfg.decode_only:
        say("prefill-only ...")
        report["prefill"] = run_prefill_only(engine, cfg.max_num_batched_tokens)
        report["decode_only"] = []
        for s in cfg.streams:
            say(f"decode-only, {s} streams ...")
            report["decode_only"].append(run_decode_only(engine, s, 128, cfg.decode_steps))

    if cfg.modes:
        s = 16
        if s not in workloads:
            n = cfg.requests or DEFAULT_REQUESTS[16]
            wl = build_workload(
                trace, n, cfg.seed + s, cfg.prompt_scale, cfg.output_scale, cfg.max_model_len
            )
            workloads[s] = (
                make_prompts(corpus, [p for p, _ in wl], cfg.seed + s),
                [o for _, o in wl],
            )
        prompts, outputs = workloads[s]
        modes: dict[str, Any] = {}
        say("16-stream workload: one request at a time ...")
        modes["sequential"] = asdict(run_closed_loop(core, prompts, outputs, 1, "sequential"))
        say("16-stream workload: static batching ...")
        modes["static"] = asdict(run_static(core, prompts, outputs, s))
        # Re-measured back to back with the other two: this machine's speed drifts over minutes.
        say("16-stream workload: continuous batching ...")
        cont = asdict(run_closed_loop(core, prompts, outputs, s, "continuous"))
        modes["continuous"] = cont
        report["modes_16_streams"] = modes
        steps = {r["streams"]: r["step_ms_median"] / 1e3 for r in report.get("decode_only", [])}
        if "prefill" in report and 1 in steps and s in steps:
            bound = batching_gain_bound(
                float(np.mean([len(p) for p in prompts])),
                float(np.mean(outputs)),
                report["prefill"]["tok_s"],
                steps[1],
                steps[s],
                s,
            )
            report["continuous_over_sequential"] = {
                "measured": round(cont["output_tok_s"] / modes["sequential"]["output_tok_s"], 2),
                "bound": round(bound, 2),
            }
    # Upper bound of memory whatever the number of sequences: every page of the KV pool written
    # (the scheduler queues or preempts sequences beyond the pool, e.g. 32 x 2k-token contexts).
    kv = engine.kv
    kv.keys.fill(0.0)
    kv.values.fill(0.0)
    report["rss_kv_pool_full_mb"] = round(_rss_mb(), 1)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return report


# -- CLI ------------------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _seqs_by_tokens(text: str) -> tuple[int, int]:
    seqs, sep, tokens = text.lower().partition("x")
    try:
        value = (int(seqs), int(tokens))
    except ValueError:
        value = (0, 0)
    if not sep or value[0] < 1 or value[1] < 2:
        raise argparse.ArgumentTypeError(f"expected SEQSxTOKENS such as 32x2048, got {text!r}")
    return value


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--streams",
        type=_int_list,
        default=(1, 4, 16, 64),
        help="concurrency levels (default 1,4,16,64)",
    )
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per level (default: 4, 12, 32, 64 for 1, 4, 16, 64 streams; 2x streams otherwise)",
    )
    p.add_argument(
        "--trace",
        type=Path,
        default=DEFAULT_TRACE,
        help="Azure trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)",
    )
    p.add_argument(
        "--model-path", default=None, help="Llama-architecture GGUF file (default: SmolLM2-135M)"
    )
    p.add_argument("--seed", type=int, default=0, help="workload sampling seed")
    p.add_argument(
        "--prompt-scale",
        type=float,
        default=8.0,
        help="divide trace prompt lengths by this (default 8)",
    )
    p.add_argument(
        "--output-scale",
        type=float,
        default=4.0,
        help="divide trace output lengths by this (default 4)",
    )
    p.add_argument(
        "--max-model-len", type=int, default=2048, help="clamp prompt+output to this (default 2048)"
    )
    p.add_argument(
        "--kv-cache-tokens", type=int, default=16384, help="KV pool size in tokens (default 16384)"
    )
    p.add_argument(
        "--no-modes", action="store_true", help="skip the sequential/static/continuous comparison"
    )
    p.add_argument("--no-decode-only", action="store_true", help="skip the decode-only measurement")
    p.add_argument(
        "--kv-dtype",
        choices=sorted(KV_DTYPES),
        default="float32",
        help="KV pool storage: float32 (exact) or int8 (a quarter of the memory; default float32)",
    )
    p.add_argument(
        "--long-context",
        type=_seqs_by_tokens,
        default=None,
        metavar="SEQSxTOKENS",
        help="instead of the throughput runs, hold SEQS contexts of TOKENS tokens at once (e.g. "
        "32x2048, a few minutes) and report the process's memory",
    )
    p.add_argument(
        "--calibration-out",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the CPU bandwidth/FLOPS this run implies for the cost model "
        "(use it with FLEETFORM_CPU_CALIBRATION=PATH fleetform plan ...)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    if args.requests is not None and args.requests < 1:
        return usage_error("bench engine", "--requests must be >= 1")
    if args.prompt_scale <= 0 or args.output_scale <= 0:
        return usage_error("bench engine", "--prompt-scale/--output-scale must be > 0")
    if not Path(args.trace).is_file():
        return usage_error(
            "bench engine", f"trace file {str(args.trace)!r} not found (pass --trace PATH)"
        )
    if args.long_context is not None:
        sequences, tokens = args.long_context
        try:
            report = run_long_context(args.model_path, sequences, tokens, args.kv_dtype)
        except (ModelNotFoundError, ValueError, RuntimeError) as exc:
            return usage_error("bench engine", f"--long-context: {exc}")
        print(json.dumps(report, indent=2) if args.json else _long_context_text(report))
        return 0
    cfg = BenchConfig(
        streams=tuple(args.streams),
        requests=args.requests,
        trace=Path(args.trace),
        model_path=args.model_path,
        seed=args.seed,
        prompt_scale=args.prompt_scale,
        output_scale=args.output_scale,
        max_model_len=args.max_model_len,
        kv_cache_tokens=args.kv_cache_tokens,
        modes=not args.no_modes,
        decode_only=not args.no_decode_only,
        kv_dtype=args.kv_dtype,
    )
    progress = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        report = run_bench(cfg, progress)
    except (ModelNotFoundError, ValueError) as exc:
        return usage_error("bench engine", str(exc))
    if args.calibration_out is not None:
        try:
            cpu_calibration(report).save(args.calibration_out)
        except (ValueError, OSError) as exc:
            return usage_error("bench engine", f"--calibration-out: {exc}")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_tables(report)
    return 0


def _long_context_text(r: dict[str, Any]) -> str:
    return (
        f"{r['sequences']} x {r['context_tokens']} tokens, {r['kv_dtype']} KV pool of "
        f"{r['kv_cache_bytes'] / 2**20:.0f} MiB: RSS {r['rss_mb']:.0f} MB "
        f"(peak {r['peak_rss_mb']:.0f} MB; {r['rss_after_load_mb']:.0f} MB after load), "
        f"prefill {r['prefill_s']} s, one decode step over all {r['decode_step_ms']} ms"
    )


def _print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{report['model']}[/bold]  load {report['model_load_s']:.2f}s  "
        f"RSS after load {report['rss_after_load_mb']:.0f} MB  with KV pool full "
        f"{report['rss_kv_pool_full_mb']:.0f} MB  peak {report['peak_rss_mb']:.0f} MB  "
        f"BLAS {report['system'].get('blas')} x{report['system'].get('blas_threads', '?')}"
    )
    cols = [
        ("streams", "streams"),
        ("requests", "reqs"),
        ("output_tok_s", "out tok/s"),
        ("total_tok_s", "total tok/s"),
        ("ttft_p50_ms", "TTFT p50 ms"),
        ("ttft_p99_ms", "TTFT p99 ms"),
        ("itl_p50_ms", "ITL p50 ms"),
        ("itl_p99_ms", "ITL p99 ms"),
        ("peak_rss_mb", "peak RSS MB"),
        ("preemptions", "preempt"),
    ]

    def table(
        title: str, rows: list[dict[str, Any]], first: tuple[str, str] | None = None
    ) -> Table:
        t = Table(title=title)
        header = ([first] if first else []) + cols
        for _, label in header:
            t.add_column(label, justify="right")
        for r in rows:
            t.add_row(*(str(r[k]) for k, _ in header))
        return t

    console.print(table("Continuous batching by concurrency", report["streams"]))
    if "decode_only" in report:
        t = Table(title="Decode only (no prefill), context ~128")
        for label in ("streams", "step ms (median)", "tok/s (median)"):
            t.add_column(label, justify="right")
        for r in report["decode_only"]:
            t.add_row(str(r["streams"]), str(r["step_ms_median"]), str(r["tok_s_median"]))
        console.print(t)
    if "modes_16_streams" in report:
        rows = [dict(v, mode=k) for k, v in report["modes_16_streams"].items()]
        console.print(table("Same 16-stream workload, three ways", rows, ("mode", "mode")))
    if "continuous_over_sequential" in report:
        gain = report["continuous_over_sequential"]
        console.print(
            f"continuous / one at a time: {gain['measured']}x measured, {gain['bound']}x at most "
            "with these prefill and decode rates (prefill is compute-bound and gains nothing)"
        )
