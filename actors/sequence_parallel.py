"""Ulysses sequence parallelism on the learner (``learner.sequence_parallel_size``), through
DeepSpeed's own implementation (``deepspeed.runtime.sequence_parallel.ulysses_sp``, Arctic Long
Sequence Training).

``n`` consecutive learner ranks form a group that trains the same rows, each rank holding
1/n of every row's positions. Around each attention, DeepSpeed's ``UlyssesSPAttentionHF``
trades sequence for heads (all-to-all): a rank attends over the whole sequence with 1/n of
the heads, then trades back; every other layer, the LM head and the loss see 1/n of the
tokens, so activations shrink n-fold. Causality comes from the position ids (the rows are
right-padded and attended causally without a mask, as DeepSpeed requires).

The log-probs of a rank's positions are gathered (differentiably) into the whole row on every
rank of the group, so the loss is the loss of ``actors/loss.py`` on the same tensors as without
sequence parallelism; each rank takes 1/n of it (the gather's backward sums the n identical
losses' gradients) and DeepSpeed's average over all ranks does the rest.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_CORE: dict = {}  # attention implementation name -> transformers' own function, before ours replaced it


@dataclass
class SequenceGroup:
    """This rank's sequence-parallel group: ``size`` ranks, this one at ``rank`` in it."""

    group: object
    size: int
    rank: int

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's share of positions of ``t`` ``[B, W, ...]`` (``W`` a multiple of ``size``)."""
        chunk = t.shape[1] // self.size
        return t[:, self.rank * chunk:(self.rank + 1) * chunk].contiguous()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's share ``[B, W/size]`` back into ``[B, W]``, differentiably."""
        return _GatherPositions.apply(t, self)


class _GatherPositions(torch.autograd.Function):
    """All-gather along positions; backward: the sum over the group of the whole rows'
    gradients (every rank's loss is computed from the gathered rows), this rank's share of it.
    An all-reduce, which gloo and NCCL both have (gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, sp: SequenceGroup) -> torch.Tensor:
        import torch.distributed as dist

        ctx.sp, ctx.width = sp, t.shape[1]
        parts = [torch.empty_like(t) for _ in range(sp.size)]
        dist.all_gather(parts, t.contiguous(), group=sp.group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.sp.group)
        start = ctx.sp.rank * ctx.width
        return grad[:, start:start + ctx.width], None


def new_groups(world_size: int, rank: int, size: int) -> SequenceGroup:
    """Groups of ``size`` consecutive ranks (every rank calls this, in the same order)."""
    import torch.distributed as dist

    mine = None
    for start in range(0, world_size, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return SequenceGroup(mine, size, rank % size)


def attach(model, sp: SequenceGroup) -> None:
    """Route ``model``'s attention through DeepSpeed's Ulysses attention over ``sp``: the
    implementation's entry in transformers' registry is replaced once per process by a function
    that sends the modules of attached models through Ulysses and any other model (a reference
    in the same process, a test's plain model) to the original."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation
    if name not in ("sdpa", "flash_attention_2", "flash_attention_3"):
        raise ValueError(f"learner.sequence_parallel_size {sp.size}: the model attends with {name!r}; Ulysses needs "
                         "'sdpa' or FlashAttention (a mask-free causal kernel)")
    text = model.config.get_text_config()
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    if heads % sp.size or (kv % sp.size and sp.size % kv):
        raise ValueError(f"learner.sequence_parallel_size {sp.size}: the model has {heads} attention heads and {kv} "
                         "key/value heads; accepted: a size that divides the heads, and divides or is a multiple of "
                         "the key/value heads")
    if name not in _CORE:
        _CORE[name] = ALL_ATTENTION_FUNCTIONS[name]
        ALL_ATTENTION_FUNCTIONS[name] = _dispatch(name)
    ulysses = UlyssesSPAttentionHF(attn=_CORE[name], batch_size=1, attn_head_count=heads,
                                   attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // heads,
                                   kv_head_count=kv, num_hidden_layers=text.num_hidden_layers, process_group=sp.group,
                                   seq_length_is_variable=True)
    ulysses.core_attn_implementation = name
    for module in model.modules():
        module.__dict__["_r1ray_ulysses"] = ulysses  # a plain attribute: not a submodule of each module


def _dispatch(name: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        ulysses = getattr(module, "_r1ray_ulysses", None)
        if ulysses is None:
            return _CORE[name](module, query, key, value, attention_mask, *args, **kwargs)
        _resize(ulysses, query.shape[0])
        # The mask transformers built is for this rank's positions only; causality comes from
        # the gathered position ids (right-padded rows: a real token sees only real tokens).
        return ulysses(module, query, key, value, None, *args, **kwargs)

    return attention


def _resize(ulysses, batch: int) -> None:
    """DeepSpeed's Ulysses attention fixes the rows per micro-batch when it is built; ours vary
    (token-budget micro-batches, a last short one): set them per call. The sequence length it
    takes from the call itself (``seq_length_is_variable``)."""
    if ulysses.batch_size == batch:
        return
    ulysses.batch_size = batch
    for attr in ("required_query_shape", "required_key_value_shape", "required_context_shape"):
        shape = list(getattr(ulysses, attr))
        shape[1] = batch
        setattr(ulysses, attr, torch.Size(shape))
