"""The recipe schema: each layer's own config, composed; loaded from YAML and validated up front."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ...actors.episodes import RolloutConfig
from ...actors.generator import GeneratorConfig, SamplingConfig
from ...actors.learner import LearnerConfig
from ...actors.scorer import RewardSpec, ScorerConfig
from ...actors.server import ServerConfig
from .schema import to_dict

PACKAGE_DIR = Path(__file__).resolve().parents[2]  # the r1ray package (configs/ is in it)
TINY = "tiny"  # model.path / data.path value meaning "the locally built tiny world"


@dataclass
class ModelConfig:
    path: str = TINY  # hub name, local path, or "tiny"
    tiny_dir: str = "~/.cache/r1ray/tiny-world"  # where the tiny world is built when path is "tiny"
    # The tiny world's task: "add" (the default world) or "tools" (2-digit products and a
    # calculator, configs/tiny-tools.yaml); each task needs a tiny_dir of its own.
    tiny_task: Literal["add", "tools"] = "add"


@dataclass
class DataConfig:
    path: str = TINY  # datasets.load_from_disk dir, a hub dataset name, or "tiny"
    name: str | None = None  # hub dataset config name
    train_split: str = "train"
    test_split: str = "test"
    prompt_column: str = "problem"
    solution_column: str = "solution"
    messages_column: str = "messages"  # SFT traces (chat messages ending with the assistant turn)
    system_prompt: str | None = None
    # A row that breaks a data rule (empty prompt or solution, a prompt longer than the generator
    # takes, bad SFT messages) -- checked before Ray starts. "refuse": stop at the first such row,
    # naming it; "drop": leave such rows out and count them per split and rule.
    on_invalid_row: Literal["refuse", "drop"] = "refuse"


@dataclass
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS, a local `ray start` cluster, or start one
    namespace: str = "r1ray"
    num_cpus: int | None = None  # only when starting a local cluster; default: all cores
    num_gpus: int | None = None
    dashboard: bool = True
    object_store_mb: int = 256
    connect_timeout_s: float = 10.0  # joining a cluster that does not answer fails after this
    # Joining a cluster from a clone: build a wheel of it (cached by content) and install it on
    # every node through the runtime env (py_modules), so nodes need no r1ray of their own.
    # false: the nodes have r1ray installed (the KubeRay image). A local Ray never ships.
    ship_code: bool = True
    # Deadlines. A call's first run (nothing measured yet) is bounded by call_timeout_s; later
    # ones by deadline_factor x the slowest seconds per sample seen for that stage x its
    # samples, at least deadline_min_s (scoring: by the verifier timeouts). Meanwhile every
    # actor is pinged every heartbeat_s; one dead, or silent for liveness_timeout_s, ends the
    # run with its name.
    call_timeout_s: float = 600.0
    deadline_factor: float = 5.0
    deadline_min_s: float = 60.0
    heartbeat_s: float = 10.0
    liveness_timeout_s: float = 45.0
    placement_timeout_s: float = 120.0  # reserving the placement groups (an autoscaler may add nodes meanwhile)


@dataclass
class PlacementConfig:
    # split: generators on devices of their own (streaming, max_staleness >= 0). colocate: the
    # generator shares the learner's: with hf it runs inside learner rank 0's process on the
    # learner's own module (one copy of the weights, no weight sync at all); generation and
    # training take turns, so max_staleness must be 0.
    mode: Literal["split", "colocate"] = "split"


@dataclass
class GeneratorGroupConfig(GeneratorConfig):
    num_actors: int = 1  # started (and placed) before the run begins
    # Elastic group: the driver adds generators up to max_actors whenever the
    # cluster has room (a node joins), replaces lost ones, and `r1ray scale` resizes it within
    # [min_actors, max_actors]. null: num_actors.
    min_actors: int | None = None
    max_actors: int | None = None
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0

    def actor_range(self) -> tuple[int, int]:
        """(min_actors, max_actors), null meaning num_actors."""
        return (self.num_actors if self.min_actors is None else self.min_actors,
                self.num_actors if self.max_actors is None else self.max_actors)


@dataclass
class LearnerGroupConfig(LearnerConfig):
    cpus_per_rank: float = 0.5
    gpus_per_rank: float = 0.0
    gpu_memory_gib: float = 80.0  # what r1ray check plans each rank's GPU to hold (an H100: 80)


@dataclass
class ReferenceConfig:
    cpus: float = 0.25  # per reference actor
    gpus: float = 0.0  # per reference actor
    # Reference actors: each group's log-prob call goes to the least loaded one. One reference
    # GPU keeps up with about 4 learner ranks' GPUs (2N vs 8N FLOPs a token with gradient
    # checkpointing): scale it with the learner ranks (benchmarks/simulate.py).
    num_actors: int = 1
    micro_batch_size: int = 64
    # With learner.lora: the reference log-probs come from the learner ranks with their adapters
    # switched off (the frozen base; after an SFT warm-up, the warmed-up model): no reference
    # actor, no second copy of the model. null: on with LoRA. false: a reference actor as without
    # LoRA (it overlaps with training, at the cost of a copy).
    adapters_off: bool | None = None


@dataclass
class TeacherConfig:
    """A frozen teacher beside the learner (on-policy distillation): its per-token log-probs of
    the student's sampled tokens, computed as the reference's are, by its own actors."""
    model: str | None = None  # a hub name or a local HF folder with the student's tokenizer; null: no teacher
    num_actors: int = 1
    cpus: float = 0.25  # per actor
    gpus: float = 0.0  # per actor
    dtype: Literal["float32", "bfloat16"] | None = None  # null: as the learner (float32 or bfloat16)
    micro_batch_size: int = 64


@dataclass
class SftConfig:
    steps: int = 0  # 0 skips the warm-up
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    # Early stop once the policy, sampled as GRPO will sample it (one completion per prompt at
    # `sampling`), is right on this share of `probe_prompts` held-out prompts that the final
    # evaluation does not use (judged by `eval.reward`): enough right answers in each group for
    # GRPO to learn from. Checked every `probe_every` steps from `probe_from` on.
    # null: always run `steps`.
    stop_at_pass_rate: float | None = None
    probe_every: int = 10
    probe_from: int = 0
    probe_prompts: int = 64
    save_checkpoint: bool = True  # HF-format checkpoint-sft/ in the run directory after the warm-up
    # Examples are conversations (data.messages_column) rendered with the chat template; every
    # assistant turn is trained. Longer than max_seq_length tokens: cut there (counted; null: never).
    max_seq_length: int | None = None
    epochs: float | None = None  # r1ray sft: passes over the conversations, instead of `steps`
    packing: bool = False  # several examples per row of max_seq_length tokens, attention kept apart
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # after the warm-up
    min_lr_ratio: float = 0.0  # linear / cosine decay to this share of lr (Open-R1: cosine to 0.1)
    eval_every: int = 0  # held-out loss on data.test_split's conversations every N steps (0: never)
    eval_examples: int = 256  # held-out conversations in that loss


@dataclass
class GrpoConfig:
    steps: int = 100
    prompts_per_step: int = 16
    num_generations: int = 8  # completions per prompt (the group)
    # "grpo": (r - group mean) / std by advantage_scale; "rloo": r - mean of the other G - 1
    # (unscaled); "reinforce_pp": per-token returns whitened over the whole batch (advantage_scale unused);
    # "on_policy_distill": per token -(log pi_behaviour - log pi_teacher), discounted by
    # `distill_discount` (needs `teacher.model`; no rewards enter the advantage)
    advantage_estimator: Literal["grpo", "rloo", "reinforce_pp", "on_policy_distill"] = "grpo"
    distill_discount: float = 0.0  # on_policy_distill: A_t = sum_{k>=t} discount^(k-t) x (-reverse KL_k)
    # each token's reverse KL to the teacher cut to [-c, c] before it enters an advantage
    # (on_policy_distill's, or teacher_kl_coef's term); null: as estimated. The estimate is
    # unbounded where the teacher all but rules a sampled token out, and such tokens then
    # crowd out the rest of the clipped gradient (teacher/reverse_kl reports it uncut)
    distill_kl_clip: float | None = None
    advantage_scale: Literal["group", "batch", "none"] = "group"  # TRL scale_rewards; "batch": the step's batch
    mask_truncated_completions: bool = False  # completions cut at sampling.max_new_tokens get no loss (DAPO)
    max_staleness: int = 0  # eta: samples are at most this many versions old; 0 = synchronous on-policy
    groups_per_request: int = 0  # prompt groups per generate call; 0: prompts_per_step / generators
    # vLLM: a group's completions in requests of this many, each scored and given reference (and
    # teacher) log-probs as soon as it finishes, the group re-assembled before its advantages; 0:
    # the whole group in one request (a group waits for its longest completion). 1 streams each
    # completion on its own (benchmarks/simulate.py measures the gain).
    completions_per_request: int = 0
    partial_rollout_tokens: int = 0  # > 0: generators adopt new weights mid-request every N tokens
    # > 0: that many rollout manager actors run each group's generate -> score -> reference chain,
    # generator i's under manager i % rollout_managers, so that the driver makes a few calls a
    # second, not three a group (for hundreds of generators: benchmarks/simulate.py overhead)
    rollout_managers: int = 0
    manager_report_s: float = 1.0  # a manager reports at most this often, unless the next batch waits
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal, sample until the batch is full
    log_completions_every: int = 0  # 0: never; N: write a few completions every N steps


# The system prompt of Open-R1's published evaluations (lighteval --system-prompt).
OPENR1_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
EVAL_TASKS = ("math_500", "aime24", "aime25", "gpqa_diamond", "heldout", "generic")


@dataclass
class EvalTaskConfig:
    """One benchmark of ``eval.tasks``. ``task``: math_500, aime24, aime25, gpqa_diamond (their hub
    datasets by default), heldout (the recipe's own data.test_split), or generic (any dataset with
    a problem and an answer column). Every other key overrides the task's default."""
    task: str = "generic"
    name: str | None = None  # the name in reports and metrics (eval/<name>/pass@1); default: task
    path: str | None = None  # a local jsonl/json/parquet/csv file or save_to_disk folder, or a hub dataset
    subset: str | None = None  # the hub dataset's config name (gpqa_diamond: "gpqa_diamond")
    split: str | None = None
    problem_column: str | None = None
    answer_column: str | None = None  # gpqa_diamond: the correct option's text ("Correct Answer")
    kind: Literal["math", "choice"] | None = None  # how answers are judged (generic: math)
    num_samples: int | None = None  # n per problem; default: Open-R1's (AIME 64, MATH-500 4, GPQA 8; else 1)
    max_problems: int | None = None  # only the first N problems (a quick look); null: all
    system_prompt: str | None = None  # null: eval.system_prompt (heldout: data.system_prompt); "": none


