"""The four actor groups of one run, started from a recipe and torn down together."""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from ...actors.episodes import RolloutConfig
from ...actors.generator import Generator, GeneratorConfig
from ...actors.learner import LearnerConfig, LearnerRank
from ...actors.reference import Reference
from ...actors.scorer import RewardScorer, RewardSpec, ScorerConfig
from ...actors.server import VllmServer
from ...actors.weight_transfer import BACKEND as GLOO_TRANSFER
from ...cluster import control
from ...cluster.groups import (
    ActorGroup,
    GroupSnapshot,
    HostedGroup,
    RemoteCallError,
    Watchdog,
    kill_quietly,
    rendezvous_on,
)
from ...cluster.placement import Bundles, Placement
from ...cluster.weight_sync import start_broadcast, start_transfer
from ..config import Recipe, judge_keys
from ..config.schema import build, to_dict

log = logging.getLogger("r1ray")


def _plain(cls, group_cfg):
    """The actor's own config out of the group config (which adds placement fields)."""
    names = {f for f in cls.__dataclass_fields__}
    return build(cls, {k: v for k, v in to_dict(group_cfg).items() if k in names})


# What a job starts: GRPO everything; r1ray eval the rollout side; r1ray sft the learners;
# r1ray distill the self-hosted teacher servers (when distill.serve is set).
GRPO, EVALUATE, SFT, DISTILL = ("learner", "rollout"), ("rollout",), ("learner",), ("teacher",)
# placement.mode colocate with vLLM on GPUs: the part of a learner rank's GPU each of the rank and
# its generator asks Ray for (so Ray gives both the same device; vLLM sleeps while the rank trains)
GPU_SHARE = 0.5


def server_group(name: str, cfg, model: str, served_name: str, log_dir: Path, seed: int, api_key_env: str | None,
                 namespace: str, scheduling) -> ActorGroup:
    """``cfg.replicas`` vLLM OpenAI-compatible servers of ``model`` (``actors/server.py``), one actor
    each (``<name>-<i>``, in the placement bundles of those names), logging to
    ``log_dir/<name>-<i>.log``: distillation's self-hosted teacher and a judge reward's ``serve``."""
    return ActorGroup(name, VllmServer, cfg.replicas,
                      lambda i: ((cfg, model, served_name, str(log_dir / f"{name}-{i}.log"), seed + i, api_key_env), {}),
                      num_cpus=cfg.cpus_per_replica, num_gpus=cfg.gpus_per_replica, namespace=namespace,
                      timeout_s=cfg.startup_timeout_s + 60, scheduling=scheduling)


def stop_server_group(group: ActorGroup) -> None:
    """Stop each server's process group, then the actors."""
    try:
        group.run_all(VllmServer.stop, timeout_s=60, control=True)
    except Exception as e:  # noqa: BLE001 - dead already: killing the actor ends its server
        log.warning("%s servers: stop: %s", group.name, e)
    group.kill()


