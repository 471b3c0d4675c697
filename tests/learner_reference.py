"""The plain PyTorch step every learner configuration must equal, and the harness that runs the
learner (DeepSpeed, any ZeRO stage, one or two ranks over gloo) on the same batches.

The reference has no DeepSpeed and no micro-batches: the HF model's own forward over the whole
batch (full logits, ``log_softmax``: not the learner's chunked head), the loss of
``actors/loss.py`` on it, ``loss.backward()``, ``clip_grad_norm_``, torch's AdamW. Only
``bnpo``, whose loss TRL defines per micro-batch, is summed over the learner's micro-batches.

A learner run starts from the same weights (rank 0's full state right after ``setup``, which
also carries LoRA's random adapter initialisation to the reference) and returns, per step, the
loss and the gradient norm, and the full weights after the last step.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from r1ray.actors.batching import item_tokens, learner_shards, micro_batch_plan, shard_indices, step_micro_batches
from r1ray.actors.learner import GrpoStats, LearnerConfig, LearnerRank, OptimConfig, SftStats
from r1ray.actors.lora import LoraConfig
from r1ray.actors.loss import LossConfig, aggregate, global_denominator, grpo_token_losses
from r1ray.actors.packing import SftExample
from r1ray.actors.rollout import TrainSample

LR = 2e-3
OPTIM = OptimConfig(lr=LR, weight_decay=0.01, betas=(0.9, 0.99), grad_clip=1.0)


@dataclass
class Case:
    """One learner configuration and what it trains on."""

    name: str
    kind: str  # "grpo" | "sft"
    zero_stage: int
    micro_batch_size: int
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig | None = None
    dtype: str = "float32"
    packed: bool = False  # sft: two examples to a row
    steps: int = 3
    max_tokens: int | None = None  # learner.max_tokens_per_micro_batch
    sp: int = 1  # learner.sequence_parallel_size
    checkpointing: bool = False  # learner.gradient_checkpointing

    def learner_config(self, ranks: int) -> LearnerConfig:
        return LearnerConfig(num_ranks=ranks, zero_stage=self.zero_stage, micro_batch_size=self.micro_batch_size,
                             max_tokens_per_micro_batch=self.max_tokens, sequence_parallel_size=self.sp,
                             gradient_checkpointing=self.checkpointing, dtype=self.dtype, optim=OPTIM,
                             loss=self.loss, lora=self.lora)


# ---- the batches -------------------------------------------------------------------------------

MAX_NEW = 24


def grpo_batches(model_path: str, steps: int, size: int = 12, seed: int = 0) -> list[list[TrainSample]]:
    """``steps`` batches of ``size`` samples: chat prompts of the tiny world, random completions
    of 1..MAX_NEW tokens, behaviour log-probs of the initial model plus noise (so ratios move off
    1 and some tokens clip), reference log-probs likewise, mixed-sign advantages, and one
    sample per batch kept out of the loss (a truncated completion)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        samples = []
        for k in range(size):
            a, b = rng.randint(100, 999), rng.randint(100, 999)
            prompt = tok.apply_chat_template([{"role": "user", "content": f"{a}+{b}"}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
            completion = [rng.randint(3, model.config.vocab_size - 1) for _ in range(rng.randint(1, MAX_NEW))]
            samples.append(TrainSample(list(prompt), completion, advantage=rng.gauss(0.0, 1.0), in_loss=k != 4))
        with torch.no_grad():
            lp = plain_logprobs(model, samples)
        for s, row in zip(samples, lp):
            s.logprobs = (row + 0.15 * torch.randn(row.shape, generator=gen)).tolist()
            s.ref_logprobs = (row + 0.3 * torch.randn(row.shape, generator=gen)).tolist()
        batches.append(samples)
    return batches


def sft_batches(steps: int, size: int = 12, vocab: int = 260, seed: int = 1) -> list[list[SftExample]]:
    """Examples of 6..40 tokens, the trained part (the "assistant turn") the last 3..all-but-2."""
    rng = random.Random(seed)
    batches = []
    for _ in range(steps):
        batch = []
        for _ in range(size):
            n = rng.randint(6, 40)
            trained = rng.randint(3, n - 2)
            batch.append(SftExample([rng.randint(3, vocab - 1) for _ in range(n)], [0] * (n - trained) + [1] * trained))
        batches.append(batch)
    return batches


def sft_rows(examples: list[SftExample], packed: bool) -> list[list[SftExample]]:
    return [examples[i:i + 2] for i in range(0, len(examples), 2)] if packed else [[e] for e in examples]


# ---- the reference -----------------------------------------------------------------------------

def _padded(prompts, completions, pad_id: int = 0):
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width - 1))
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, :len(p) + len(c)] = torch.tensor(list(p) + list(c))
        attn[b, :len(p) + len(c)] = 1
        mask[b, len(p) - 1:len(p) + len(c) - 1] = 1
    return ids, attn, mask


