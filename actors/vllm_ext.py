"""vLLM worker extension: in-place weight reload from bytes sent by ``collective_rpc``."""
from __future__ import annotations

import io

import torch


class WeightSyncExtension:
    def r1ray_load_weights(self, blob: bytes) -> int:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        # reload_weights (not model.load_weights): the CPU backend post-processes layers after
        # loading, and reload_weights redoes that processing.
        self.model_runner.reload_weights(weights_iterator=iter(state.items()))
        return len(state)
