"""Configuration: one pydantic model per role, combined into `Config`, loaded from TOML with
repeated `--set a.b=c` overrides. Every model forbids unknown keys and documents each field.

One file holds every role's section (prime-rl style): `or1 learner --config run.toml` reads
`[learner]`, `or1 actor` reads `[actor]`, and so on, so a run is described by one file.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bus.messages import (  # the protocol's defaults live with the protocol; these fields only expose them
    CHUNK_BYTES, CHUNK_TIMEOUT_S, HEARTBEAT_S, LIVENESS, MAX_MESSAGE_BYTES, PULL_WINDOW, RELAY_FANOUT,
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class BusConfig(Section):
    heartbeat_s: float = Field(HEARTBEAT_S, gt=0, le=60)
    """Seconds between heartbeats, both ways."""
    liveness: int = Field(LIVENESS, ge=1, le=100)
    """A peer silent for `liveness * heartbeat_s` seconds is declared dead."""
    max_message_bytes: int = Field(MAX_MESSAGE_BYTES, ge=1 << 16)
    """zmq MAXMSGSIZE on every socket, and the codec's limit on a message's declared size."""
    chunk_bytes: int = Field(CHUNK_BYTES, ge=1 << 12, le=1 << 28)
    """Size of one weight chunk."""
    pull_window: int = Field(PULL_WINDOW, ge=1, le=64)
    """Outstanding chunk requests per weight puller (credit pipelining)."""
    chunk_timeout_s: float = Field(CHUNK_TIMEOUT_S, gt=0)
    """A weight chunk not answered within this is requested again from another source."""
    relay_fanout: int = Field(RELAY_FANOUT, ge=1, le=64)
    """Most pullers one weight source (learner or relay) serves for one version."""
    shared_memory: bool = True
    """Weight versions live in /dev/shm, and an actor on the host of its source (learner or relay)
    maps the source's copy instead of pulling it: one transfer and one copy in memory per node.
    A source also keeps the next version's buffer allocated in advance (see bus/weights/shm.py)."""
    keep_frame_memory: bool = True
    """Learner and actors fix glibc's malloc thresholds (mmap 32 MB, trim 64 MB) at start, so the
    buffers of large received frames (weight chunks, trajectories) stay mapped instead of being
    faulted in again for every frame: 256 MB pulls 10–25 % and 1–16 MB trajectories ~20 % faster
    here (see bus/memory.py)."""
    curve_dir: str | None = None
    """Directory of CurveZMQ keys (made by `or1 keys`); None = plaintext. See docs/security.md."""
    client_key: str = ""
    """Name of this client's key pair in curve_dir/clients (default: its role, e.g. actor). The name
    decides the role (bus/auth.py): a node with its own key uses e.g. client_key = "actor-node7"."""
    allow_readable_keys: bool = False
    """Start even when a secret key file (bus.curve_dir) is readable by other users (refused by default)."""
    health_file: str = ""
    """A file each role's bus client touches (≤ once a second) while it hears from the learner: a
    liveness probe reads its age (e.g. Kubernetes: `test $(($(date +%s) - $(stat -c %Y FILE))) -lt 30`).
    Empty = none."""


class SamplingConfig(Section):
    temperature: float = Field(1.0, gt=0, le=5)
    """Sampling temperature; log-probs, ratios and entropy are all taken at this temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (1 = off, as in Skywork-OR1)."""


class StageConfig(Section):
    steps: int = Field(..., ge=1)
    """Optimizer steps in this stage."""
    max_response_tokens: int = Field(..., ge=1)
    """Most tokens one response may have in this stage (context-length schedule)."""
    prompts_per_batch: int = Field(..., ge=1)
    """B: useful (non-zero-advantage) groups per optimizer step."""
    group_size: int = Field(..., ge=2)
    """n: samples per prompt."""