def full_logprobs(model, ids, attn, temperature: float = 1.0):
    """Every position's next-token log-prob from the model's own forward (the whole vocabulary)."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
    logp = F.log_softmax(logits, -1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1), logits


def plain_logprobs(model, samples: list[TrainSample]) -> list[torch.Tensor]:
    ids, attn, mask = _padded([s.prompt_ids for s in samples], [s.completion_ids for s in samples])
    lp, _ = full_logprobs(model, ids, attn)
    return [lp[b][mask[b].bool()] for b in range(len(samples))]


def _scatter(mask, rows):
    out = torch.zeros(mask.shape)
    out[mask.bool()] = torch.tensor([v for r in rows for v in r], dtype=torch.float32)
    return out


def reference_grpo_loss(model, samples: list[TrainSample], cfg: LossConfig, denom: float, tokens: float,
                        old: list | None = None):
    """The whole batch's loss (its value is what the learner's ``loss`` metric sums to) and the
    log-probs it was computed from."""
    ids, attn, mask = _padded([s.prompt_ids for s in samples], [s.completion_ids for s in samples])
    logp, logits = full_logprobs(model, ids, attn, cfg.temperature)
    old_lp = _scatter(mask, old if old is not None else [s.logprobs for s in samples])
    ref = _scatter(mask, [s.ref_logprobs for s in samples]) if cfg.kl_coef and not cfg.kl_in_reward else None
    per_token = isinstance(samples[0].advantage, list)
    adv = _scatter(mask, [s.advantage for s in samples]) if per_token else torch.tensor([s.advantage for s in samples])
    keep = mask * torch.tensor([[float(s.in_loss)] for s in samples])
    tok_loss, _ = grpo_token_losses(logp, old_lp, adv, cfg, ref, keep)
    if cfg.loss_type == "bnpo":
        raise ValueError("bnpo: use reference_bnpo_loss (its loss is defined per micro-batch)")
    loss = aggregate(tok_loss, keep, cfg.loss_type, denom)
    if cfg.entropy_coef:
        entropy = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
        loss = loss - cfg.entropy_coef * aggregate(entropy, keep, "dapo", tokens)
    return loss, [logp[b][mask[b].bool()].detach().tolist() for b in range(len(samples))]


def micro_batches_of(lengths: list[int], ranks: int, micro_batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """How the learner cuts a batch of rows of ``lengths`` tokens: rank shards, then each
    shard's micro-batches (indices into the batch)."""
    out = []
    for part in shard_indices(lengths, ranks, max_tokens):
        plan = micro_batch_plan([lengths[i] for i in part], micro_batch_size, max_tokens)
        out += [[part[i] for i in mb] for mb in plan]
    return out


def reference_run(model_path: str, case: Case, ranks: int, init_state: dict, batches: list) -> dict:
    """The reference's losses, gradient norms and final weights over ``batches``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if case.lora is not None:
        import peft

        lc = case.lora
        model = peft.get_peft_model(model, peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                           task_type="CAUSAL_LM", target_modules="all-linear"))
    model.load_state_dict(init_state, strict=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=OPTIM.lr, betas=OPTIM.betas, weight_decay=OPTIM.weight_decay)
    losses, norms = [], []
    for batch in batches:
        if case.kind == "sft":
            loss, total = _reference_sft_loss(model, batch)
            iterations = [loss.detach()]
        else:
            iterations = []
        own = None
        for it in range(case.loss.num_iterations if case.kind == "grpo" else 1):
            if case.kind == "grpo":
                loss, lp = _reference_grpo_iteration(model, batch, case, ranks, own)
                own = lp if it == 0 else own
                iterations.append(loss.detach())
            optimizer.zero_grad()
            loss.backward()
            norms_it = torch.nn.utils.clip_grad_norm_(params, OPTIM.grad_clip)
            optimizer.step()
        losses.append(sum(float(x) for x in iterations) / len(iterations))
        norms.append(float(norms_it))
    return {"loss": losses, "grad_norm": norms, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _reference_grpo_iteration(model, batch, case: Case, ranks: int, own):
    lc = case.loss
    lengths = [len(s.completion_ids) if s.in_loss else 0 for s in batch]
    tokens = float(max(sum(lengths), 1))
    if lc.loss_type != "bnpo":
        denom = global_denominator(lc.loss_type, lengths, MAX_NEW, 1)
        return reference_grpo_loss(model, batch, lc, denom, tokens, own)
    sizes = [item_tokens(s) for s in batch]
    mbs = micro_batches_of(sizes, ranks // case.sp, case.micro_batch_size, case.max_tokens)
    n = step_micro_batches(sizes, ranks // case.sp, case.micro_batch_size, case.max_tokens)
    loss, lp = 0.0, [None] * len(batch)
    for idx in mbs:  # TRL's bnpo: each micro-batch's token mean / micro-batches in the step
        part, part_lp = reference_grpo_loss(model, [batch[i] for i in idx], dataclasses.replace(lc, loss_type="dapo"),
                                            1.0, tokens, None if own is None else [own[i] for i in idx])
        keep = sum(lengths[i] for i in idx)
        loss = loss + part * (1.0 / max(keep, 1)) / n if keep else loss + part * 0.0
        for i, row in zip(idx, part_lp):
            lp[i] = row
    return loss, lp


def _reference_sft_loss(model, examples: list[SftExample]):
    """Summed NLL of every trained token / the batch's trained tokens, each example alone."""
    total = sum(e.targets for e in examples)
    nll = 0.0
    for e in examples:
        ids = torch.tensor([e.ids])
        lp, _ = full_logprobs(model, ids, torch.ones_like(ids))
        nll = nll - (lp[0] * torch.tensor(e.trained[1:], dtype=torch.float32)).sum()
    return nll / total, total


