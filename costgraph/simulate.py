"""Throughput of a generating model under continuous batching: a discrete-event simulation (simpy).

The engine runs one step at a time, as vLLM's scheduler does (the V0 default policy, without
chunked prefill): when sequences wait and fit, a *prefill step* admits as many as the limits allow
(`max_num_seqs` running, `max_num_batched_tokens` prompt tokens in the step, free KV blocks for their
prompts) and runs their encoders and prefill together, each yielding its first token; otherwise a
*decode step* advances every running sequence by one token. A sequence that needs a new KV block
when none is free preempts the latest admitted one (vLLM's recompute: it waits again and redoes its
prefill over prompt + tokens so far). `batching="static"` is a plain HF batch: a new batch only when
the last one has finished entirely (every sequence decodes as long as the longest, padding, and all
are returned together).

What a step costs comes from the caller (`StepTimes`: seconds of a prefill of n sequences, of a decode
step of n sequences at a mean context), so the simulator knows no model; the time model
(`costgraph.timemodel`) fills them in. simpy drives the clock: requests arrive (all at once, the
vendor's batch script, or at a rate) while the engine process steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Request:
    prompt_tokens: int
    output_tokens: int
    encoder_seconds: float = 0.0   # the request's own encoder work (run in the step that admits it)
    arrival: float = 0.0
    key: int = 0                   # which kind of request (its prefill table row)


@dataclass(frozen=True)
class Limits:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    block_size: int = 16
    kv_blocks: int = 1 << 30       # blocks the KV cache holds (memory after weights and activations)
    kv_block_bytes: int = 0
    batching: str = "continuous"   # or "static"


@dataclass
class StepTimes:
    """prefill(keys, prompts) -> seconds of one prefill step of those sequences; decode(n, mean_context)
    -> seconds of one decode step of n sequences."""
    prefill: Callable[[list, list], float]
    decode: Callable[[int, float], float]


@dataclass
class _Seq:
    req: Request
    idx: int
    done: int = 0              # output tokens produced
    first: float | None = None
    finish: float | None = None
    blocks: int = 0
    preempted: int = 0


@dataclass
class Result:
    finished: int
    makespan: float
    ttft: np.ndarray
    tpot: np.ndarray
    latency: np.ndarray
    output_tokens: int
    max_running: int
    preemptions: int
    timeline: dict = field(default_factory=dict)   # time, running, kv_bytes, kind per step
    steps: dict = field(default_factory=dict)

    def summary(self) -> dict:
        pct = lambda a: {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)} if len(a) else {}
        return {"pages": self.finished, "seconds": self.makespan,
                "pages_per_second": self.finished / self.makespan if self.makespan else 0.0,
                "pages_per_day": 86400 * self.finished / self.makespan if self.makespan else 0.0,
                "output_tokens_per_second": self.output_tokens / self.makespan if self.makespan else 0.0,
                "ttft_seconds": pct(self.ttft), "tpot_seconds": pct(self.tpot), "latency_seconds": pct(self.latency),
                "max_concurrent_sequences": self.max_running, "preemptions": self.preemptions, "steps": self.steps,
                "peak_kv_bytes": int(max(self.timeline.get("kv_bytes", [0]) or [0]))}


def _blocks(tokens: int, size: int) -> int:
    return -(-tokens // size)


def simulate(requests: list[Request], times: StepTimes, limits: Limits, progress=None) -> Result:
    import simpy

    env = simpy.Environment()
    waiting: list[_Seq] = []
    running: list[_Seq] = []
    done: list[_Seq] = []
    arrived = env.event()
    tl = {"time": [], "running": [], "kv_bytes": [], "kind": []}
    counts = {"prefill": 0, "decode": 0}
    state = {"free": limits.kv_blocks, "max_running": 0, "preemptions": 0}
    seqs = [_Seq(r, i) for i, r in enumerate(requests)]

    def arrivals():
        for s in sorted(seqs, key=lambda s: s.req.arrival):
            if s.req.arrival > env.now:
                yield env.timeout(s.req.arrival - env.now)
            waiting.append(s)
            if not arrived.triggered:
                arrived.succeed()

    def admit() -> list[_Seq]:
        if limits.batching == "static" and running:
            return []
        batch, tokens = [], 0
        for s in list(waiting):
            need = s.req.prompt_tokens + s.done
            blocks = _blocks(need + 1, limits.block_size)
            if (len(running) + len(batch) >= limits.max_num_seqs or tokens + need > limits.max_num_batched_tokens
                    or blocks > state["free"]):
                break
            state["free"] -= blocks
            s.blocks = blocks
            batch.append(s)
            tokens += need
        for s in batch:
            waiting.remove(s)
        return batch

    def record(kind: str):
        counts[kind] += 1
        tl["time"].append(env.now)
        tl["running"].append(len(running))
        tl["kv_bytes"].append((limits.kv_blocks - state["free"]) * limits.kv_block_bytes)
        tl["kind"].append(kind)

    def finish(s: _Seq):
        s.finish = env.now
        state["free"] += s.blocks
        s.blocks = 0
        running.remove(s)
        done.append(s)
        if progress is not None:
            progress.update(1)

    def engine():
        nonlocal arrived
        while len(done) < len(seqs):
            if not waiting and not running:
                arrived = env.event()
                yield arrived
                continue
            batch = admit()
            if batch:
                secs = sum(s.req.encoder_seconds for s in batch if s.preempted == 0) + \
                    times.prefill([s.req.key for s in batch], [s.req.prompt_tokens + s.done for s in batch])
                yield env.timeout(secs)
                running.extend(batch)
                state["max_running"] = max(state["max_running"], len(running))
                for s in batch:
                    if s.first is None:
                        s.first = env.now
                    s.done += 1
                record("prefill")
                ended = [s for s in batch if s.done >= s.req.output_tokens]
                if limits.batching != "static" or len(ended) == len(running):
                    for s in ended:
                        finish(s)
                continue
            if not running:   # nothing fits and nothing runs: a request larger than the cache
                s = waiting.pop(0)
                raise ValueError(f"a request of {s.req.prompt_tokens} prompt tokens does not fit the KV cache "
                                 f"({limits.kv_blocks} blocks of {limits.block_size})")
            # every running sequence needs room for its next token's K and V
            for s in list(running):
                need = _blocks(s.req.prompt_tokens + s.done + 1, limits.block_size)
                while need > s.blocks and s in running:
                    if state["free"] > 0:
                        state["free"] -= 1
                        s.blocks += 1
                    else:   # preempt the latest admitted (recompute later)
                        victim = running[-1]
                        running.remove(victim)
                        state["free"] += victim.blocks
                        victim.blocks = 0
                        victim.preempted += 1
                        state["preemptions"] += 1
                        waiting.insert(0, victim)
            if not running:
                continue
            ctx = float(np.mean([s.req.prompt_tokens + s.done for s in running]))
            yield env.timeout(times.decode(len(running), ctx))
            for s in running:
                s.done += 1
            record("decode")
            ended = [s for s in running if s.done >= s.req.output_tokens]
            if limits.batching == "static" and len(ended) < len(running):
                continue   # HF generate: the finished keep decoding padding until the longest ends
            for s in ended:
                finish(s)

    env.process(arrivals())
    proc = env.process(engine())
    env.run(until=proc)
    first = np.array([s.first - s.req.arrival for s in done])
    lat = np.array([s.finish - s.req.arrival for s in done])
    tpot = np.array([(s.finish - s.first) / (s.req.output_tokens - 1) for s in done if s.req.output_tokens > 1])
    return Result(len(done), float(env.now), first, tpot, lat, sum(s.req.output_tokens for s in done),
                  state["max_running"], state["preemptions"], tl, counts)