class LossConfig(Section):
    eps_low: float = Field(0.2, ge=0, le=1)
    """PPO clip below: ratio is clipped at 1 - eps_low."""
    eps_high: float = Field(0.2, ge=0, le=10)
    """PPO clip above: ratio is clipped at 1 + eps_high (clip-higher when > eps_low)."""
    tis_mode: Literal["tis", "mask", "none"] = "tis"
    """Behaviour correction: truncated IS weight, mask tokens outside [1/C, C], or none."""
    tis_cap: float = Field(2.0, ge=1)
    """C, the cap of the truncated importance weight min(pi_prox / mu, C)."""
    kl_beta: float = Field(0.0, ge=0)
    """Weight of a k3 KL penalty to the behaviour policy (0 = none, as in Skywork-OR1)."""
    mask_truncated: bool = False
    """Drop truncated responses' tokens from the loss (Skywork-OR1 keeps them: reward 0, no mask)."""
    sgd_steps: int = Field(1, ge=1, le=16)
    """Optimizer steps per batch (1 = strictly on-policy; >1 recomputes pi_prox first)."""
    zero_truncated_reward: bool = True
    """A truncated response (finish reason "length") gets reward 0 whatever the scorer said: Skywork-OR1
    gives them 0 (§3.2.3), and it closes the answer-then-junk-to-the-cap reward hack
    (docs/training.md#the-embedded-default)."""
    keep_zero_advantage: bool = False
    """Train on groups whose rewards are all equal too: their advantage is 0, so they add only the
    entropy term's gradient; for systems benchmarks with untrained models (benchmarks/bench_scale.py),
    never for real training. Such groups are still counted in filter/zero_adv_* (and
    filter/zero_adv_kept)."""


class EntropyConfig(Section):
    enabled: bool = True
    """Adaptive entropy control on/off (off = alpha is always 0)."""
    target: float = Field(0.2, ge=0)
    """Target entropy (nats per token at the sampling temperature)."""
    delta: float = Field(1e-4, ge=0)
    """Step of the coefficient per optimizer step (released scripts 1e-4; paper text 0.005)."""
    coef_init: float = Field(0.0, ge=0)
    """Initial coefficient c0."""
    coef_min: float = Field(0.0, ge=0)
    """Lower bound of the coefficient."""
    coef_max: float = Field(0.005, ge=0)
    """Upper bound of the coefficient."""

    @model_validator(mode="after")
    def _check_bounds(self) -> "EntropyConfig":
        if not self.coef_min <= self.coef_init <= self.coef_max:
            raise ValueError(f"coef_init ({self.coef_init}) must lie in [coef_min, coef_max] = [{self.coef_min}, {self.coef_max}]")
        return self


