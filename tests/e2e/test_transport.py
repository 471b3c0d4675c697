"""The driver's completion waits on Ray (``cluster/transport.py``'s ``RayWatcher``): each ref
handed back once, as it finishes, whatever is pending beside it; an actor's error raised as
``ray.get`` raises it (the elastic groups tell a lost actor by it); a forgotten ref never."""
import time

import pytest
import ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@ray.remote(max_concurrency=8)
class Sleeper:
    def after(self, seconds: float, value: str) -> str:
        time.sleep(seconds)
        return value

    def fail(self) -> None:
        raise KeyError("boom")


def _collect(watcher, refs: int, timeout_s: float = 60.0) -> dict:
    seen, t0 = {}, time.perf_counter()
    while len(seen) < refs and time.perf_counter() - t0 < timeout_s:
        for ref in watcher.wait(5.0):
            assert ref not in seen  # once each
            try:
                seen[ref] = watcher.get(ref)
            except Exception as e:  # noqa: BLE001 - the error is what is checked
                seen[ref] = e
    return seen


def test_refs_come_back_as_they_finish_with_their_values_or_errors(local_ray):
    from r1ray.cluster.transport import RayWatcher

    a = Sleeper.remote()
    watcher = RayWatcher()
    slow, fast, gone, bad = a.after.remote(1.5, "slow"), a.after.remote(0.3, "fast"), a.after.remote(0.5, "gone"), \
        a.fail.remote()
    busy = Sleeper.options(max_concurrency=64).remote()
    pending = [busy.after.remote(600, "never") for _ in range(50)]  # in flight beside them all along
    watcher.watch([slow, fast, gone, bad, *pending])
    watcher.forget([gone])
    seen = _collect(watcher, 3)
    assert list(seen)[-1] == slow and seen[slow] == "slow" and seen[fast] == "fast" and gone not in seen
    assert isinstance(seen[bad], ray.exceptions.RayTaskError) and isinstance(seen[bad], KeyError)
    assert watcher.wait(0.5) == []  # the forgotten one finished meanwhile: not handed back

    b = Sleeper.remote()
    ray.get(b.after.remote(0, "up"))
    lost = b.after.remote(600, "never")
    watcher.watch([lost])
    ray.kill(b)
    died = _collect(watcher, 1)
    assert isinstance(died[lost], ray.exceptions.RayActorError)
    ray.kill(busy)