@dataclass
class EvalSamplingConfig:
    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.95
    # null: the rest of generator.max_model_len after each prompt (Open-R1 generates up to 32768)
    max_new_tokens: int | None = None


@dataclass
class EvalConfig:
    num_prompts: int = 200  # held-out prompts for pass@1 before and after
    max_new_tokens: int | None = None  # default: sampling.max_new_tokens
    reward: str = "accuracy"  # the function that decides pass/fail
    # Benchmarks: `r1ray eval` runs them, and during training every `every_steps` learner steps
    # (metrics eval/<task>/pass@1, ...). Sampled with `sampling` and n per task, judged by
    # math-verify as Open-R1 judges (rewards/answers.py), on the generator and scorer actors.
    tasks: list[EvalTaskConfig] = field(default_factory=list)
    every_steps: int = 0
    sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    system_prompt: str | None = OPENR1_SYSTEM_PROMPT
    k: list[int] | None = None  # pass@k and maj@k reported; null: 1, 2, 4, ... up to n, and n
    seed: int = 0  # the option order of multiple-choice tasks (GPQA), fixed per problem


@dataclass
class CheckpointConfig:
    # Every N GRPO steps: the learners' DeepSpeed state (weights, optimizer, scheduler, RNG) and
    # the driver's (step, policy version, consumed prompts, data position) under
    # <run_dir>/checkpoints/step-<N>/; `r1ray train --resume <run_dir>` continues from the newest
    # complete one with the same data order. 0: no GRPO checkpoints.
    every_steps: int = 0
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    # Ctrl-C / SIGTERM during SFT or GRPO: the learner's current weights as an HF checkpoint
    # (checkpoint-interrupted/) before the actors stop, waiting for a step in progress to end.
    on_interrupt: bool = False