class OptimConfig(Section):
    lr: float = Field(1e-6, gt=0)
    """AdamW learning rate (constant)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, ge=0)
    """Global gradient-norm clip (0 = off)."""
    eps: float = Field(1e-8, gt=0, le=1e-2)
    """AdamW epsilon."""
    impl: Literal["deepspeed", "torch"] = "deepspeed"
    """AdamW implementation DeepSpeed runs: its FusedAdam (JIT-built for the CPU there, once, into
    TORCH_EXTENSIONS_DIR) or torch.optim.AdamW (DeepSpeed's `torch_adam`). On CPU FusedAdam measured
    ~10x faster than torch's default AdamW and ~15 % faster than torch's fused one (fp32, 1 thread)."""


class TrainerConfig(Section):
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Training precision: auto = fp32 on CPU, bf16 on GPU."""
    micro_batch_tokens: int = Field(8192, ge=16)
    """Token budget of one micro-batch (prompt + response, padded)."""
    deepspeed_json: str | None = None
    """A user DeepSpeed JSON merged over the config built from ours."""
    weights_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the weights sent to actors (auto = bfloat16 when training in bf16, as on GPU; else
    the model folder's torch_dtype)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    share_prompts: bool = True
    """Run each group's prompt once in the forward, its responses on top of the prompt's keys and
    values, instead of once per response (learner/trainer.py `_shared_prompt_hidden`; the same
    arithmetic), in every step where that computes fewer positions (learner/buffer.py; metric
    learner/shared_prompts). Off under gradient checkpointing, which turns transformers' KV cache off."""
    seed: int = 0
    """Seed of the trainer (dropout-free models make this matter little)."""

    @property
    def prompts_shared(self) -> bool:
        """Whether micro-batches take the shared-prompt form (`share_prompts` in effect)."""
        return self.share_prompts and not self.gradient_checkpointing


SOURCE_NAME = r"^[A-Za-z0-9_.+-]+$"
RESERVED_SOURCE_NAMES = frozenset({"math", "code", "errors"})
"""Metric keys are reward/<kind>/… and reward/<source>/…: a source may not take a kind's name."""


class SourceConfig(Section):
    """One entry of `[[learner.data.sources]]`: a data set and its share of the prompts."""

    path: str
    """Hub dataset name, a local jsonl/json/parquet file or folder, or a built-in toy task `toy:NAME`."""
    split: str = "train"
    """Dataset split of a Hub name or folder (Skywork-OR1-RL-Data has `math` and `code`); a single
    file is its own split."""
    weight: float = Field(1.0, gt=0)
    """Sampling weight: each prompt drawn comes from this source with probability weight / Σ weights."""
    limit: int | None = Field(None, ge=1)
    """Use at most the first this many rows."""
    kind: Literal["math", "code"] | None = None
    """Kind of rows that state none (`ability` / `kind`); a row stating another kind is unusable.
    None: the row's own, else math."""
    name: str = Field("", pattern=r"^$|" + SOURCE_NAME)
    """Name in metrics (reward/<name>/mean) and in check-data; default: from the path (file stem, last
    part of a Hub name, + "-<split>" for a Hub name or folder whose split is not "train")."""
    prompt_suffix: str | None = None
    """Overrides learner.data.prompt_suffix for this source (None = use it)."""

    @model_validator(mode="after")
    def _check_name(self) -> "SourceConfig":
        if self.name in RESERVED_SOURCE_NAMES:
            raise ValueError(f"source name {self.name!r} is reserved for the kind metrics; pick another")
        return self


class DataConfig(Section):
    source: str = "toy:addition"
    """One source (the short form): Hub dataset name, a local jsonl/json/parquet path, or a built-in
    toy task `toy:NAME`. Setting it together with `sources` is an error."""
    split: str = "train"
    """Dataset split of `source`."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many problems of `source`."""
    sources: list[SourceConfig] = Field(default_factory=list)
    """Several sources mixed by weight (`[[learner.data.sources]]`, e.g. math and code); replaces
    source/split/limit."""
    prompt_suffix: str = ""
    """Text appended to every user prompt (Skywork-OR1 uses "Let's think step by step and output the final answer within \\boxed{}.")."""
    seed: int = 0
    """Seed of the dataset order (reshuffled every epoch) and of the mixture draws."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Drop problems whose chat-templated prompt is longer than this many tokens (None = what
    actor.max_model_len leaves after the longest stage's responses)."""
    max_unusable_frac: float = Field(0.05, ge=0, le=1)
    """The learner refuses to start when more than this share of a source's rows is unusable
    (unparseable reference or row, prompt too long); see `or1 check-data`."""
    allow_unusable: bool = False
    """Start anyway, training on the usable rows, whatever share of a source is unusable."""

    @model_validator(mode="after")
    def _one_form(self) -> "DataConfig":
        if self.sources:  # compared with the defaults: a saved config (every field written) must load again
            defaults = {"source": "toy:addition", "split": "train", "limit": None}
            both = [k for k, v in defaults.items() if getattr(self, k) != v]
            if both:
                raise ValueError(f"learner.data: set either {'/'.join(both)} or [[learner.data.sources]], not both")
        return self


class EvalConfig(Section):
    """Periodic validation inside the learner (learner/evaluation.py): rank 0 generates with the
    current weights (transformers generate, in-process) and scores with the reward code."""

    every: int = Field(0, ge=0)
    """Evaluate every K optimizer steps (0 = never)."""
    data: str = ""
    """Eval set: local jsonl/json/parquet (Skywork-OR1 or plain schema), Hub name or `toy:NAME`."""
    split: str = "train"
    """Split of a Hub name or folder."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many problems."""
    samples: int = Field(4, ge=1, le=1024)
    """n: samples per problem (avg@n, pass@k for k ≤ n)."""
    temperature: float | None = Field(None, gt=0, le=5)
    """Sampling temperature (None = learner.sampling.temperature)."""
    max_tokens: int | None = Field(None, ge=1)
    """Most tokens per response (None = the longest stage's max_response_tokens)."""
    at_start: bool = False
    """Also evaluate the starting weights, before the first step."""
    workers: int = Field(2, ge=1, le=64)
    """Scoring processes of the learner's own reward pool."""

    @model_validator(mode="after")
    def _needs_data(self) -> "EvalConfig":
        if (self.every or self.at_start) and not self.data:
            raise ValueError("learner.eval.every/at_start need learner.eval.data (an eval set)")
        return self


class LearnerConfig(Section):
    bind_host: str = "*"
    """Interface the learner binds."""
    control_port: int = Field(5555, ge=0, le=65535)
    """Control ROUTER port (0 = pick a free one)."""
    weights_port: int = Field(5556, ge=0, le=65535)
    """Weights ROUTER port (0 = pick a free one)."""
    any_free_port: bool = False
    """When a port is taken at bind time, bind a free one instead of failing. `or1 run` sets it: its
    learner writes RUN_DIR/endpoint, which the other roles read, and the ports checked free at start
    may be taken (by another run) before the learner binds them."""
    advertise_host: str = ""
    """Host or address other nodes dial for the weights port (`or1 learner --advertise`). Empty: a
    concrete bind_host, else none, and each peer uses the address it reached the control port at
    (see bus/address.py). Set it on multi-homed nodes to pick the network."""
    model: str = "tiny"
    """Model folder, hub name, or "tiny" for the embedded tiny model."""
    run_dir: str = "runs/latest"
    """Where config, metrics, logs and checkpoints go."""
    max_staleness: int = Field(0, ge=0, le=1000)
    """eta: most optimizer steps between the weights that generated a group and the step that trains it."""
    lease_groups: int = Field(4, ge=1)
    """Most groups in one lease."""
    admission_retry_s: float = Field(0.2, gt=0, le=60)
    """The longest the learner holds a lease request the staleness bound turns away: it is answered
    as soon as a slot may have freed (a step ended, a group was filtered or requeued), or after this
    long (at most 10 s) with Wait(admission, retry 0), so the actor asks again at once
    (learner/service.py).
    Longer means fewer round trips from idle actors; shorter, an actor that looks at its stop flag
    sooner. A Wait(admission) that reaches an actor by other means (an in-process caller) carries
    this as its retry delay."""
    fill_batch: bool = True
    """True (Skywork-OR1's rejection sampling): a step waits for prompts_per_batch useful groups,
    those whose rewards differ. False: a step comes every prompts_per_batch scored groups and
    trains the useful ones among them (as TRL's GRPOTrainer does): no generation spent refilling
    the batch late in training, fewer groups per step (learner/buffer.py, 2.)."""
    lease_timeout_s: float = Field(600.0, gt=0)
    """A lease not submitted within this is taken back and its prompts requeued."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every K steps (0 = only at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk."""
    resume: bool = False
    """Continue from the latest checkpoint in run_dir (a new epoch)."""
    stop_at_reward: float | None = Field(None, ge=0, le=1)
    """End the run early once the mean reward of the last `stop_window` steps reaches this (None = never)."""
    stop_window: int = Field(10, ge=1)
    """Steps averaged for stop_at_reward."""
    admin_key: str = ""
    """Key needed by `or1 set` (empty = none needed on a plaintext bus)."""
    score_timeout_s: float = Field(120.0, gt=0)
    """A score request not answered within this goes to another reward worker."""
    sampling: SamplingConfig = SamplingConfig()
    """Sampling settings sent with every lease."""
    stages: list[StageConfig] = Field(
        default_factory=lambda: [StageConfig(steps=100, max_response_tokens=1024, prompts_per_batch=8, group_size=8)]
    )
    """Training stages, run in order."""
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    """Periodic validation (eval/* metrics)."""
    export_checkpoints: bool = False
    """Also write every checkpoint as an ordinary HF folder (checkpoints/step_N/hf), loadable by
    vLLM, transformers and `or1 eval`."""
    loss: LossConfig = LossConfig()
    entropy: EntropyConfig = EntropyConfig()
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()


class ActorConfig(Section):
    learner: str = "tcp://127.0.0.1:5555"
    """The learner's control endpoint."""
    worker_id: str = ""
    """Stable id of this actor (default: host-pid); keep it across restarts to resume leases."""
    engine: Literal["auto", "vllm", "vllm-async", "hf"] = "auto"
    """Generation engine: vLLM where installed (auto), or the transformers fallback. vllm-async: vLLM's
    AsyncLLM (its engine core in a process of its own), which update_mode = in_flight takes anyway;
    with between_leases it loads only between leases (to compare the two modes on one engine)."""
    hf_decoder: Literal["auto", "transformers"] = "auto"
    """The transformers engine's decoding forward. auto: its own (actors/lean_decoder.py) for a
    Qwen2- or Llama-style model, transformers' forward for any other; transformers: always
    transformers' forward. The same arithmetic either way; on the embedded model the own one takes
    ~30 % less CPU per lease (transformers' fixed cost per call is most of a small model's step)."""
    model: str = ""
    """Model folder or hub name (default: the one the learner announces)."""
    relay_bind: str = ""
    """Serve weights to peers from this endpoint, e.g. tcp://*:5557 (empty = no relay)."""
    relay_advertise: str = ""
    """Endpoint other actors dial for this relay (`or1 actor --advertise tcp://HOST:PORT`). Empty: the
    learner fills in the address it sees this actor's connection come from (see bus/address.py)."""
    max_groups: int = Field(4, ge=1)
    """Most groups asked for in one lease."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """vLLM's share of accelerator memory (KV cache size on CPU is set by kv_cache_gb)."""
    kv_cache_gb: float = Field(1.0, gt=0)
    """vLLM CPU KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    max_model_len: int | None = Field(None, ge=16)
    """Prompt + response tokens per sequence. None (the default): what the learner announces for the
    run — the longest stage's max_response_tokens plus the longest prompt allowed
    (learner.data.max_prompt_tokens, else the longest prompt in the data). Set it only to cap memory;
    an actor refuses to start with less than the run needs. On the learner's side a set value also
    bounds the prompts (longer ones are dropped, counted as data/dropped_too_long)."""
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """vLLM tensor parallelism: shards of the model, one worker process each (GPUs, or CPU core groups:
    unless VLLM_CPU_OMP_THREADS_BIND is set, the available cores are split between the shards,
    `threads` each when set). The model's attention and KV head counts must divide by it."""
    seed: int = 0
    """Sampling seed (each lease also carries one)."""
    threads: int = Field(0, ge=0)
    """torch threads for generation (0 = torch's default); with tensor_parallel_size > 1 on CPU, the
    cores bound to each shard."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Generation dtype; auto = the model folder's own on CPU (vLLM's own "auto" would run float32 in
    16 bits), bfloat16 on GPU (bf16 throughout, as the learner trains there)."""
    enforce_eager: bool | None = None
    """vLLM without torch.compile / CUDA graphs (None = eager on CPU for a fast start, compiled on GPU)."""
    update_mode: Literal["between_leases", "in_flight"] = "between_leases"
    """When new weights reach the engine. between_leases: loaded before the next lease (a lease is
    generated with one version). in_flight: loaded as soon as pulled, while a lease generates (vLLM's
    AsyncLLM: generation pauses keeping its requests, the weights load, it resumes); every sample
    records which tokens each version sampled, and its group counts as generated with the oldest.
    Pays when responses are long (docs/weights.md#in-flight-updates). Needs the vLLM engine."""
    in_flight_kv: Literal["recompute", "keep"] = "recompute"
    """With update_mode = in_flight, what happens to the KV cache of the sequences under way at a
    switch. recompute: it is dropped and rebuilt with the new weights on resume (one prefill of each
    sequence so far), so every later token is sampled from exactly the new policy. keep: the old
    weights' KV stays (PipelineRL's choice; no prefill, but later tokens attend to keys and values of
    the old weights; the recorded log-probs are still the ones sampled). keep turns prefix caching off."""


class RewardConfig(Section):
    learner: str = "tcp://127.0.0.1:5555"
    """The learner's control endpoint."""
    worker_id: str = ""
    """Stable id of this reward worker (default: host-pid)."""
    workers: int = Field(2, ge=1, le=256)
    """Scoring processes in the pool."""
    queue_items: int = Field(32, ge=0, le=1_000_000)
    """Items taken beyond the pool's processes, waiting in its queue, so the next group is already
    here when a process frees instead of one learner round trip later (the worker's credits are
    workers + queue_items). A dead worker's queued items go to another like the rest it held."""
    memo_items: int = Field(100_000, ge=0, le=100_000_000)
    """Math verdicts remembered (rewards/memo.py): a (response, reference) pair scored once is not
    scored again while it is among the last this many. 0 = off."""
    math_timeout_s: float = Field(10.0, gt=0)
    """Most seconds one math verification may take (math-verify can hang)."""
    code_timeout_s: float = Field(6.0, gt=0)
    """Wall-clock seconds per code test case (Skywork-OR1: 6)."""
    code_cpu_s: int = Field(10, ge=1)
    """RLIMIT_CPU of a sandboxed program."""
    code_memory_mb: int = Field(1024, ge=64)
    """RLIMIT_AS of a sandboxed program, MiB."""
    code_max_output_bytes: int = Field(1 << 20, ge=1024)
    """stdout/stderr kept per run; more is discarded."""
    code_max_processes: int = Field(64, ge=1)
    """RLIMIT_NPROC of a sandboxed program."""
    code_network_namespace: bool = True
    """Run code in fresh network/mount/PID namespaces where the OS allows it (falls back with a warning)."""
    code_item_timeout_s: float = Field(60.0, gt=0, le=3600)
    """Most seconds all test cases of one code item may take together; a case that would start
    after this fails the item (a timeout). The pool kills a worker stuck past it + a grace."""
    code_max_file_mb: int = Field(16, ge=1, le=4096)
    """RLIMIT_FSIZE of a sandboxed program, MiB: the largest file it may write."""
    code_disk_mb: int = Field(64, ge=1, le=65536)
    """Everything a sandboxed program may write in its directory, MiB: a tmpfs of this size (RAM,
    freed with the run), so nothing reaches the host's disk. Without namespaces only
    code_max_file_mb per file holds (a warning is logged)."""
    code_python: str = ""
    """Interpreter for sandboxed programs (stdlib only; run with -I). Empty = the first of this
    process's interpreter, its base interpreter and python3 on PATH that the sandbox user can run."""
    code_uid_base: int = Field(61000, ge=1000, le=(1 << 31) - 100_000)
    """As root, each concurrent sandboxed run gets its own uid from [base, base + 1000): a range no
    real user may own, since every process of such a uid is killed after each run."""


class RunConfig(Section):
    steps: int | None = Field(None, ge=1)
    """Override the total optimizer steps (shortens or extends the last stage)."""
    actors: int = Field(2, ge=0)
    """Actor processes `or1 run` starts."""
    reward_workers: int = Field(1, ge=0)
    """Reward worker processes `or1 run` starts."""
    learner_ranks: int = Field(1, ge=1)
    """Learner ranks `or1 run` starts (> 1: under torchrun on this machine, data-parallel over gloo
    or NCCL, one OpenMP thread each on CPU)."""
    warm_start: bool = True
    """Warm-start the tiny model with a short supervised pass before RL."""
    cache_dir: str = "~/.cache/or1"
    """Where the built tiny model is kept between runs."""


class Config(Section):
    """The whole run: one section per role."""

    bus: BusConfig = BusConfig()
    learner: LearnerConfig = LearnerConfig()
    actor: ActorConfig = ActorConfig()
    reward: RewardConfig = RewardConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _check(self) -> "Config":
        e = self.learner.entropy
        if not e.coef_min <= e.coef_max:
            raise ValueError(f"learner.entropy.coef_min ({e.coef_min}) > coef_max ({e.coef_max})")
        return self


class ConfigError(ValueError):
    """A config file, override or flag that does not fit the schema; one line naming the key."""


def parse_value(text: str) -> Any:
    """`--set` values are TOML literals when they parse (ints, floats, bools, lists, quoted strings),
    otherwise plain strings: `--set learner.model=/data/m` needs no quotes."""
    try:
        return tomllib.loads(f"x = {text}")["x"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` to a nested dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE")
    key, _, raw = assignment.partition("=")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = parse_value(raw.strip())


def load_config(path: str | Path | None = None, overrides: list[str] = (), **flags: Any) -> Config:
    """TOML (or JSON, as written by save_config) file (optional) → `--set` overrides → direct flags (`{"learner.max_staleness": 2}`;
    None values are skipped). Raises ConfigError with one line naming the bad key."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
            data = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
        except (OSError, tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"config {path}: {e}") from None
    for assignment in overrides:
        apply_override(data, assignment)
    for key, value in flags.items():
        if value is not None:
            apply_override_value(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"config key {loc}: {err['msg']} (got {err.get('input')!r})") from None


def apply_override_value(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as JSON (every field, defaults included) so a run can be re-run."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
