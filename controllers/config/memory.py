"""Each learner rank's peak memory for a recipe, estimated before anything starts (``r1ray check``).

Static: weights, gradients and optimizer states by ZeRO stage (DeepSpeed partitions them over
all ranks: stage 1 the optimizer states, 2 also the gradients, 3 also the weights; bf16 keeps
fp32 master weights and accumulates gradients in fp32). Activations: what a decoder layer keeps
for backward per token, counted from the HF Qwen2/Llama layer (RMSNorm inputs and outputs, q/k/v
and RoPE's products, SDPA's inputs and output, the MLP's gate, up, activation and product;
``tests/unit/test_long_traces.py`` holds it to autograd's own saved tensors), times the tokens
of a micro-batch on the rank: its token budget (or rows x the longest row), over the
sequence-parallel size. With gradient checkpointing a layer keeps only its input, and one layer
at a time is recomputed in full. The chunked LM head adds one chunk's fp32 logits.

An estimate, not a measurement: allocator fragmentation, CUDA's context and communication
buffers come on top, hence the margin ``check_memory`` keeps.
"""
from __future__ import annotations

from dataclasses import dataclass

PROMPT_ALLOWANCE = 1024  # prompt tokens assumed before a completion when rows are counted
HEAD_CHUNK = 2048  # actors/batching.token_logprobs' chunk of LM-head positions
MARGIN = 0.9  # the estimate must stay under this share of a GPU's memory
GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config) -> "ModelShape":
        """From a transformers config (or its dict)."""
        c = config if isinstance(config, dict) else config.to_dict()
        c = c.get("text_config") or c
        heads = c["num_attention_heads"]
        return cls(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
                   kv_heads=c.get("num_key_value_heads") or heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // heads, intermediate=c["intermediate_size"],
                   vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)))

    @property
    def params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        layer = h * q + 2 * h * kv + q + 2 * kv + q * h + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def saved_per_token(self) -> int:
        """Elements one decoder layer keeps for backward per token (no dropout, SDPA)."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        norms = 2 * (h + h)  # two RMSNorms: input and normalised output
        attention = 3 * q + 5 * kv + q + q  # q, RoPE's q products; k, v, RoPE's k products; SDPA out; o_proj input
        mlp = 4 * self.intermediate  # gate, silu(gate), up, their product
        return norms + attention + mlp


def micro_batch_tokens(recipe, stages: tuple[str, ...]) -> int:
    """Tokens of the largest micro-batch a rank may be given (before sequence parallelism)."""
    lc = recipe.learner
    if lc.max_tokens_per_micro_batch:
        return lc.max_tokens_per_micro_batch
    longest = []
    if "grpo" in stages:
        longest.append(PROMPT_ALLOWANCE + recipe.rollout.budget(recipe.sampling.max_new_tokens))
    if "sft" in stages:
        longest.append(recipe.sft.max_seq_length or PROMPT_ALLOWANCE + recipe.sampling.max_new_tokens)
    return lc.micro_batch_size * max(longest or [PROMPT_ALLOWANCE])


def estimate(shape: ModelShape, lc, tokens: int) -> dict[str, float]:
    """GiB per learner rank, by part, for a micro-batch of ``tokens`` tokens (``lc``: the learner config)."""
    n, p = lc.num_ranks, shape.params
    bf16 = lc.dtype == "bfloat16"
    act = 2 if bf16 else 4
    trainable = 0 if lc.lora is not None else p  # LoRA: the adapters' states are negligible
    parts = {
        "weights": p * act / (n if lc.zero_stage == 3 else 1),
        "gradients": trainable * 4 / (n if lc.zero_stage >= 2 else 1),
        "optimizer": trainable * (12 if bf16 else 8) / (n if lc.zero_stage >= 1 else 1),
    }
    local = -(-tokens // lc.sequence_parallel_size)
    layer = shape.saved_per_token() * local * act
    if lc.gradient_checkpointing:
        parts["activations"] = shape.layers * shape.hidden * local * act + layer
    else:
        parts["activations"] = shape.layers * layer
    parts["lm_head"] = min(HEAD_CHUNK, local) * shape.vocab * 4 * 3  # fp32 logits, softmax, their gradient
    out = {k: v / GIB for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def check_memory(recipe, shape: ModelShape, stages: tuple[str, ...]) -> tuple[dict, str | None]:
    """The estimate for ``recipe`` and, when it cannot fit a GPU of ``learner.gpu_memory_gib``
    (GPU recipes only), why, naming the keys that change it."""
    lc = recipe.learner
    tokens = micro_batch_tokens(recipe, stages)
    parts = estimate(shape, lc, tokens)
    report = {"tokens_per_micro_batch": tokens, "params_b": shape.params / 1e9, **parts}
    if lc.gpus_per_rank <= 0 or parts["total"] <= MARGIN * lc.gpu_memory_gib:
        return report, None
    return report, (
        f"each learner rank needs about {parts['total']:.1f} GiB (weights {parts['weights']:.1f}, gradients "
        f"{parts['gradients']:.1f}, optimizer {parts['optimizer']:.1f}, activations {parts['activations']:.1f} for "
        f"{tokens} tokens per micro-batch) of its {lc.gpu_memory_gib:g} GiB GPU (at most {MARGIN:.0%} is planned); "
        "to fit: raise learner.sequence_parallel_size, turn on learner.gradient_checkpointing, lower "
        "learner.max_tokens_per_micro_batch (or learner.micro_batch_size), raise learner.zero_stage or "
        "learner.num_ranks, or set learner.gpu_memory_gib to your GPU's")