def placement_plan(r: Recipe, roles: tuple[str, ...] = GRPO) -> list[Bundles]:
    """The recipe's placement groups: learner ranks and the reference packed together
    (``train``, role "learner"); one group per generator (``generator-<i>``:
    ``tensor_parallel_size`` GPUs on one node), so generators can come and go one by one, and
    one per scorer (``reward-scorer-<i>``): role "rollout". ``placement.mode: colocate``: no
    generator group (hf: the generator runs inside learner rank 0; vllm: generator ``i`` shares
    learner rank ``i``'s bundle)."""
    train = Bundles("train")
    for i in range(r.learner.num_ranks):
        train.add(f"learner-rank-{i}", r.learner.cpus_per_rank, r.learner.gpus_per_rank)
    if r.colocated and not r.hosts_generator and roles == GRPO:
        for i in range(r.generator.num_actors):
            train.share(f"generator-{i}", f"learner-rank-{i}", r.generator.cpus_per_actor)
    if r.reference_actor and "rollout" in roles:
        for i in range(r.reference.num_actors):
            train.add(f"reference-{i}", r.reference.cpus, r.reference.gpus)
    plans = [train] if "learner" in roles else []
    if r.teacher_actor and roles == GRPO:  # on-policy distillation: a group each, like the scorers
        for i in range(r.teacher.num_actors):
            teacher = Bundles(f"teacher-{i}")
            teacher.add(f"teacher-{i}", r.teacher.cpus, r.teacher.gpus)
            plans.append(teacher)
    if "teacher" in roles and r.distill.serve is not None:
        for i in range(r.distill.serve.replicas):  # a group each: one server's GPUs on one node
            server = Bundles(f"teacher-{i}", strategy="STRICT_PACK")
            server.add(f"teacher-{i}", r.distill.serve.cpus_per_replica, r.distill.serve.gpus_per_replica)
            plans.append(server)
    if "rollout" not in roles:
        return plans
    for k, s in r.judge_servers if roles == GRPO else []:  # a judge's own vLLM servers: a group each, like distill's
        for i in range(s.replicas):
            server = Bundles(f"judge-{k}-{i}", strategy="STRICT_PACK")
            server.add(f"judge-{k}-{i}", s.cpus_per_replica, s.gpus_per_replica)
            plans.append(server)
    for i in range(0 if r.colocated and "learner" in roles else r.generator.num_actors):  # colocate: see train
        gen = Bundles(f"generator-{i}", strategy="STRICT_PACK")
        gen.add(f"generator-{i}", r.generator.cpus_per_actor, r.generator.gpus_per_actor)
        plans.append(gen)
    for i in range(r.scorer.num_actors):  # a group each, like the generators: replaced one by one
        scorer = Bundles(f"reward-scorer-{i}")
        scorer.add(f"reward-scorer-{i}", r.scorer.cpus_per_actor)
        plans.append(scorer)
    return plans