@dataclass
class DistillConfig:
    """``r1ray distill``: reasoning traces from a teacher behind an OpenAI-compatible endpoint
    (Open-R1's distilabel pipeline on Ray), filtered by math-verify, written as a dataset that
    ``r1ray sft`` trains on. The prompts are ``data.path``'s ``split`` (default
    data.train_split), column ``prompt_column`` (default data.prompt_column)."""
    # The teacher: a hosted endpoint (base_url, e.g. https://api.deepseek.com/v1) or vLLM
    # OpenAI-compatible servers started here as Ray actors (serve). One of the two.
    model: str | None = None  # the model name sent in requests; with serve: default its model's path
    base_url: str | None = None
    api_key_env: str | None = None  # the environment variable that holds the key; it is never written anywhere
    serve: ServerConfig | None = None
    # Prompts
    split: str | None = None
    prompt_column: str | None = None
    prompt_template: str = "{{ instruction }}"  # Jinja; {{ instruction }} is the prompt column's text
    system_prompt: str | None = None
    max_rows: int | None = None  # only the first N rows (a quick look); null: all
    # Sampling and the client (Open-R1's distill.py knobs)
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 8192
    num_generations: int = 4  # completions per prompt
    split_requests: bool = False  # num_generations requests of n=1 (endpoints that ignore n)
    extra_body: dict[str, Any] = field(default_factory=dict)  # more request fields, e.g. {repetition_penalty: 1.05}
    input_batch_size: int = 64  # prompts per distilabel batch (all of a batch's requests are in flight at once)
    client_replicas: int = 1  # copies of the generation step (Ray actors), each with a batch in flight
    timeout: int = 600  # seconds per request
    retries: int = 5  # per request: 429, 5xx, timeouts, dropped connections and malformed answers, with backoff
    # The endpoint's limits per base URL, shared by the client_replicas (each takes its share):
    max_concurrency: int | None = None  # requests in flight; null: input_batch_size x client_replicas at most
    requests_per_second: float | None = None  # request starts, retries included; null: no limit
    # Rejection sampling: keep the generations whose \boxed{} answer math-verifies against the
    # reference column (verifier processes with scorer.timeout_s, scorer.workers_per_actor).
    filter: Literal["math_verify", "none"] = "math_verify"
    answer_column: str = "answer"
    keep: Literal["first", "all"] = "first"  # kept generations per problem in the SFT dataset
    test_size: int = 0  # problems whose traces form the dataset's test split (held-out SFT loss)
    output_format: Literal["jsonl", "parquet"] = "jsonl"
    push_to_hub: str | None = None  # a hub dataset name: pushed when a token (HF_TOKEN, huggingface-cli login) exists
    private: bool = True


