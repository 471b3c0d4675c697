"""Turning rollouts into padded tensors and per-token log-probs (shared by learner and reference)."""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class TokenBatch:
    """The token rows of one model call: right-padded prompt+completion sequences (``pad_batch``),
    or packed SFT rows (``packing.sft_batch``).

    ``completion_mask[b, t]`` is 1 where token ``t + 1`` of row ``b`` is a completion token,
    i.e. on the positions whose next-token log-prob the loss uses (shape ``[B, L - 1]``).
    Packed SFT rows (``actors/packing.py``) carry ``position_ids`` restarting at 0 for every
    example and no ``attention_mask``: transformers then masks attention block-diagonally.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    completion_mask: torch.Tensor
    position_ids: torch.Tensor | None = None

    def scatter(self, per_sample: Sequence[Sequence[float]]) -> torch.Tensor:
        """Place per-completion-token values (e.g. behaviour log-probs) into the ``[B, L-1]`` layout."""
        out = torch.zeros(self.completion_mask.shape, dtype=torch.float32)
        # (lists, or float32 arrays: read-only when Ray unpickled them from its object store, so
        # joined by numpy into a new array, not wrapped by torch, which warns of writing to them)
        rows = [np.asarray(row, dtype=np.float32).reshape(-1) for row in per_sample]
        out[self.completion_mask.bool()] = torch.from_numpy(np.concatenate(rows)) if rows else torch.zeros(0)
        return out

    def rows(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of ``scatter``: per sample, the values on its completion positions."""
        mask = self.completion_mask.bool()
        return [values[b][mask[b]] for b in range(values.shape[0])]

    def gather(self, values: torch.Tensor) -> list[list[float]]:
        """``rows`` as lists."""
        return [row.tolist() for row in self.rows(values)]

    def to(self, device) -> "TokenBatch":
        def move(t):
            return None if t is None else t.to(device)

        return TokenBatch(move(self.input_ids), move(self.attention_mask), move(self.completion_mask),
                      move(self.position_ids))

    def model_inputs(self) -> dict:
        """The forward's inputs: ids with the attention mask, or with per-example position ids (packed)."""
        if self.position_ids is not None:
            return {"input_ids": self.input_ids, "position_ids": self.position_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def item_tokens(item) -> int:
    """The tokens of one training row: a sample's prompt and completion, or a (packed) SFT row's examples."""
    if hasattr(item, "completion_ids"):
        return len(item.prompt_ids) + len(item.completion_ids)
    return sum(len(e.ids) for e in item)


def micro_batch_plan(lengths: Sequence[int], micro_batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """The micro-batches of one rank's share, as indices into it.

    Counted (``max_tokens`` None): ``micro_batch_size`` rows at a time, in order. Token budget
    (veRL's dynamic batch size): longest first, each micro-batch at most ``micro_batch_size``
    rows whose padded size (rows x its longest) is at most ``max_tokens``; a row longer than the
    budget goes alone. Rows of like lengths share a micro-batch, so a short one is not padded to
    a long one's length, and many short rows fill the slot of one long one. The loss is
    normalised by counts of the whole batch, so the plan changes the speed, not the step."""
    n = len(lengths)
    if max_tokens is None:
        return [list(range(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]
    plan: list[list[int]] = []
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        if plan and len(plan[-1]) < micro_batch_size and (len(plan[-1]) + 1) * lengths[plan[-1][0]] <= max_tokens:
            plan[-1].append(i)  # sorted longest first: the micro-batch's first row is its longest
        else:
            plan.append([i])
    return plan


def shard_indices(lengths: Sequence[int], ranks: int, max_tokens: int | None = None) -> list[list[int]]:
    """Which rows each rank trains on (indices, in order). Counted: contiguous near-equal
    shards (a prompt's group stays together). Token budget: balanced by tokens, not by count:
    longest first, each to the rank with the fewest tokens so far (fewest rows on a tie)."""
    n = len(lengths)
    if max_tokens is None:
        size, extra = divmod(n, ranks)
        bounds = [r * size + min(r, extra) for r in range(ranks + 1)]
        return [list(range(bounds[r], bounds[r + 1])) for r in range(ranks)]
    parts: list[list[int]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        r = min(range(ranks), key=lambda r: (load[r], len(parts[r]), r))
        parts[r].append(i)
        load[r] += lengths[i]
    return [sorted(p) for p in parts]


def learner_shards(items: Sequence, ranks: int, max_tokens: int | None = None, sequence_parallel: int = 1) -> list[list]:
    """``items`` (samples or SFT rows) cut into the ranks' shares (``shard_indices``); with
    sequence parallelism, each group of ``sequence_parallel`` consecutive ranks shares one."""
    parts = shard_indices([item_tokens(x) for x in items], ranks // sequence_parallel, max_tokens)
    return [[items[i] for i in part] for part in parts for _ in range(sequence_parallel)]


def step_micro_batches(lengths: Sequence[int], ranks: int, micro_batch_size: int, max_tokens: int | None = None) -> int:
    """Micro-batches in one step over all ranks: every rank takes as many as the busiest
    (``bnpo``'s denominator; the learner pads the others with zero-weight ones)."""
    return ranks * max(len(micro_batch_plan([lengths[i] for i in part], micro_batch_size, max_tokens))
                       for part in shard_indices(lengths, ranks, max_tokens))


def attention_kwargs(dtype: str) -> dict:
    """``from_pretrained`` kwargs: FlashAttention-2 when it is installed (the ``flash`` extra),
    a GPU is present and the model runs in 16 bits; otherwise transformers' default (SDPA)."""
    import importlib.util

    if dtype in ("bfloat16", "float16") and torch.cuda.is_available() and importlib.util.find_spec("flash_attn"):
        return {"attn_implementation": "flash_attention_2"}
    return {}


def pad_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """Prompt+completion rows right-padded to the longest, with the completion mask."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    cmask = torch.zeros((len(prompts), width - 1), dtype=torch.long)
    for b, (p, c, n) in enumerate(zip(prompts, completions, lengths)):
        # (a completion's ids are an int32 array from the generator; lists from anywhere else)
        ids[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
        ids[b, len(p) : n] = torch.as_tensor(c, dtype=torch.long)
        attn[b, :n] = 1
        cmask[b, len(p) - 1 : n - 1] = 1
    return TokenBatch(ids, attn, cmask)


def token_logprobs(model, packed: TokenBatch, temperature: float = 1.0, entropy: str = "no", chunk_tokens: int = 2048,
                   logits_dtype: str = "model", sp=None):
    """Log-prob of each next token under ``softmax(logits / temperature)``, shape ``[B, L-1]``
    (0 off the completion positions).

    The LM head runs only on completion positions, ``chunk_tokens`` at a time, each chunk's
    softmax in fp32 and, with gradients, recomputed in backward (activation checkpointing): the
    full ``[B, L, V]`` logits of a micro-batch (``B x L x 150k x 4`` bytes for a Qwen
    vocabulary) never exist at once. ``logits_dtype`` "model": the head's matmul runs in the
    model's dtype and its logits are upcast (what vLLM and transformers do: bf16 logits);
    "float32": the matmul itself in fp32 (no rounding of the logits to bf16's 8-bit mantissa).
    ``entropy`` "log" (no gradient) or "grad" also returns each position's entropy
    ``logsumexp(z) - sum softmax(z) z``. ``model`` is an HF causal LM or a DeepSpeed engine
    around one. ``sp`` (``actors/sequence_parallel.SequenceGroup``): this rank computes its
    share of the positions and the whole rows come back gathered from the group.
    """
    module = getattr(model, "module", model)
    if module is not model:  # a DeepSpeed engine: this runs as its module's forward, see engine_forward
        return engine_forward(model, _token_logprobs, packed, temperature, entropy, chunk_tokens, logits_dtype, sp)
    return _token_logprobs(module, module, packed, temperature, entropy, chunk_tokens, logits_dtype, sp)


@torch.no_grad()
def completion_logprobs(model, samples: Sequence, pad_id: int, micro_batch_size: int, temperature: float = 1.0,
                        logits_dtype: str = "model", device="cpu") -> list[np.ndarray]:
    """Per completion token log-probs of ``samples`` (anything with ``prompt_ids`` and
    ``completion_ids``) under ``model`` (as ``token_logprobs``), ``micro_batch_size`` at a time,
    without gradients: the reference's, and the learner's with its LoRA adapters off.

    One float32 array a sample (the values as computed, nothing rounded: the log-probs are
    float32 or narrower): they travel through the driver to the learners, and an array pickles
    as one buffer, about 3.7 µs out and back for a completion of 430 tokens on this machine
    against 15 µs as a list of Python floats (``benchmarks/simulate.py ray-costs``)."""
    out: list[np.ndarray] = []
    for i in range(0, len(samples), micro_batch_size):
        mb = samples[i : i + micro_batch_size]
        packed = pad_batch([s.prompt_ids for s in mb], [s.completion_ids for s in mb], pad_id)
        lp = token_logprobs(model, packed.to(device), temperature, logits_dtype=logits_dtype).float().cpu()
        out.extend(row.numpy() for row in packed.rows(lp))
    return out


def engine_forward(engine, fn, *args):
    """``fn(module, forward, *args)`` run as the forward of ``engine.module`` through ``engine.forward``.

    DeepSpeed expects every forward to go through the engine: ZeRO-3 advances its micro-step
    (without which each micro-batch's gradient *replaces* the previous one instead of adding
    to it) and ZeRO-1/2 clear their accumulation state in ``engine.forward``, and ZeRO-3's
    prefetch restarts its trace in the root module's forward pre-hook. The log-probs need the
    decoder and a chunked LM head, not the model's own forward (which would build the full
    logits), so ``fn`` stands in as the root module's forward for this one call: the module's
    hooks fire around it as around any forward (DeepSpeed's hybrid engine swaps ``forward``
    the same way); ``forward`` is the module's own, for ``fn`` to call inside."""
    module = engine.module
    own = module.__dict__.get("forward")  # an instance-level forward is put back afterwards
    forward = own or types.MethodType(type(module).forward, module)
    module.forward = lambda *a: fn(module, forward, *a)
    try:
        return engine(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _token_logprobs(module, forward, packed: TokenBatch, temperature: float, entropy: str, chunk_tokens: int,
                    logits_dtype: str, sp=None):
    cfg = getattr(module, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        if sp is not None:
            raise ValueError("learner.sequence_parallel_size > 1: this model post-processes its logits (softcapping or "
                             "a logit scale), which only the whole-vocabulary path applies; accepted: 1")
        return _full_token_logprobs(forward, packed, temperature, entropy)  # heads that post-process logits
    if sp is None:
        hidden = module.get_decoder()(**packed.model_inputs(), use_cache=False).last_hidden_state[:, :-1]
        return _head_logprobs(module, hidden, packed.input_ids[:, 1:], packed.completion_mask.bool(), temperature,
                              entropy, chunk_tokens, logits_dtype)
    ids, positions, targets, mask, width = _sequence_share(packed, sp)
    hidden = module.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    out = _head_logprobs(module, hidden, targets, mask, temperature, entropy, chunk_tokens, logits_dtype, True)
    return sp.gather(out)[:, :width - 1] if entropy == "no" else tuple(sp.gather(t)[:, :width - 1] for t in out)


def _sequence_share(packed: TokenBatch, sp):
    """Sequence parallelism: this rank's share of positions of right-padded rows (the width
    padded to a multiple of the group), with each position's next token and whether it is a
    completion target, taken from the whole rows before they are cut."""
    import torch.nn.functional as F

    if packed.position_ids is not None:
        raise ValueError("learner.sequence_parallel_size > 1 takes one sequence per row; packed rows (sft.packing) "
                         "would attend across examples")
    rows, width = packed.input_ids.shape
    extra = -width % sp.size
    ids = F.pad(packed.input_ids, (0, extra))
    positions = torch.arange(width + extra, device=ids.device).expand(rows, -1)
    targets = F.pad(packed.input_ids[:, 1:], (0, extra + 1))
    mask = F.pad(packed.completion_mask, (0, extra + 1)).bool()
    return sp.local(ids), sp.local(positions), sp.local(targets), sp.local(mask), width


def _head_logprobs(module, hidden, targets, mask, temperature: float, entropy: str, chunk_tokens: int,
                   logits_dtype: str, in_group: bool = False):
    """Log-probs (and entropies) ``[B, L]`` of ``targets`` from ``hidden`` ``[B, L, H]`` where
    ``mask``; 0 elsewhere. ``in_group``: this rank holds a share of the rows (sequence
    parallelism), see ``_head_calls``."""
    where = mask.reshape(-1).nonzero().squeeze(-1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)
    targets = targets.reshape(-1).index_select(0, where)
    head = module.get_output_embeddings()
    want = entropy != "no"
    grad = torch.is_grad_enabled()
    logps, ents = [], []
    for k in range(_head_calls(head, -(-h.shape[0] // chunk_tokens), in_group)):
        start = k * chunk_tokens  # past the end: an empty chunk
        args = (head, h[start : start + chunk_tokens], targets[start : start + chunk_tokens], temperature,
                want, entropy == "grad", logits_dtype == "float32" and h.dtype != torch.float32)
        if grad:
            lp, ent = torch.utils.checkpoint.checkpoint(_head_chunk, *args, use_reentrant=False)
        else:
            lp, ent = _head_chunk(*args)
        logps.append(lp)
        ents.append(ent)
    logp = torch.zeros(mask.numel(), dtype=torch.float32, device=hidden.device)
    logp = logp.index_put((where,), torch.cat(logps) if logps else logp[:0]).view(mask.shape)
    if not want:
        return logp
    ent = torch.zeros(mask.numel(), dtype=torch.float32, device=hidden.device)
    ent = ent.index_put((where,), torch.cat(ents) if ents else ent[:0]).view(mask.shape)
    return logp, ent


def _head_calls(head, chunks: int, in_group: bool) -> int:
    """How many chunks' head calls a micro-batch makes. ZeRO-3 gathers the head's weight at each
    call, a collective of every rank: every rank makes as many as the busiest, empty ones after
    its own (otherwise ranks with more completion tokens than others wait for them forever).
    A rank of a sequence-parallel group whose share holds no completion token makes one empty
    call: its loss stays tied to its decoder, whose backward meets the group's all-to-alls."""
    if in_group:
        chunks = max(chunks, 1)
    import torch.distributed as dist

    if hasattr(head.weight, "ds_id") and dist.is_initialized() and dist.get_world_size() > 1:
        most = torch.tensor([chunks], device=head.weight.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        chunks = int(most.item())
    return chunks


def _head_chunk(head, h, targets, temperature: float, want_entropy: bool, entropy_grad: bool, fp32: bool = False):
    logits = _fp32_head(head, h) if fp32 else head(h).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not want_entropy:
        return logp, logp.new_zeros(())
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        ent = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logp, ent


def _fp32_head(head, h):
    """``head(h)`` with the matmul in fp32. Called through the module, so that ZeRO-3's hooks
    gather the head's weight as for any forward (also when checkpointing recomputes it)."""
    def fp32_linear(x):
        bias = None if head.bias is None else head.bias.float()
        return torch.nn.functional.linear(x.float(), head.weight.float(), bias)

    head.forward = fp32_linear
    try:
        return head(h)
    finally:
        del head.forward


def _full_token_logprobs(model, packed: TokenBatch, temperature: float = 1.0, entropy: str = "no"):
    """The whole-vocabulary path (row by row logsumexp), for heads that post-process logits."""
    logits = model(**packed.model_inputs(), use_cache=False).logits
    logits = logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = packed.input_ids[:, 1:]
    out, entropies = [], []
    for row_logits, row_targets in zip(logits, targets):
        lse = torch.logsumexp(row_logits, dim=-1)
        out.append(row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1) - lse)
        if entropy != "no":
            with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
                entropies.append(lse - (torch.softmax(row_logits, dim=-1) * row_logits).sum(-1))
    logp = torch.stack(out) * packed.completion_mask
    return logp if entropy == "no" else (logp, torch.stack(entropies) * packed.completion_mask)
