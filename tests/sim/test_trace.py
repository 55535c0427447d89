"""Trace reading, reshaping and the tenant/class mix rule."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from runtime.sim.trace import (
    TraceError,
    TraceRequest,
    assign_mix,
    default_model,
    load_trace,
    parse_class_mix,
    reshape,
    senders,
)
from runtime.spec import FleetSpec, parse_fleet

from .support import fleet_data

AZURE = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:15:46.6805900,374,44\n"
    "2023-11-16 18:15:50.9951690,396,109\n"
    "2023-11-16 23:59:59.5000000,10,1\n"
    "2023-11-17 00:00:00.2500000,20,2"
)


def test_azure_csv_with_seven_fraction_digits_and_a_day_boundary(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(AZURE)
    trace = load_trace(path)
    assert [(r.prompt_tokens, r.output_tokens) for r in trace] == [
        (374, 44),
        (396, 109),
        (10, 1),
        (20, 2),
    ]
    assert trace[0].arrival_s == 0.0
    assert trace[1].arrival_s == pytest.approx(4.314579)
    # 23:59:59.5 -> 00:00:00.25 the next day is 0.75 s later.
    assert trace[3].arrival_s - trace[2].arrival_s == pytest.approx(0.75)
    assert [r.index for r in trace] == [0, 1, 2, 3]
    assert len(load_trace(path, limit=2)) == 2


def test_json_lines_in_milliseconds_sorted_by_arrival(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [
        {"timestamp": 1500, "input_length": 30, "output_length": 3},
        {"timestamp": 500, "input_length": 10, "output_length": 1},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    trace = load_trace(path)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in trace] == [
        (0.0, 10, 1),
        (1.0, 30, 3),
    ]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.csv", "when,prompt,output\n1,2,3", "expected the header"),
        ("bad2.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,x,1", ":2:"),
        ("bad.jsonl", '{"timestamp": 1}\n', ":1: expected an object"),
        ("empty.jsonl", "\n", "no requests"),
    ],
)
def test_bad_traces_say_where(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        load_trace(path)
    with pytest.raises(TraceError, match="not found"):
        load_trace(tmp_path / "missing.csv")


def trace(n: int = 10) -> list[TraceRequest]:
    return [TraceRequest(i, float(i), 100 + i, 10 + i) for i in range(n)]


def test_time_scale_stretches_arrivals() -> None:
    stretched = reshape(trace(), time_scale=2.5)
    assert [r.arrival_s for r in stretched] == [2.5 * i for i in range(10)]
    assert [r.prompt_tokens for r in stretched] == [100 + i for i in range(10)]


def test_load_multiplier_copies_into_the_gaps_and_thins_deterministically() -> None:
    doubled = reshape(trace(), load=2.0, seed=3)
    assert len(doubled) == 20
    assert [r.index for r in doubled] == list(range(20))
    # Each copy lands between its original and the next arrival, never on top of it.
    originals = {r.arrival_s for r in trace()}
    copies = [r for r in doubled if r.arrival_s not in originals]
    assert len(copies) == 9  # the last request has no gap to fill: its copy coincides with it
    assert all(int(r.arrival_s) == r.prompt_tokens - 100 for r in copies)
    half = reshape(trace(1000), load=0.5, seed=3)
    assert 430 < len(half) < 570
    assert half == reshape(trace(1000), load=0.5, seed=3)
    assert half != reshape(trace(1000), load=0.5, seed=4)
    # The same draw decides a kept half and an extra half: 1.5 adds exactly the kept ones.
    assert len(reshape(trace(1000), load=1.5, seed=3)) == 1000 + len(half)


def test_duration_keeps_the_start() -> None:
    assert [r.arrival_s for r in reshape(trace(), time_scale=2.0, duration_s=7.0)] == [
        0.0,
        2.0,
        4.0,
        6.0,
    ]
    with pytest.raises(TraceError, match="positive"):
        reshape(trace(), load=0)


def test_class_mix_parses_and_normalises() -> None:
    assert parse_class_mix("critical=1, standard=3") == {"critical": 0.25, "standard": 0.75}
    for bad in ("critical", "critical=x", "critical=-1", "critical=0"):
        with pytest.raises(TraceError):
            parse_class_mix(bad)


def test_who_sends_each_class(spec: FleetSpec) -> None:
    assert default_model(spec) == "llama-8b"
    # Tenants whose default it is, else those whose ceiling allows it.
    assert senders(spec, "llama-8b", "standard") == ["acme"]
    assert senders(spec, "llama-8b", "batch") == ["jobs"]
    assert senders(spec, "llama-8b", "critical") == ["acme"]


def test_mix_is_a_deterministic_hash_rule(spec: FleetSpec) -> None:
    requests = reshape(trace(2000), seed=0)
    mix = assign_mix(requests, spec, seed=5)
    assert mix == assign_mix(requests, spec, seed=5)
    counts = Counter(m.slo_class for m in mix)
    assert counts["critical"] + counts["standard"] + counts["batch"] == 2000
    assert 150 < counts["critical"] < 250 and 330 < counts["batch"] < 470
    assert {(m.tenant, m.slo_class) for m in mix} == {
        ("acme", "critical"),
        ("acme", "standard"),
        ("jobs", "batch"),
    }
    # One request's draw does not depend on the others: a prefix keeps its assignment.
    assert assign_mix(requests[:100], spec, seed=5) == mix[:100]
    assert assign_mix(requests, spec, seed=6) != mix


def test_mix_errors_name_the_problem(spec: FleetSpec) -> None:
    with pytest.raises(TraceError, match="no SLO class 'gold'"):
        assign_mix(trace(), spec, class_mix={"gold": 1.0})
    with pytest.raises(TraceError, match="model 'gpt' is not in the fleet"):
        assign_mix(trace(), spec, model="gpt")
    data = fleet_data()
    data["tenants"] = [t for t in data["tenants"] if t["name"] != "acme"]
    lonely = parse_fleet(data)
    with pytest.raises(TraceError, match="may send class 'critical'"):
        assign_mix(trace(), lonely)