STAGE_TYPES = ("distill", "sft", "grpo", "eval")


@dataclass
class StageConfig:
    """One stage of a multi-stage recipe (``r1ray run``): the recipe with ``set``'s keys
    (dotted, as with --set) changed, run as ``type`` in ``<output_dir>/<name>``. A stage's
    output feeds the next: an sft or grpo stage's checkpoint becomes the next stage's
    model.path (unless the next one sets it), an eval stage evaluates the stage before it."""
    type: str = "sft"  # distill, sft, grpo or eval
    name: str | None = None  # default: the type (a second stage of a type needs its own name)
    set: dict[str, Any] = field(default_factory=dict)


@dataclass
class StorageConfig:
    # Where run directories live: a relative output_dir (--output-dir, --resume, eval reports)
    # goes under it. A local folder, or a volume every node mounts at the same path (learner
    # ranks on other nodes write their checkpoint shards there; a node that does not see it is
    # refused), or an object-storage URI (s3://, gs://, abfs://, hdfs://, file://). null: the current directory from a shell, ~/r1ray_runs inside a Ray job (whose
    # current directory is Ray's temporary copy of --working-dir). A run directory Ray would
    # delete (/tmp/ray, a runtime-env folder) is refused. See controllers/config/storage.py.
    # On object storage, every process works in a staging copy at the same path on every node
    # ($R1RAY_STAGING, default ~/.cache/r1ray/staging); the driver uploads its files every
    # sync_every_s seconds and at the end, learner ranks their checkpoint files as they save them.
    path: str | None = None
    sync_every_s: float = 30.0


