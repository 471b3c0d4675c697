"""Actors on the tiny model, in-process, for the tests: a rendered prompt and a set-up learner."""
from r1ray.actors.learner import LearnerConfig, LearnerRank
from r1ray.cluster.groups import free_port


def prompt(tok_path, text="321+654", pid="p0") -> dict:
    """A prompt dict as the driver makes it (chat template, generation prompt), gold 975."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path)
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    return {"prompt_id": pid, "prompt_ids": list(ids), "columns": {"solution": "\\boxed{975}"}}


def learner(tiny_model, **kw) -> LearnerRank:
    """One DeepSpeed rank (world of 1, gloo), set up; ``kw``: LearnerConfig fields (zero_stage 2)."""
    cfg = LearnerConfig(num_ranks=1, zero_stage=kw.pop("zero_stage", 2), micro_batch_size=2, **kw)
    rank = LearnerRank(tiny_model, cfg, rank=0, world_size=1)
    rank.setup("127.0.0.1", free_port())
    return rank
