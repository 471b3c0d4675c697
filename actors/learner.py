"""Learner: one DeepSpeed rank. N of them form one data-parallel engine (gloo on CPU, NCCL on GPU).

Each rank receives its shard of the batch. Losses are normalised by counts of the *whole*
batch (tokens, sequences, sequences x max length: ``loss.global_denominator``), so the update
does not depend on how the batch is cut into ranks and micro-batches: DeepSpeed averages
gradients over ranks, hence the ``* world_size``. The exception is ``bnpo``, which TRL defines
per local batch: each micro-batch's token mean weighs 1 / (micro-batches over all ranks),
TRL's per-device mean / gradient-accumulation steps, averaged over devices. With sequence
parallelism the ranks of a group share one shard: each computes the shard's whole loss from
gathered log-probs and takes 1 / sequence_parallel_size of it (``actors/sequence_parallel.py``).
"""
from __future__ import annotations

import functools
import importlib
import io
import logging
import math
import os
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import numpy as np
import torch

from . import storage
from .batching import attention_kwargs, completion_logprobs, item_tokens, micro_batch_plan, pad_batch, token_logprobs
from .generator import Generator
from .lora import LoraConfig
from .loss import LossConfig, aggregate, grpo_token_losses
from .packing import SftExample, one_row, sft_batch, uses_flash_attention
from .rollout import TrainSample
from .spans import SpanLog

log = logging.getLogger("r1ray")

# `import deepspeed` imports mlflow when it is installed (r1ray[mlflow] and the test extra install
# it), only for the autotuner to log to, which no learner here runs: 1.2 s of CPU a rank at
# start-up (a tiny 2-rank run's actors were up 1.5 s later on 2 cores). The trackers (mlflow
# included) run in the driver, not in a learner. DeepSpeed's other heavy import, the Muon
# optimizer's module, cannot be skipped (ZeRO-1/2's gradient reduction and ZeRO-3's optimizer import
# it unguarded), but what makes it heavy can wait: see ``compiled_on_first_call``.
DEEPSPEED_EXTRAS = ("mlflow",)
DEEPSPEED_COMPILED = "deepspeed.runtime.zero.muon.muon_optimizer"


@contextmanager
def compiled_on_first_call(compiler):
    """Inside, a function decorated with ``@compiler.compile(...)`` (DeepSpeed's
    ``runtime.compiler``, whose ``compile()`` is ``torch.compile``) is handed to it on its first
    call instead of when decorated. torch.compile compiles on the first call anyway; what it does
    when decorating is import inductor for its settings, 1.0-1.6 s of CPU a rank here, for the three
    Muon kernels DeepSpeed's ZeRO imports (its optimizer check) and a learner with AdamW never
    calls. Outside, ``compiler.compile`` is as it was."""
    original = getattr(compiler, "compile", None)
    if original is None:
        yield
        return

    def deferred(*args, **kwargs):
        def decorate(fn):
            compiled = None

            @functools.wraps(fn)
            def call(*a, **k):
                nonlocal compiled
                if compiled is None:
                    compiled = original(*args, **kwargs)(fn)
                return compiled(*a, **k)
            return call
        return decorate

    compiler.compile = deferred
    try:
        yield
    finally:
        compiler.compile = original


