"""SFT on reasoning traces, on the learner group (the warm-up before GRPO, or a run of its own)."""
from __future__ import annotations

import time
from typing import Callable

from ..actors.learner import SftStats
from .config import SftConfig
from .data import EpochSampler, PreparedData, PromptRenderer
from .system import System


def run_sft(system: System, cfg: SftConfig, data: PreparedData, renderer: PromptRenderer, metrics, seed: int,
            progress=None, probe: Callable[[], float] | None = None) -> list[dict]:
    """``cfg.steps`` steps; with a ``probe`` (held-out pass@1 of the current weights, given only
    when ``cfg.stop_at_pass_rate`` is set) it stops early once the probe reaches that rate."""
    system.learners.run_all("start_phase", cfg.lr, cfg.warmup_steps)
    train = data.train
    sampler = EpochSampler(len(train), seed + 1, data.train_rows)
    records = []
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        pairs = [renderer.sft_pair(train[idx]) for idx, _ in sampler.take(cfg.batch_size)]
        tokens = sum(len(c) for _, c in pairs)
        parts = system.learners.get(system.learners.shard("sft_step", pairs, tokens), "sft_step")
        record = {"step": step, **SftStats.combine(parts, tokens), "tokens": tokens,
                  "time/step_s": time.perf_counter() - t0}
        stop = False
        if probe is not None and step >= cfg.probe_from and step % cfg.probe_every == 0:
            record["probe_pass@1"] = probe()
            stop = record["probe_pass@1"] >= cfg.stop_at_pass_rate
        metrics.write(record, prefix="sft/")
        records.append(record)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.3f}", **({"probe": f"{record['probe_pass@1']:.2f}"}
                                                                 if "probe_pass@1" in record else {}))
        if stop:
            break
    return records
