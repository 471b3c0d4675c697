"""Reference: a frozen model's per-token log-probs of sampled completions. The reference is a
frozen copy of the initial policy (the KL term); a teacher (on-policy distillation) is another
model with the same tokenizer, run by the same class under its own span name."""
from __future__ import annotations

import numpy as np
import torch

from . import storage
from .batching import attention_kwargs, completion_logprobs
from .rollout import TrainSample
from .spans import SpanLog


class Reference:
    def __init__(self, model_path: str, dtype: str = "float32", micro_batch_size: int = 32,
                 temperature: float = 1.0, threads: int = 1, device: str | None = None, logits_dtype: str = "model",
                 span: str = "ref_logprobs"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cpu":
            torch.set_num_threads(threads)
        storage.pull(model_path)  # a checkpoint on object storage: downloaded to this node first
        tok = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                          **attention_kwargs(dtype)).to(self.device)
        self.model.eval().requires_grad_(False)
        self.micro_batch_size, self.temperature, self.logits_dtype = micro_batch_size, temperature, logits_dtype
        self.span = span  # the timeline's name for its work: ref_logprobs, or teacher_logprobs
        self.spans = SpanLog()

    def __repr__(self) -> str:
        return "Reference()"

    def load_weights(self, blob: bytes) -> None:
        """Re-anchor the reference (e.g. to the SFT checkpoint before GRPO starts). A LoRA
        learner's export is its base plus adapters: it is the policy only when the adapters are
        zero (B = 0), as right after ``LearnerRank.rebase_adapters``, the one time it is sent here."""
        import io

        state = torch.load(io.BytesIO(blob), map_location=self.device, weights_only=True)
        if "adapter" in state:
            nonzero = [k for k, v in state["adapter"].items() if "lora_B" in k and bool(v.any())]
            if nonzero or "base" not in state:
                raise ValueError("Reference.load_weights: a LoRA export is the policy only as a rebased base with "
                                 f"zero adapters; got {'no base' if 'base' not in state else f'adapters {nonzero[0]!r}...'}")
            state = state["base"]
        self.model.load_state_dict(state, strict=False)

    def logprobs(self, samples: list[TrainSample]) -> list[np.ndarray]:
        """Per completion token log-probs under this model, aligned with ``completion_ids``: a
        float32 array a sample (``batching.completion_logprobs``)."""
        with self.spans.span(self.span, samples=len(samples)):
            return completion_logprobs(self.model, samples, self.pad_id, self.micro_batch_size, self.temperature,
                                       self.logits_dtype, self.device)

    def drain_spans(self) -> list[dict]:
        return self.spans.drain()

    def ping(self) -> str:
        return "ok"
