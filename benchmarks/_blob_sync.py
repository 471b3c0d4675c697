"""The weight path before vLLM's weight-transfer API, kept only to benchmark against it: a
vLLM worker extension that takes the whole state dict as one ``torch.save`` blob through
``collective_rpc`` and reloads it in place."""
from __future__ import annotations

import io

import torch


class BlobSync:
    def r1ray_load_weights(self, blob: bytes) -> int:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        self.model_runner.reload_weights(weights_iterator=iter(state.items()))
        return len(state)