class System:
    def __init__(self, recipe: Recipe, model_path: str, roles: tuple[str, ...] = GRPO, log_dir: Path | None = None):
        """``roles``: GRPO (every group), EVALUATE (generators and scorers: ``r1ray eval``) or
        SFT (the learner ranks: ``r1ray sft``)."""
        self.r, self.model_path, self.roles = recipe, model_path, roles
        self.training, self.rollout = "learner" in roles, "rollout" in roles
        self.version = 0
        self.timeout = recipe.ray.call_timeout_s
        self.learners = self.generators = self.scorers = self.reference = self.teacher = None
        self.managers: ActorGroup | None = None  # grpo.rollout_managers (started by the GRPO driver)
        self.judge_servers: list[ActorGroup] = []  # the vLLM servers of judge rewards with serve:
        self.log_dir = log_dir  # where those servers' logs go (default: a temporary folder)
        self.watchdog: Watchdog | None = None
        self.placement: Placement | None = None
        self.control = None  # the run's RunControl actor (r1ray scale)
        self.weights: tuple[int, object] = (0, None)  # newest published version, its export (hf generators)
        # vllm generators: the slots in the weight-transfer group (None: it must be formed again)
        self.transfer_members: list[int] | None = None
        self.startup_s: dict[str, float] = {}
        # placement.mode colocate: generators share the learner ranks' devices (hf: hosted in
        # learner rank 0, on its module; vllm: actors in the ranks' bundles that sleep while they train)
        self.colocated = recipe.colocated and self.training and self.rollout
        self.hosted = self.colocated and recipe.hosts_generator

    @property
    def batches_requests(self) -> bool:
        """vLLM generators: requests run concurrently, batched continuously."""
        return self.r.generator.backend == "vllm"

    @property
    def streams_weights(self) -> bool:
        """vLLM generators: weights go over a collective. With LoRA the adapters go as hf
        generators' weights do (one export through the object store), into vLLM's LoRA."""
        return self.batches_requests and self.r.learner.lora is None

    @property
    def generator_calls(self) -> int:
        """Generate calls one generator runs at once (vLLM batches them continuously; hf
        episodes: one generates while the other's tool calls or environment steps run)."""
        return self.r.generator.max_requests if self.batches_requests else 2 if self.r.rollout.multi_turn else 1

    @property
    def sleeps_generators(self) -> bool:
        """Colocated vLLM: the generators sleep before each train step (``sleep_generators``)."""
        return self.colocated and not self.hosted

    def sleep_generators(self) -> None:
        """Colocated vLLM: every generator finishes its requests and frees the device for the
        train step queued next (``Generator.sleep``: its span is in the timeline); the next
        weight sync wakes them. Waits for them (the step must not start on a device vLLM still
        holds)."""
        self.generators.get(self.generators.call_all(Generator.sleep), "sleep (colocated vLLM generators)")

    @property
    def uses_reference(self) -> bool:
        """A reference actor computes the reference log-probs (with LoRA adapters switched off
        the learner does: ``Recipe.reference_on_learner``)."""
        return self.r.reference_actor

    def start(self) -> "System":
        r, ns = self.r, self.r.ray.namespace
        t0 = time.perf_counter()
        self.placement = Placement(placement_plan(r, self.roles), ns, r.ray.placement_timeout_s)
        place = self.placement.strategy
        self.startup_s["placement"] = time.perf_counter() - t0
        judges_ready = self.start_judge_servers() if self.rollout and self.training else []
        lcfg = _plain(LearnerConfig, r.learner)
        n = r.learner.num_ranks if self.training else 0
        share = GPU_SHARE if self.sleeps_generators else 1.0  # of a GPU a rank shares with its generator
        self.learners = None if not self.training else ActorGroup("learner-rank", LearnerRank, n,
                                   lambda i: ((self.model_path, lcfg, i, n, r.seed), {}),
                                   num_cpus=r.learner.cpus_per_rank, num_gpus=r.learner.gpus_per_rank * share,
                                   timeout_s=self.timeout, namespace=ns, scheduling=place)
        gcfg = _plain(GeneratorConfig, r.generator)
        self.generators = None if not self.rollout or self.hosted else ActorGroup("generator", Generator, r.generator.num_actors,
                                     lambda i: ((self.model_path, gcfg, r.seed + 7919 * i),
                                                {"rollout": _plain(RolloutConfig, r.rollout), "colocated": self.colocated,
                                                 "lora": r.learner.lora if self.training else None}),
                                     num_cpus=r.generator.cpus_per_actor, num_gpus=r.generator.gpus_per_actor * share,
                                     timeout_s=self.timeout, namespace=ns, max_concurrency=self.generator_calls,
                                     scheduling=place)
        specs = self.judged_specs(judges_ready) if self.rollout else r.rewards
        self.scorers = None if not self.rollout else ActorGroup("reward-scorer", RewardScorer, r.scorer.num_actors,
                                  lambda i: ((specs, _plain(ScorerConfig, r.scorer)), {"keys": judge_keys(r)}),
                                  num_cpus=r.scorer.cpus_per_actor, timeout_s=self.timeout, namespace=ns,
                                  scheduling=place)
        if self.uses_reference and self.training and self.rollout:
            rc = r.reference
            self.reference = ActorGroup("reference", Reference, rc.num_actors,
                                        lambda i: ((self.model_path, "float32" if r.learner.dtype == "float32" else "bfloat16",
                                                    rc.micro_batch_size, r.learner.loss.temperature,
                                                    r.learner.threads_per_rank), {"logits_dtype": r.learner.logits_dtype}),
                                        num_cpus=rc.cpus, num_gpus=rc.gpus, timeout_s=self.timeout, namespace=ns,
                                        scheduling=place)
        if r.teacher_actor and self.training and self.rollout:
            tc = r.teacher
            dtype = tc.dtype or ("float32" if r.learner.dtype == "float32" else "bfloat16")
            self.teacher = ActorGroup("teacher", Reference, tc.num_actors,
                                      lambda i: ((tc.model, dtype, tc.micro_batch_size, r.learner.loss.temperature,
                                                  r.learner.threads_per_rank),
                                                 {"logits_dtype": r.learner.logits_dtype, "span": "teacher_logprobs"}),
                                      num_cpus=tc.cpus, num_gpus=tc.gpus, timeout_s=self.timeout, namespace=ns,
                                      scheduling=place)
        infos = [{"params": 0}]
        if self.training:
            addr, port = rendezvous_on(self.learners.actors[0])
            setup = self.learners.call_all(LearnerRank.setup, addr, port, min(self.timeout, 600.0))
            infos = self.learners.get(setup, "setup (DeepSpeed init)")
            self.startup_s["learner"] = time.perf_counter() - t0
        if self.hosted:
            self.learners.get([self.learners.call(0, LearnerRank.host_generator, gcfg, r.seed,
                                                  _plain(RolloutConfig, r.rollout))], "host_generator")
            self.generators = HostedGroup("generator", Generator, self.learners, [0],
                                          {"drain_spans": "drain_generator_spans"}, self.timeout)
        for name, group in [("generator", self.generators), ("scorer", self.scorers), ("reference", self.reference),
                            ("teacher", self.teacher)]:
            if group is not None:
                group.wait_ready()
                self.startup_s[name] = time.perf_counter() - t0
        if self.streams_weights and self.training and self.rollout:
            opened = self.learners.get(self.form_transfer(self.generators.ready()),
                                       "weight-transfer handshake (learner rank 0 and the generators)")
            check_delivered(opened, "weight-transfer handshake")
            self.startup_s["weight_transfer"] = time.perf_counter() - t0
        self.control = control.start(ns)
        # Liveness checks from now on (an actor still in its constructor cannot answer a ping).
        self.watchdog = Watchdog(self.groups(), r.ray.heartbeat_s, r.ray.liveness_timeout_s)
        for group in self.groups():
            group.watchdog = self.watchdog
        up = ([f"{n} learner ranks ({infos[0]['params']:,} params)"] if self.training else []) + \
            ([f"{len(self.generators)} generators", f"{len(self.scorers)} scorers"] if self.rollout else []) + \
            ([f"{len(self.reference)} reference"] if self.reference else []) + ([f"{len(self.teacher)} teachers"] if self.teacher else [])
        log.info("actors up in %.1fs: %s", time.perf_counter() - t0, ", ".join(up))
        return self

    def start_judge_servers(self) -> list:
        """Start the vLLM servers of every judge reward with ``serve`` (placement groups
        ``judge-<k>-<i>``; ``k``: the reward's index); returns each group's readiness refs
        (their URLs), awaited before the scorers start, while the other actors start too."""
        r = self.r
        if not r.judge_servers:
            return []
        log_dir = Path(self.log_dir or tempfile.mkdtemp(prefix="r1ray-judge-"))
        refs = []
        for k, s in r.judge_servers:
            params = r.rewards[k].params
            served = self.model_path if s.model in (None, "tiny") else s.model
            if Path(served).expanduser().exists():
                served = str(Path(served).expanduser().resolve())  # the server actor's working directory is not ours
            group = server_group(f"judge-{k}", s, served, params.get("model") or "judge", log_dir, r.seed,
                                 params.get("api_key_env"), r.ray.namespace, self.placement.strategy)
            self.judge_servers.append(group)
            refs.append((k, group, group.call_all(VllmServer.wait_ready)))
        return refs

    def judged_specs(self, ready: list) -> list[RewardSpec]:
        """The rewards as the scorers get them: a judge with ``serve`` gets its servers' URLs
        (``r1ray eval`` starts none, and leaves such a judge out: it scores with eval.reward)."""
        specs = list(self.r.rewards)
        if not self.training:
            return [s for s in specs if not (s.name == "judge" and s.params.get("serve") is not None)]
        for k, group, refs in ready:
            t0 = time.perf_counter()
            urls = group.get(refs, "judge servers (vLLM) starting", timeout_s=group.timeout_s)
            log.info("judge rewards[%d]: %d vLLM server(s) ready in %.0f s: %s", k, len(urls),
                     time.perf_counter() - t0, ", ".join(urls))
            params = {key: v for key, v in specs[k].params.items() if key != "serve"}
            specs[k] = RewardSpec(specs[k].name, specs[k].weight, {**params, "base_urls": urls,
                                                                    "model": params.get("model") or "judge"})
        return specs

    def groups(self) -> list[ActorGroup]:
        return [g for g in (self.learners, self.generators, self.scorers, self.reference, self.teacher) if g is not None]

    def manager_views(self) -> dict:
        """The groups a rollout manager calls, as they are now (snapshots: it runs in another process)."""
        return {name: None if g is None else GroupSnapshot(g) for name, g in
                [("generators", self.generators), ("scorers", self.scorers), ("reference", self.reference),
                 ("teacher", self.teacher)]}

    def form_transfer(self, members: list[int]) -> list:
        """Queue the (re-)forming of the weight-transfer group: learner rank 0 and the vLLM
        generators in slots ``members``, on rank 0's node and a port it picks then (the handshake
        runs on the learners in queue order, after the work queued before it: nothing waits
        here). Returns the learners' object refs."""
        r = self.r
        on_gpus = r.generator.gpus_per_actor > 0
        backend = ("ipc" if self.colocated else "nccl") if on_gpus else GLOO_TRANSFER
        self.transfer_members = list(members)
        return start_transfer(self.learners, [self.generators.actors[i] for i in members],
                              [self.generators.name_of(i) for i in members], backend, "", 0,
                              r.generator.bucket_mb << 20, r.generator.dtype, self.timeout,
                              r.generator.tensor_parallel_size)

    def publish_weights(self, include_reference: bool = False, members: list[int] | None = None,
                        new_version: bool = True) -> tuple[int, list]:
        """The one place the policy version goes up: queue the learner's export of its current
        weights as version + 1 and every receiver's load; nothing waits here.

        vllm generators: the weights go to those in slots ``members`` (default: the ready
        ones), and the transfer group is formed again first when they are not its members.
        ``new_version=False`` sends the current version again (to generators that joined).

        Returns the version and the object refs that are done when every receiver has it
        (optionally the reference too, re-anchored to these weights); with vllm generators,
        the learners' results say which generators were lost instead (``check_delivered``)."""
        if new_version:
            self.version += 1
        refs, receivers = [], []
        if self.hosted:  # the generator runs on the learner's module: the new version is a label
            refs.append(self.learners.call(0, LearnerRank.adopt_weights, self.version))
            self.weights = (self.version, None)
        elif self.streams_weights:  # learner rank 0 broadcasts to the generators and waits for them
            members = sorted(self.generators.ready() if members is None else members)
            if members != self.transfer_members:
                refs = self.form_transfer(members)
            refs += self.learners.call_all(LearnerRank.send_weights, self.version)
            self.weights = (self.version, None)
        else:
            receivers.append((self.generators, Generator.load_weights, (self.version,)))
        if include_reference and self.reference is not None:
            receivers.append((self.reference, Reference.load_weights, ()))
        if receivers:
            exports, loads = start_broadcast(self.learners, receivers, self.r.generator.dtype)
            self.weights = (self.version, exports[0])  # what a generator that joins later loads
            # Not exports[0]: a successful load implies it, and getting it would copy the weights here.
            refs += exports[1:] + loads
        return self.version, refs

    def sync_weights(self, include_reference: bool = False) -> float:
        """``publish_weights`` and wait for every receiver; returns the seconds it took."""
        t0 = time.perf_counter()
        _, refs = self.publish_weights(include_reference)
        check_delivered(self.learners.get(refs, "weight broadcast"), "weight broadcast")
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        for group in self.judge_servers:
            stop_server_group(group)
        for group in (self.managers, self.scorers, self.generators, self.reference, self.teacher, self.learners):
            if group is not None:
                group.kill()
        kill_quietly(self.control)
        if self.placement is not None:
            self.placement.remove()


def lost_generators(values: list) -> list[str]:
    """The generators a weight transfer found gone (the learners' results; [] for the hf path)."""
    return sorted({name for v in values if isinstance(v, dict) for name in v.get("lost", [])})


def check_delivered(values: list, what: str) -> None:
    if lost := lost_generators(values):
        raise RemoteCallError(f"{what}: {', '.join(lost)} did not answer a ping: the weights reached no generator")
