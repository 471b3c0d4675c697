"""LoRA adapters' settings, shared by the learner (which trains them) and the generators (which
load what a weight sync sends)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoraConfig:
    """LoRA adapters through peft: only they train (the base weights stay frozen); HF checkpoints
    are merged, weight syncs carry the adapters only."""
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # null: every linear layer but the LM head ("all-linear")

    def peft(self):
        """peft's config for these adapters (the learner's and an hf generator's)."""
        import peft

        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, task_type="CAUSAL_LM",
                               target_modules=list(self.target_modules) if self.target_modules else "all-linear")
