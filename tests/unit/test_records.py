"""The GRPO driver's progress as a checkpoint's driver.json saves it and a resumed run restores it."""
import json
from collections import Counter

from r1ray.controllers.grpo.records import Progress


def test_progress_saved_and_restored_keeps_its_totals_and_reads_an_older_checkpoint():
    done = Progress(4, prompts_consumed=6, taken0=2, counts=Counter({"groups/dropped": 1}), tokens=50)
    state = json.loads(json.dumps(done.state(step=3, version=4, last_seq=7, histogram=Counter({0: 8, 1: 16}),
                                             reward_names=["accuracy"])))
    back = Progress.restore({**state, "records": [{"step": s} for s in (1, 2, 3)]}, 4)
    assert (back.samples, back.taken0, back.tokens, back.counts) == (24, 10, 50, Counter({"groups/dropped": 1}))
    assert back.histogram == Counter({0: 8, 1: 16}) and back.reward_names == ["accuracy"]
    # a checkpoint written before the count: the ids of the prompts consumed, read as their number
    older = {k: v for k, v in state.items() if k != "prompts_consumed"}
    older.update(consumed_prompts=[f"train-{i}.0" for i in range(6)], records=[])
    assert Progress.restore(older, 4).samples == 24
    # the driver's state does not grow with the run: a count, not each prompt's id
    many = done.state(step=3, version=4, last_seq=7, histogram=Counter(), reward_names=[])
    done.prompts_consumed = 10**6
    assert len(json.dumps(done.state(step=3, version=4, last_seq=7, histogram=Counter(), reward_names=[]))) \
        <= len(json.dumps(many)) + 6