@dataclass
class LoggingConfig:
    """Where a run's metrics go beside its jsonl files (controllers/common/trackers.py). Each
    tracker's own settings come from its usual environment variables (WANDB_MODE,
    WANDB_PROJECT, WANDB_ENTITY, WANDB_API_KEY, MLFLOW_TRACKING_URI, ...); none is ever logged."""
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    project: str = "r1ray"  # the W&B project, the MLflow experiment (WANDB_PROJECT overrides it for W&B)
    run_name: str | None = None  # default: the run directory's name
    tags: list[str] = field(default_factory=list)
    # A tracker that cannot start: "fail" refuses the run before anything starts (naming the
    # tracker and the fix); "warn" goes on without it. A tracker failing mid-run never ends it.
    on_tracker_error: Literal["fail", "warn"] = "fail"
    # The GRPO steps whose actors' busy spans timeline.json keeps: those collected at the end of
    # each listed step (its training, and what generated, scored and referenced meanwhile);
    # null: every step. At 256 generators a step adds about 0.8 MB (400 MB by step 500), so a
    # large run may keep a few, as veRL's profile_steps: e.g. [1, 2, 3, 100]. []: none.
    timeline_steps: list[int] | None = None


@dataclass
class Recipe:
    seed: int = 0
    output_dir: str = "runs/default"  # the run directory; relative: under storage.path
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    generator: GeneratorGroupConfig = field(default_factory=GeneratorGroupConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # tools and multi-turn episodes
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("accuracy", 1.0), RewardSpec("format", 0.2)])
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    learner: LearnerGroupConfig = field(default_factory=LearnerGroupConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    stages: list[StageConfig] = field(default_factory=list)  # r1ray run: distill -> sft -> grpo -> eval
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return to_dict(self)

    @property
    def colocated(self) -> bool:
        """Generators share the learner ranks' devices (``placement.mode: colocate``)."""
        return self.placement.mode == "colocate"

    @property
    def hosts_generator(self) -> bool:
        """Colocated hf: the generator runs inside learner rank 0's process, on its module (one
        copy of the weights). Colocated vLLM runs as actors in the learner ranks' bundles."""
        return self.colocated and self.generator.backend == "hf"

    @property
    def reference_on_learner(self) -> bool:
        """The KL term's reference is the learner with its LoRA adapters off (no reference actor)."""
        return (self.learner.loss.kl_coef > 0 and self.learner.lora is not None
                and self.reference.adapters_off is not False)

    @property
    def judge_servers(self) -> list[tuple[int, ServerConfig]]:
        """The ``judge`` rewards whose endpoint r1ray starts (``params.serve``): (their index in
        ``rewards``, the vLLM servers' settings)."""
        return [(i, ServerConfig(**s.params["serve"])) for i, s in enumerate(self.rewards)
                if s.name == "judge" and s.params.get("serve") is not None]

    @property
    def teacher_actor(self) -> bool:
        """Teacher actors compute the teacher's log-probs of every sampled token."""
        return self.teacher.model is not None

    @property
    def reference_actor(self) -> bool:
        """A reference actor computes the KL term's reference log-probs."""
        return self.learner.loss.kl_coef > 0 and not self.reference_on_learner
