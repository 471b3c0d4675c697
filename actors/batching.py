"""Turning rollouts into padded tensors and per-token log-probs (shared by learner and reference)."""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Sequence

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
        flat = torch.tensor([v for row in per_sample for v in row], dtype=torch.float32)
        out[self.completion_mask.bool()] = flat
        return out

    def gather(self, values: torch.Tensor) -> list[list[float]]:
        """Inverse of ``scatter``: per-sample lists of the values on completion positions."""
        rows = []
        for b in range(values.shape[0]):
            rows.append(values[b][self.completion_mask[b].bool()].tolist())
        return rows

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
    for b, (p, c) in enumerate(zip(prompts, completions)):
        seq = list(p) + list(c)
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[b, : len(seq)] = 1
        cmask[b, len(p) - 1 : len(seq) - 1] = 1
    return TokenBatch(ids, attn, cmask)


def token_logprobs(model, packed: TokenBatch, temperature: float = 1.0, entropy: str = "no", chunk_tokens: int = 2048,
                   logits_dtype: str = "model"):
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
    around one.
    """
    module = getattr(model, "module", model)
    if module is not model:  # a DeepSpeed engine: this runs as its module's forward, see engine_forward
        return engine_forward(model, _token_logprobs, packed, temperature, entropy, chunk_tokens, logits_dtype)
    return _token_logprobs(module, module, packed, temperature, entropy, chunk_tokens, logits_dtype)


@torch.no_grad()
def completion_logprobs(model, samples: Sequence, pad_id: int, micro_batch_size: int, temperature: float = 1.0,
                        logits_dtype: str = "model", device="cpu") -> list[list[float]]:
    """Per completion token log-probs of ``samples`` (anything with ``prompt_ids`` and
    ``completion_ids``) under ``model`` (as ``token_logprobs``), ``micro_batch_size`` at a time,
    without gradients: the reference's, and the learner's with its LoRA adapters off."""
    out: list[list[float]] = []
    for i in range(0, len(samples), micro_batch_size):
        mb = samples[i : i + micro_batch_size]
        packed = pad_batch([s.prompt_ids for s in mb], [s.completion_ids for s in mb], pad_id)
        lp = token_logprobs(model, packed.to(device), temperature, logits_dtype=logits_dtype)
        out.extend(packed.gather(lp.cpu()))
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
                    logits_dtype: str):
    cfg = getattr(module, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return _full_token_logprobs(forward, packed, temperature, entropy)  # heads that post-process logits
    hidden = module.get_decoder()(**packed.model_inputs(), use_cache=False).last_hidden_state[:, :-1]
    mask = packed.completion_mask.bool()
    where = mask.reshape(-1).nonzero().squeeze(-1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)
    targets = packed.input_ids[:, 1:].reshape(-1).index_select(0, where)
    head = module.get_output_embeddings()
    want = entropy != "no"
    grad = torch.is_grad_enabled()
    logps, ents = [], []
    for start in range(0, h.shape[0], chunk_tokens):
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