# ---- the learner under DeepSpeed ---------------------------------------------------------------

def learner_run(model_path: str, case: Case, rank: int, ranks: int, port: int, batches: list) -> dict | None:
    """The same steps through ``LearnerRank`` (rank ``rank`` of ``ranks``); rank 0 returns the
    combined metrics per step, the initial and the final full weights."""
    import torch.distributed as dist

    learner = LearnerRank(model_path, case.learner_config(ranks), rank=rank, world_size=ranks, seed=0)
    learner.setup("127.0.0.1", port)
    learner.start_phase(lr=OPTIM.lr)
    init = learner._full_state_dict()
    init = None if init is None else {k: v.clone() for k, v in init.items()}  # ZeRO-0/1/2: live tensors
    losses, norms = [], []
    for batch in batches:
        if case.kind == "sft":
            total = sum(e.targets for e in batch)
            rows = learner_shards(sft_rows(batch, case.packed), ranks, case.max_tokens, case.sp)[rank]
            stats = learner.sft_step(rows, total)
            parts = [None] * ranks
            dist.all_gather_object(parts, stats)
            metrics = SftStats.combine(parts, total)
        else:
            lc = case.loss
            lengths = [len(s.completion_ids) if s.in_loss else 0 for s in batch]
            denom = global_denominator(lc.loss_type, lengths, MAX_NEW, step_micro_batches(
                [item_tokens(s) for s in batch], ranks // case.sp, case.micro_batch_size, case.max_tokens))
            stats = learner.grpo_step(learner_shards(batch, ranks, case.max_tokens, case.sp)[rank], denom,
                                      float(max(sum(lengths), 1)))
            parts = [None] * ranks
            dist.all_gather_object(parts, stats)
            metrics = GrpoStats.combine(parts)
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
    state = learner._full_state_dict()
    engine = learner.engine
    extra = {"data_types": tuple(str(t) for t in engine.get_data_types()), "zero_stage": engine.zero_optimization_stage()}
    del learner, engine
    gc.collect()
    if rank != 0:
        return None
    return {"loss": losses, "grad_norm": norms, "init": init, "state": state, **extra}


def _worker(index: int, ranks: int, ports: list[int], model_path: str, cases: list[Case], batches: dict,
            out_dir: str):
    """Process ``index``: rank ``index % ranks`` of world ``index // ranks``, which takes every
    ``len(ports)``-th case. ``batches``: each case's, by its name."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    world, rank = divmod(index, ranks)
    results = {}
    for case in cases[world::len(ports)]:
        results[case.name] = learner_run(model_path, case, rank, ranks, ports[world], batches[case.name])
    if rank == 0:
        torch.save(results, os.path.join(out_dir, f"results-{world}.pt"))


def run_world(model_path: str, cases: list[Case], ranks: int, batches: dict, out_dir: str, worlds: int = 1) -> dict:
    """Every case through a learner world of ``ranks`` processes (one process group for all its
    cases); ``batches`` maps each case's name to its batches. ``worlds`` > 1: as many independent
    worlds side by side, taking the cases in turn (a world of one rank keeps one core busy)."""
    import torch.multiprocessing as mp

    from r1ray.cluster.groups import free_port

    ports: list[int] = []
    while len(ports) < worlds:
        if (port := free_port()) not in ports:
            ports.append(port)
    mp.start_processes(_worker, args=(ranks, ports, model_path, cases, batches, out_dir), nprocs=ranks * worlds,
                       start_method="spawn")
    results = {}
    for world in range(worlds):
        results.update(torch.load(os.path.join(out_dir, f"results-{world}.pt"), weights_only=False))
    return results


def weight_gap(a: dict, b: dict, start: dict) -> float:
    """||a - b|| / ||b - start|| over every tensor: the disagreement relative to the update."""
    diff = math.sqrt(sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in b))
    moved = math.sqrt(sum(float((b[k].float() - start[k].float()).pow(2).sum()) for k in b))
    return diff / max(moved, 1e-30)


def learner_logprob_gap(learner: LearnerRank, rollouts, temperature: float) -> float:
    """The worst |behaviour - learner| log-prob over every sampled token of ``rollouts``: the
    learner's own log-probs (through its DeepSpeed engine, as a step computes them)."""
    from r1ray.actors.batching import pad_batch, token_logprobs

    packed = pad_batch([r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts], learner.pad_id)
    with torch.no_grad():
        lp = packed.gather(token_logprobs(learner.engine, packed, temperature))
    return max(abs(a - b) for r, row in zip(rollouts, lp) for a, b in zip(r.logprobs, row))
