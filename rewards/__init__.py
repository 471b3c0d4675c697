"""Reward functions, their registry and verifier isolation (imports nothing of ours).

    from r1ray import rewards
    fn = rewards.get("accuracy")                 # or "pkg.module:function"
    fn(completions, solution=[...])              # TRL's calling convention
    with rewards.VerifierPool(num_workers=2, timeout_s=10) as pool:
        pool.score("accuracy", {}, completions, {"solution": [...]})
"""

from .isolation import ScoreResult, VerifierPool, auto_memory_mb
from .registry import get, names

__all__ = ["ScoreResult", "VerifierPool", "auto_memory_mb", "get", "names"]