@contextmanager
def builds_past_stale_locks(op_builder):
    """Inside, each of DeepSpeed's just-in-time op builds (``op_builder.jit_load``) first takes an
    OS lock on the op's build folder and, holding it, removes a ``lock`` file found there.

    torch's cpp_extension marks a build in progress with that file and every later load of the
    op waits while it exists, with no time limit; a build killed part-way leaves it behind
    (pytorch/pytorch#189245). On a CPU a run's first learner start builds DeepSpeed's shared-memory
    op, about 50 CPU seconds, so a first run stopped then left every later run's learners waiting
    until the setup timeout (600 s) with no word of why. The OS lock (``flock``) is released by the
    kernel when its holder dies and every learner's build takes it, so a ``lock`` file found while
    holding it was left by a build that died (or by a program other than r1ray building the same op
    in the same extensions folder at that moment: the warning names the file)."""
    original = getattr(op_builder, "jit_load", None)
    try:
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:  # a torch that names its build folders otherwise: builds as before
        original = None
    if original is None:
        yield
        return

    def jit_load(self, *args, **kwargs):
        import fcntl

        folder = _get_build_directory(self.name, verbose=False)
        with open(os.path.join(folder, "r1ray-build.flock"), "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # released on close, or by the kernel if this process dies
            stale = os.path.join(folder, "lock")
            if os.path.exists(stale):
                log.warning("removing %s, left by a build of DeepSpeed's %s op that was stopped part-way "
                            "(torch waits for it to go, without limit)", stale, self.name)
                with suppress(FileNotFoundError):
                    os.remove(stale)
            return original(self, *args, **kwargs)

    op_builder.jit_load = jit_load
    try:
        yield
    finally:
        op_builder.jit_load = original


@contextmanager
def skipped_imports(*modules: str):
    """Inside, importing one of ``modules`` not imported yet raises ImportError (a None entry in
    ``sys.modules``), as if it were not installed; afterwards it imports as usual again."""
    added = [m for m in modules if m not in sys.modules]
    sys.modules.update(dict.fromkeys(added))
    try:
        yield
    finally:
        for m in added:
            if sys.modules.get(m, ...) is None:
                del sys.modules[m]


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class LearnerConfig:
    num_ranks: int = 2
    zero_stage: Literal[0, 1, 2, 3] = 2
    micro_batch_size: int = 16  # sequences per forward/backward on one rank
    # Token-budget micro-batches (veRL's dynamic batch size): also at most this many padded
    # tokens (rows x the longest) per micro-batch, rows of like lengths together, the batch
    # balanced over ranks by tokens (actors/batching.micro_batch_plan). null: counted only.
    max_tokens_per_micro_batch: int | None = None
    # Ulysses sequence parallelism (actors/sequence_parallel.py): groups of this many consecutive
    # ranks train the same rows, each holding 1/N of every row's positions; the data-parallel
    # degree is num_ranks / N.
    sequence_parallel_size: int = 1
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradient_checkpointing: bool = False
    threads_per_rank: int = 1  # torch intra-op threads on CPU
    # The LM head's matmul for log-probs: "model" (its dtype, logits upcast after: as vLLM
    # computes the behaviour log-probs) or "float32" (see actors/batching.token_logprobs).
    logits_dtype: Literal["model", "float32"] = "model"
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig | None = None  # ZeRO-0/1/2: adapters, merged into every HF checkpoint

    @property
    def data_parallel_size(self) -> int:
        """How many different shares of a batch the ranks train on."""
        return self.num_ranks // self.sequence_parallel_size


@dataclass
class GrpoStats:
    """One rank's sums over its micro-batches of a GRPO step (every count is over completion
    tokens); ``combine`` turns the ranks' parts into the step's metrics."""

    tokens: float = 0.0
    loss_sum: float = 0.0
    kl_sum: float = 0.0
    clipped: float = 0.0
    ratio_sum: float = 0.0
    ratio_max: float = -math.inf
    ratio_min: float = math.inf
    is_weight_sum: float = 0.0
    is_truncated: float = 0.0
    logp_diff_abs_sum: float = 0.0
    entropy_sum: float = 0.0
    iterations: int = 1  # optimizer steps on this batch (num_iterations); set once, not summed
    grad_norm: float = 0.0  # global, set once per step
    lr: float = 0.0
    time_s: float = 0.0

    def add(self, other: "GrpoStats") -> None:
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name != "iterations":
                setattr(self, f.name, max(a, b) if f.name == "ratio_max" else min(a, b) if f.name == "ratio_min" else a + b)

    @staticmethod
    def combine(parts: list["GrpoStats"]) -> dict:
        """Per-rank sums -> batch metrics (ranks saw disjoint shards of the batch); with
        num_iterations > 1 the sums span every iteration, so the loss is their mean."""
        tokens = sum(p.tokens for p in parts) or 1.0
        return {
            "loss": sum(p.loss_sum for p in parts) / parts[0].iterations,
            "kl": sum(p.kl_sum for p in parts) / tokens,
            "clip_ratio": sum(p.clipped for p in parts) / tokens,
            "ratio/mean": sum(p.ratio_sum for p in parts) / tokens,
            "ratio/max": max(p.ratio_max for p in parts),
            "ratio/min": min(p.ratio_min for p in parts),
            "is_weight/mean": sum(p.is_weight_sum for p in parts) / tokens,
            "is_weight/truncated_ratio": sum(p.is_truncated for p in parts) / tokens,
            "logprob_mismatch/mean_abs": sum(p.logp_diff_abs_sum for p in parts) / tokens,
            "entropy/mean": sum(p.entropy_sum for p in parts) / tokens,
            "grad_norm": parts[0].grad_norm,
            "lr": parts[0].lr,
        }


@dataclass
class SftStats:
    """One rank's summed negative log-likelihood over its share of an SFT step, and how full its
    micro-batches were: ``tokens`` real tokens in ``slots`` token positions (rows x width)."""

    nll_sum: float = 0.0
    tokens: int = 0
    slots: int = 0
    grad_norm: float = 0.0
    lr: float = 0.0
    time_s: float = 0.0

    def add(self, other: "SftStats") -> None:
        self.nll_sum += other.nll_sum
        self.tokens += other.tokens
        self.slots += other.slots

    @staticmethod
    def combine(parts: list["SftStats"], tokens: int) -> dict:
        slots = sum(p.slots for p in parts)
        return {"loss": sum(p.nll_sum for p in parts) / tokens, "grad_norm": parts[0].grad_norm, "lr": parts[0].lr,
                "padding_waste": 1.0 - sum(p.tokens for p in parts) / slots if slots else 0.0}


_FILLER = SftExample([0, 0], [0, 1])  # a forward for a rank with no held-out rows at all


def lr_factor(step: int, warmup: int, schedule: str, total: int, min_ratio: float) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def file_record(path: str) -> dict:
    """What a checkpoint remembers of one of its files: its size and sha256."""
    import hashlib

    with open(path, "rb") as f:
        return {"size": os.path.getsize(path), "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


class LearnerRank:
    """Plain class: a world of one works in-process; ``cluster/`` runs one Ray actor per rank."""

    def __init__(self, model_path: str, cfg: LearnerConfig, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.model_path, self.cfg, self.rank, self.world_size, self.seed = model_path, cfg, rank, world_size, seed
        self.engine = None
        self.sp = None  # this rank's sequence-parallel group (learner.sequence_parallel_size > 1)
        self.spans = SpanLog()
        self.batch_size = None
        self.uploads: list[storage.Upload] = []  # checkpoint files going to object storage meanwhile
        self._base_changed = False  # LoRA: the frozen base weights moved (rebase_adapters): the next export sends them

    def __repr__(self) -> str:
        return f"LearnerRank({self.rank}/{self.world_size})"

    @property
    def reports(self) -> bool:
        """Whether this rank's step statistics count: with sequence parallelism every rank of a
        group computes the same whole-row losses, and its first rank reports them."""
        return self.sp is None or self.sp.rank == 0

    def setup(self, master_addr: str = "127.0.0.1", master_port: int = 29500, timeout_s: float = 300.0) -> dict:
        """Join the process group and build the DeepSpeed engine (all ranks call this together)."""
        import datetime

        with skipped_imports(*DEEPSPEED_EXTRAS):
            import deepspeed
        with suppress(ImportError), compiled_on_first_call(importlib.import_module("deepspeed.runtime.compiler")):
            importlib.import_module(DEEPSPEED_COMPILED)  # a DeepSpeed without Muon: nothing to defer
        from deepspeed.ops.op_builder.builder import OpBuilder
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            torch.set_num_threads(self.cfg.threads_per_rank)
        torch.manual_seed(self.seed)
        with builds_past_stale_locks(OpBuilder):  # a CPU's comm backend builds DeepSpeed's shared-memory op
            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo",
                                       timeout=datetime.timedelta(seconds=timeout_s))
        storage.pull(self.model_path)  # a checkpoint on object storage (a previous stage's, a resumed run's)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        sp_size = self.cfg.sequence_parallel_size
        attention = attention_kwargs(self.cfg.dtype) or ({"attn_implementation": "sdpa"} if sp_size > 1 else {})
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32, **attention)
        if sp_size > 1:
            from .sequence_parallel import attach, new_groups

            self.sp = new_groups(self.world_size, self.rank, sp_size)
            attach(model, self.sp)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.cfg.lora is not None:
            import peft

            model = peft.get_peft_model(model, self.cfg.lora.peft())
        o = self.cfg.optim
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr,
                                      betas=tuple(o.betas), weight_decay=o.weight_decay)
        warmup = max(1, o.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
        with builds_past_stale_locks(OpBuilder):
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self._ds_config(gas=1))
        self.device = self.engine.device
        # ZeRO-3 leaves each parameter an empty placeholder here; ds_numel is its whole size
        params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        return {"rank": self.rank, "device": str(self.device), "params": params}

    def start_phase(self, lr: float, warmup_steps: int = 0, schedule: str = "constant", total_steps: int = 0,
                    min_lr_ratio: float = 0.0) -> None:
        """Switch learning rate and forget Adam's moments between SFT and GRPO: a linear warm-up
        over ``warmup_steps``, then ``schedule`` ("constant", or "linear" / "cosine" decay to
        ``min_lr_ratio`` x lr at ``total_steps``)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # ZeRO wraps the torch optimizer
        inner.state.clear()  # AdamW re-creates its moments lazily at the next step
        for group in inner.param_groups:
            group["lr"] = group["initial_lr"] = lr
        # DeepSpeed steps whatever scheduler it holds.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            inner, lambda s: lr_factor(s, warmup_steps, schedule, total_steps, min_lr_ratio))
        self.engine.lr_scheduler = self.scheduler

    def _ds_config(self, gas: int) -> dict:
        c = self.cfg
        return {
            "train_micro_batch_size_per_gpu": c.micro_batch_size,
            "gradient_accumulation_steps": gas,
            "train_batch_size": c.micro_batch_size * gas * self.world_size,
            "zero_optimization": {"stage": c.zero_stage},
            "gradient_clipping": c.optim.grad_clip,
            "bf16": {"enabled": c.dtype == "bfloat16"},
            # bf16 weights, fp32 gradient accumulation: micro-batch gradients of a large batch add
            # up without losing the small ones to bf16's 8-bit mantissa.
            **({"data_types": {"grad_accum_dtype": "fp32"}} if c.dtype == "bfloat16" else {}),
            "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's fused Adam needs CUDA
            "steps_per_print": 10**9,
        }

    def _set_micro_batches(self, local: int) -> int:
        """DeepSpeed steps the optimizer after a fixed number of micro-batches: every rank takes
        as many as the busiest (``local``: this rank's), set per batch."""
        gas = local
        if self.world_size > 1:
            import torch.distributed as dist

            most = torch.tensor([local], dtype=torch.long, device=self.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            gas = int(most.item())
        size = self.cfg.micro_batch_size * gas * self.world_size
        if size != self.batch_size:
            self.engine.set_train_batch_size(size)
            self.batch_size = size
        return gas

    def _run_micro_batches(self, items: list, loss_fn, total):
        """Forward/backward over micro-batches (``micro_batch_plan``), one optimizer step;
        ``loss_fn(mb, weight)`` returns (loss, stats), and the stats of real micro-batches are
        added to ``total``. A rank with fewer micro-batches than the busiest runs zero-weight
        ones on its shortest row, so every rank takes the same number of DeepSpeed micro-steps."""
        t0 = time.perf_counter()
        lengths = [item_tokens(x) for x in items]
        plan = micro_batch_plan(lengths, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch)
        gas = self._set_micro_batches(len(plan))
        work = [([items[i] for i in mb], 1.0) for mb in plan]
        work += [([min(items, key=item_tokens)], 0.0)] * (gas - len(work))
        self.engine.train()
        norm = None
        for k, (mb, weight) in enumerate(work):
            # The boundary said, not counted: DeepSpeed counts micro-steps since the start, so
            # a step whose count differs from the last one's would end where the count says.
            self.engine.set_gradient_accumulation_boundary(k == len(work) - 1)
            loss, stats = loss_fn(mb, weight=weight)
            self.engine.backward(loss, scale_wrt_gas=False)
            if k == len(work) - 1:
                norm = self._grad_norm_before_step()
            self.engine.step()
            if weight and self.reports:
                total.add(stats)
        total.grad_norm = float(self.engine.get_global_grad_norm() or norm or 0.0)
        total.lr = float(self.scheduler.get_last_lr()[0])
        total.time_s += time.perf_counter() - t0
        return total

    def _grad_norm_before_step(self) -> float | None:
        """ZeRO-0 in fp32 clips with torch's ``clip_grad_norm_`` and keeps no norm to report
        (``get_global_grad_norm`` is None): the norm of the reduced gradients, before that step."""
        if self.cfg.zero_stage != 0 or self.cfg.dtype != "float32":
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0

    def sft_step(self, rows: list[list[SftExample]], global_tokens: int) -> SftStats:
        """Cross-entropy on the trained (assistant) tokens of ``rows``: one example each, or several
        packed (``actors/packing.py``); ``micro_batch_size`` rows per micro-batch.
        ``global_tokens`` counts the trained tokens over all ranks."""
        with self.spans.span("sft_step", samples=sum(map(len, rows))):
            return self._run_micro_batches(rows, lambda mb, weight=1.0: self._sft_loss(mb, global_tokens, weight),
                                           SftStats())

    def sft_eval(self, rows: list[list[SftExample]], micro_batches: int) -> SftStats:
        """The summed NLL of ``rows`` without a step (held-out loss). Every rank runs
        ``micro_batches`` forwards (ZeRO-3 gathers weights in each): a rank with fewer rows runs
        the rest on its first row and does not count them."""
        total = SftStats()
        self.engine.eval()
        plan = micro_batch_plan([item_tokens(r) for r in rows], self.cfg.micro_batch_size,
                                self.cfg.max_tokens_per_micro_batch)
        batches = [[rows[i] for i in mb] for mb in plan]
        with torch.no_grad():
            for i in range(micro_batches):
                stats = self._sft_loss(batches[i] if i < len(batches) else rows[:1] or [[_FILLER]], 1, 1.0)[1]
                if i < len(batches) and self.reports:
                    total.add(stats)
        return total

    def _sft_loss(self, mb: list[list[SftExample]], global_tokens: int, weight: float):
        if len(mb) > 1 and any(len(r) > 1 for r in mb) and uses_flash_attention(self.engine.module):
            mb = one_row(mb)  # packed rows would attend across examples under FlashAttention
        batch = sft_batch(mb, self.pad_id).to(self.device)
        nll = -(token_logprobs(self.engine, batch, logits_dtype=self.cfg.logits_dtype, sp=self.sp)
                * batch.completion_mask).sum()
        stats = SftStats(nll_sum=float(nll.detach()), tokens=sum(len(e.ids) for r in mb for e in r),
                         slots=batch.input_ids.numel())
        return nll / global_tokens * self.world_size * weight / self.cfg.sequence_parallel_size, stats

    def grpo_step(self, samples: list[TrainSample], global_denom: float, global_tokens: float) -> GrpoStats:
        """``loss.num_iterations`` optimizer steps over this rank's samples. ``global_denom`` is the
        whole batch's ``loss.global_denominator``, ``global_tokens`` its completion tokens in the
        loss (the entropy bonus is a token mean whatever the loss type). From iteration 2 on, the
        old log-probs are the learner's own from iteration 1 (the policy before this batch), as TRL."""
        mu = self.cfg.loss.num_iterations
        total = GrpoStats(iterations=mu)
        with self.spans.span("train", samples=len(samples), iterations=mu):
            for it in range(mu):
                own: dict | None = {} if it == 0 and mu > 1 else None
                self._run_micro_batches(samples, lambda mb, weight=1.0: self._grpo_loss(
                    mb, global_denom, global_tokens, weight, own), total)
                if own is not None:
                    samples = [replace(s, logprobs=own[id(s)]) for s in samples]
        return total

    def _grpo_loss(self, mb: list[TrainSample], denom: float, tokens: float, weight: float,
                   own: dict | None = None) -> tuple[torch.Tensor, GrpoStats]:
        """One micro-batch's loss; ``own`` (when given) collects its log-probs by ``id`` of sample."""
        lc = self.cfg.loss
        packed = pad_batch([s.prompt_ids for s in mb], [s.completion_ids for s in mb], self.pad_id)
        old = packed.scatter([s.logprobs for s in mb]).to(self.device)
        ref = packed.scatter([s.ref_logprobs for s in mb]).to(self.device) if lc.kl_coef and not lc.kl_in_reward else None
        per_token = isinstance(mb[0].advantage, list)
        adv = (packed.scatter([s.advantage for s in mb]) if per_token
               else torch.tensor([s.advantage for s in mb], dtype=torch.float32)).to(self.device)
        keep = torch.tensor([[float(s.in_loss)] for s in mb], device=self.device)
        packed = packed.to(self.device)
        mask = packed.completion_mask * keep
        if any(s.loss_mask is not None for s in mb):  # tool turns: in the context, out of the loss
            mask = mask * packed.scatter([s.loss_mask or [1] * len(s.completion_ids) for s in mb]).to(self.device)
        logp, entropy = token_logprobs(self.engine, packed, lc.temperature, "grad" if lc.entropy_coef else "log",
                                       logits_dtype=self.cfg.logits_dtype, sp=self.sp)
        tok_loss, parts = grpo_token_losses(logp, old, adv, lc, ref, mask)
        loss = aggregate(tok_loss, mask, lc.loss_type, denom)
        if lc.entropy_coef:
            loss = loss - lc.entropy_coef * aggregate(entropy, mask, "dapo", tokens)
        loss = loss * self.world_size * weight
        if own is not None and weight:
            own.update((id(s), lp) for s, lp in zip(mb, packed.gather(logp.detach().cpu())))
        stats = self._grpo_stats(loss, parts, logp.detach() - old, entropy, mask.bool())
        return loss / self.cfg.sequence_parallel_size, stats

    def _grpo_stats(self, loss, parts: dict, logp_diff, entropy, m) -> GrpoStats:
        ratio = parts["ratio"][m]
        return GrpoStats(
            tokens=float(m.sum()), loss_sum=float(loss.detach()) / self.world_size,
            kl_sum=float(parts["kl"][m].sum()) if "kl" in parts else 0.0,
            clipped=float(parts["clipped"][m].sum()), ratio_sum=float(ratio.sum()),
            ratio_max=float(ratio.max()) if ratio.numel() else -math.inf,
            ratio_min=float(ratio.min()) if ratio.numel() else math.inf,
            is_weight_sum=float(parts["is_weight"][m].sum()), is_truncated=float(parts["is_truncated"][m].sum()),
            logp_diff_abs_sum=float(logp_diff[m].abs().sum()), entropy_sum=float(entropy.detach()[m].sum()))

    def reference_logprobs(self, samples: list[TrainSample]) -> list[np.ndarray]:
        """LoRA: the reference log-probs of ``samples`` (per completion token, as
        ``Reference.logprobs``) from this rank's own weights with the adapters switched off: the
        frozen base, so no second copy of the model exists. Runs between train steps (the rank
        takes one call at a time); ZeRO-0/1/2 hold the whole base on every rank."""
        if self.cfg.lora is None:
            raise RuntimeError("LearnerRank.reference_logprobs: the learner has no LoRA adapters to switch off "
                               "(learner.lora is null); the reference actor computes the reference log-probs")
        with self.spans.span("ref_logprobs", samples=len(samples)):
            self.engine.eval()
            with self.engine.module.disable_adapter():
                return completion_logprobs(self.engine, samples, self.pad_id, self.cfg.micro_batch_size,
                                           self.cfg.loss.temperature, self.cfg.logits_dtype, self.device)

    def _lora_layers(self) -> list:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.engine.module.modules() if isinstance(m, LoraLayer)]

    def rebase_adapters(self) -> None:
        """LoRA: fold the adapters into the frozen base weights and start them again from zero
        (B = 0; A keeps its values, as after peft's own initialisation only B is zero), so the
        policy is unchanged and "adapters off" is now this policy: after an SFT warm-up, the
        reference (adapters off) is the warmed-up model, as a separate reference actor would
        be. Every rank does the same arithmetic as peft's merge (``checkpoint-sft``, merged by
        ``save_hf`` just before, holds exactly these base weights). DeepSpeed's fp32 copies of
        the trained B (ZeRO-1/2, bf16) are zeroed with them; Adam's moments are cleared by the
        next ``start_phase``."""
        from deepspeed.utils import safe_set_full_fp32_param

        with torch.no_grad():
            for layer in self._lora_layers():
                for name in layer.active_adapters:
                    if name not in layer.lora_A:
                        continue
                    base = layer.get_base_layer().weight
                    base.data += layer.get_delta_weight(name).to(base.dtype)
                    b = layer.lora_B[name].weight
                    b.data.zero_()
                    safe_set_full_fp32_param(b, torch.zeros_like(b, dtype=torch.float32))
        self._base_changed = True

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapters' tensors under the peft model's own names (what a peft model with the
        same LoraConfig loads)."""
        return {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items() if "lora_" in k}

    def _base_state(self) -> dict[str, torch.Tensor]:
        """The frozen base weights under the plain model's names (``from_pretrained``'s)."""
        base = self.engine.module.get_base_model()
        return {k.replace(".base_layer.", "."): v.detach().cpu() for k, v in base.state_dict().items()
                if "lora_" not in k}

    def _full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (ZeRO-3 shards are gathered; every rank must call this)."""
        import deepspeed

        module = self.engine.module
        if self.cfg.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if self.rank == 0 else None
        else:
            state = {k: v.detach().cpu() for k, v in module.state_dict().items()} if self.rank == 0 else None
        return state

    def export_weights(self, dtype: str = "float32") -> bytes | None:
        """Serialised weights (rank 0), what generators and the reference load: the full state
        dict; with LoRA ``{"adapter": adapters}``, plus ``"base"`` (plain names) when the base
        moved since the last export (``rebase_adapters``)."""
        with self.spans.span("export_weights"):
            return self._export(dtype)

    def _export(self, dtype: str) -> bytes | None:
        target = getattr(torch, dtype)
        if self.cfg.lora is not None:
            with_base, self._base_changed = self._base_changed, False
            if self.rank != 0:  # ZeRO-0/1/2: rank 0 holds them whole
                return None
            parts = {"adapter": self._adapter_state(), **({"base": self._base_state()} if with_base else {})}
            blob = {part: {k: v.to(target) for k, v in state.items()} for part, state in parts.items()}
        else:
            state = self._full_state_dict()
            if state is None:
                return None
            blob = {k: v.to(target) for k, v in state.items()}
        buf = io.BytesIO()
        torch.save(blob, buf)
        return buf.getvalue()

    def init_weight_transfer(self, client, backend: str, master_address: str, master_port: int, world_size: int,
                             bucket_bytes: int, dtype: str, timeout_s: float = 600.0) -> dict:
        """Open vLLM's weight-transfer channel to the generators (all ranks call this; rank 0
        is the sender and drives ``client``, the generators' side of the handshake). Called
        again when generators come and go: the previous channel is closed first. An empty
        ``master_address`` / port 0: rank 0's node and a port free there now.

        Returns ``{"lost": names}``: generators of ``client`` that did not answer a ping, in
        which case no channel is opened (a rendezvous would wait for them) and every transfer
        until the next one is skipped; the driver re-forms the group without them."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from .weight_transfer import state_source, trainer_init_info

        if getattr(self, "_transfer", None) is not None:
            try:
                self._transfer.shutdown()
            except Exception as e:  # noqa: BLE001 - a broken channel is replaced either way
                log.warning("closing the previous weight-transfer channel: %s", e)
        self._transfer, self._client = None, client
        device = str(self.device) if backend in ("nccl", "ipc") else "cpu"
        self._source = state_source(self.engine.module, getattr(torch, dtype), device, bucket_bytes,
                                    self.cfg.zero_stage == 3)
        lost = client.unreachable() if self.rank == 0 else []
        if lost:
            return {"lost": lost}
        if self.rank == 0:
            from .server import free_port, node_ip

            master_address, master_port = master_address or node_ip(), master_port or free_port()
        info = trainer_init_info(backend, self.rank, master_address, master_port, world_size, bucket_bytes, timeout_s)
        self._transfer = WeightTransferTrainerFactory.trainer_init(info, client=client, source=self._source)
        return {"lost": []}

    def send_weights(self, version: int) -> dict:
        """Broadcast the current weights as ``version`` (all ranks call this).

        Returns ``{"seconds": s, "lost": names}``. Rank 0 pings the generators first: when one
        is gone nothing is sent and no generator is paused (``lost`` names them; the others
        keep their weights). Every rank still walks the whole state dict, as under ZeRO-3 the
        ranks gather each bucket together, also when the broadcast fails half-way (then it
        raises afterwards)."""
        t0 = time.perf_counter()
        key = self.spans.begin("send_weights", version=version)
        try:
            lost = []
            if self.rank == 0:
                lost = self._client.unreachable() if self._transfer is not None else ["the weight-transfer group"]
            self._source.active = None
            if lost:
                self._source.drain()
            else:
                self._client.version = version
                try:
                    self._transfer.send_weights()
                except BaseException:
                    self._source.drain()
                    raise
        finally:
            # rank 0 waits inside the transfer while the generators pause (generator.pause_mode
            # wait: until their running sequences end): that wait is no busy time of its own,
            # nor, under ZeRO-3, of the other ranks', held in the gathers meanwhile
            client = getattr(self, "_client", None) if self.rank == 0 else None
            paused = getattr(client, "paused", None)
            if client is not None:
                client.paused = None
            if self.cfg.zero_stage == 3 and self.world_size > 1:
                paused = self._rank0s(paused)
            self.spans.end(key, gap=paused, gap_kind="await_generators")
        return {"seconds": time.perf_counter() - t0, "lost": lost}

    def _rank0s(self, interval: tuple[float, float] | None) -> tuple[float, float] | None:
        """Rank 0's ``interval`` on every rank (a collective: every rank calls it). Never
        raises: a failed broadcast (a rank gone) gives None, and the error that ended the
        transfer is the one reported."""
        import torch.distributed as dist

        t = torch.tensor(interval if interval is not None else (math.nan, math.nan), dtype=torch.float64,
                         device=self.device)
        try:
            dist.broadcast(t, 0)
        except Exception as e:  # noqa: BLE001 - only the span's split is lost
            log.warning("sharing rank 0's wait for the generators: %s", e)
            return None
        a, b = t.tolist()
        return None if math.isnan(a) else (a, b)

    def save_checkpoint(self, path: str, tag: str) -> dict:
        """DeepSpeed checkpoint of the training state (every rank calls this: each writes its
        optimizer shard): weights, optimizer moments, the lr scheduler, and this rank's RNG
        states, so that a resumed run continues as this one would have. Returns the size and
        sha256 of the files this rank wrote (rank 0: also those no rank's name is in), so the
        ranks hash their shards in parallel: ``{"path": ..., "files": {name: record}}``."""
        import random

        with self.spans.span("save_checkpoint", tag=tag):
            self.engine.save_checkpoint(path, tag=tag, save_latest=False)
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
            torch.save(rng, os.path.join(path, tag, f"rng_rank{self.rank}.pt"))
            files = self._own_files(os.path.join(path, tag))
            if storage.uri_of(path):  # on object storage: this rank's files uploaded while it trains on
                self.uploads.append(storage.Upload(os.path.join(path, tag), list(files)))
            return {"path": os.path.join(path, tag), "files": files}

    def wait_uploads(self) -> int:
        """Wait for this rank's checkpoint uploads (``save_checkpoint`` on object storage); the
        bytes sent. Raises the first that failed."""
        uploads, self.uploads = self.uploads, []
        return sum(u.wait() for u in uploads)

    def _own_files(self, folder: str) -> dict:
        """Size and sha256 of the files of ``folder`` that this rank wrote: DeepSpeed's and ours
        name the rank (``zero_pp_rank_1_...``, ``rng_rank1.pt``; ``mp_rank_00`` is the model-parallel
        rank, not ours); rank 0 takes the files that name none."""
        import re

        out = {}
        for name in sorted(os.listdir(folder)):
            m = re.search(r"(?<!mp_)rank_?(\d+)", name)
            full = os.path.join(folder, name)
            if os.path.isfile(full) and (int(m.group(1)) if m else 0) == self.rank:
                out[name] = file_record(full)
        return out

    def load_checkpoint(self, path: str, tag: str) -> None:
        """Restore what ``save_checkpoint`` wrote (all ranks; same world size)."""
        import random

        storage.pull(os.path.join(path, tag))  # on object storage: what another node wrote
        rng_file = os.path.join(path, tag, f"rng_rank{self.rank}.pt")
        if not os.path.exists(rng_file):
            raise FileNotFoundError(f"learner rank {self.rank}: no checkpoint {tag!r} under {path} (no {rng_file})")
        loaded, _ = self.engine.load_checkpoint(path, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"learner rank {self.rank}: DeepSpeed found no checkpoint {tag!r} under {path}")
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save_hf(self, path: str, adapter_base: str | None = None) -> str | None:
        """HF-format checkpoint (``from_pretrained`` loads it) written by rank 0. With LoRA the
        adapters merged into a copy (training goes on unmerged), and, given ``adapter_base``
        (the model the adapters apply to: the run's start, or its warmed-up checkpoint-sft),
        the adapters alone in ``<path>/adapter`` (peft's ``PeftModel.from_pretrained``)."""
        if self.cfg.lora is not None:
            if self.rank != 0:
                return None
            import copy

            merged = copy.deepcopy(self.engine.module).merge_and_unload()
            merged.save_pretrained(path)
            self.tokenizer.save_pretrained(path)
            if adapter_base is not None:
                config = self.engine.module.peft_config["default"]
                config.base_model_name_or_path, before = adapter_base, config.base_model_name_or_path
                try:
                    self.engine.module.save_pretrained(os.path.join(path, "adapter"))
                finally:
                    config.base_model_name_or_path = before
            storage.push(path)
            return path
        state = self._full_state_dict()
        if state is None:
            return None
        self.engine.module.save_pretrained(path, state_dict=state)
        self.tokenizer.save_pretrained(path)
        storage.push(path)  # on object storage: uploaded before the call returns
        return path

    def drain_spans(self) -> list[dict]:
        return self.spans.drain()

    # -- colocate (placement.mode colocate): a generator on this rank's own module -----------
    def host_generator(self, cfg, seed: int = 0, rollout=None) -> None:
        """Start an ``hf`` generator in this process that generates with this rank's module:
        one copy of the weights, and no weight sync (``adopt_weights`` labels the versions).
        ZeRO-0/1/2 hold the whole module on every rank."""
        self.generator = Generator(self.model_path, cfg, seed, device=str(self.device), rollout=rollout,
                                   module=self.engine.module)

    def generate(self, prompts: list[dict], n: int, sampling, greedy: bool = False, chunk_tokens: int = 0,
                 first_sample: int = 0) -> list:
        """``Generator.generate`` on the hosted generator, the module in eval mode (no dropout);
        training sets train mode again."""
        self.engine.module.eval()
        return self.generator.generate(prompts, n, sampling, greedy, chunk_tokens, first_sample)

    def adopt_weights(self, version: int) -> float:
        """Colocate: the module is already the new policy; later tokens are labelled ``version``."""
        self.generator.version = version
        return 0.0

    def drain_generator_spans(self) -> list[dict]:
        return self.generator.drain_spans()

    def ping(self) -> str:
        return "ok"

    def sees(self, path: str) -> str | None:
        """None when this rank's machine sees the file ``path`` (one the driver wrote in the run
        directory, where this rank writes its checkpoint shards); else the machine's name."""
        import socket

        return None if os.path.isfile(path) else socket.gethostname()
