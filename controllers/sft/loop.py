"""SFT on reasoning traces, on the learner group (the warm-up before GRPO, or a run of its own).

Each step takes ``batch_size`` conversations in a seeded shuffled order, renders them with the
chat template (every assistant turn trained), cuts those longer than ``max_seq_length`` (counted),
and sends them to the learner ranks as rows: one conversation per row, or several packed into
rows of ``max_seq_length`` tokens (best-fit decreasing) with attention kept apart.
"""
from __future__ import annotations

import time
from typing import Callable

from ...actors.batching import item_tokens, learner_shards, micro_batch_plan
from ...actors.learner import LearnerRank, SftStats
from ...actors.packing import SftExample, pack_bins
from ..common import interrupt
from ..common.data import EpochSampler, PreparedData, PromptRenderer
from ..common.system import System
from ..config import SftConfig
from .data import Truncation, truncate


def rows_of(examples: list[SftExample], cfg: SftConfig) -> list[list[SftExample]]:
    """Training rows: packed into ``max_seq_length`` rows (``cfg.packing``), else one per example."""
    if not cfg.packing:
        return [[e] for e in examples]
    return [[examples[i] for i in b] for b in pack_bins([len(e.ids) for e in examples], cfg.max_seq_length)]


def examples_of(rows, renderer: PromptRenderer, cfg: SftConfig, counts: Truncation, ids) -> list[SftExample]:
    """Rendered and cut conversations (an example left with nothing to train is skipped, counted)."""
    out = []
    for row, row_id in zip(rows, ids):
        e = renderer.sft_example(row)
        e = truncate(e, cfg.max_seq_length, row_id, counts) if cfg.max_seq_length else e
        if e is not None:
            out.append(e)
    return out


def held_out_loss(system: System, examples: list[SftExample], cfg: SftConfig) -> float:
    """Mean NLL per trained token of ``examples`` under the learners' current weights."""
    rows = rows_of(examples, cfg)
    lc = system.r.learner
    parts = learner_shards(rows, len(system.learners.ready()), lc.max_tokens_per_micro_batch, lc.sequence_parallel_size)
    micro = max(len(micro_batch_plan([item_tokens(r) for r in p], lc.micro_batch_size, lc.max_tokens_per_micro_batch))
                for p in parts)
    refs = [system.learners.call(i, LearnerRank.sft_eval, part, micro) for i, part in zip(system.learners.ready(), parts)]
    stats = system.learners.get(refs, "sft_eval")
    return sum(s.nll_sum for s in stats) / max(1, sum(e.targets for e in examples))


def run_sft(system: System, cfg: SftConfig, data: PreparedData, renderer: PromptRenderer, metrics, seed: int,
            progress=None, probe: Callable[[], float] | None = None, held_out: list[SftExample] | None = None,
            truncation: Truncation | None = None, resume_at: tuple[int, int] | None = None,
            load_state: tuple[str, str] | None = None,
            after_step: Callable[[int, int], None] | None = None) -> list[dict]:
    """``cfg.steps`` steps; with a ``probe`` (held-out pass@1 of the current weights, given only
    when ``cfg.stop_at_pass_rate`` is set) it stops early once the probe reaches that rate;
    with ``held_out`` conversations, their loss every ``cfg.eval_every`` steps and at the end.

    A resumed run: ``load_state`` (checkpoint folder, tag) restores the learners' state,
    ``resume_at`` (steps done, conversations the sampler had handed out) the data position.
    ``after_step(step, taken)`` runs after every step (checkpoints)."""
    system.learners.run_all(LearnerRank.start_phase, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.steps, cfg.min_lr_ratio)
    if load_state is not None:
        system.learners.run_all(LearnerRank.load_checkpoint, *load_state)
    train = data.train
    sampler = EpochSampler(len(train), seed + 1, data.train_rows)
    done = 0
    if resume_at is not None:
        done = resume_at[0]
        sampler.seek(resume_at[1])
    counts = truncation if truncation is not None else Truncation()
    records = []
    for step in range(done + 1, cfg.steps + 1):
        interrupt.check()
        t0 = time.perf_counter()
        taken = sampler.take(cfg.batch_size)
        examples = examples_of((train[idx] for idx, _ in taken), renderer, cfg, counts, [rid for _, rid in taken])
        rows = rows_of(examples, cfg)
        targets = sum(e.targets for e in examples)
        lc = system.r.learner
        shards = learner_shards(rows, len(system.learners.ready()), lc.max_tokens_per_micro_batch,
                                lc.sequence_parallel_size)
        parts = system.learners.get(system.learners.scatter(LearnerRank.sft_step, shards, max(1, targets)), "sft_step")
        seconds = time.perf_counter() - t0
        tokens_in = sum(len(e.ids) for e in examples)
        record = {"step": step, **SftStats.combine(parts, max(1, targets)), "tokens": targets, "tokens_in": tokens_in,
                  "rows": len(rows), "throughput/tokens_per_s": tokens_in / seconds,
                  "truncated/examples": counts.examples, "time/step_s": seconds}
        stop = False
        if probe is not None and step >= cfg.probe_from and step % cfg.probe_every == 0:
            record["probe_pass@1"] = probe()
            stop = record["probe_pass@1"] >= cfg.stop_at_pass_rate
        if held_out and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps or stop):
            record["eval_loss"] = held_out_loss(system, held_out, cfg)
        metrics.write(record)
        records.append(record)
        if after_step is not None:
            after_step(step, sampler.taken)
        if progress is not None:
            shown = {k: f"{record[k]:.3f}" for k in ("probe_pass@1", "eval_loss") if k in record}
            progress.set_postfix(loss=f"{record['loss']:.3f}", **shown, refresh=False)
            progress.update(1)
        if stop:
            break
    return records
