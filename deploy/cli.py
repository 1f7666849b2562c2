"""The `or1` command line: one command per role, each importing its role lazily so `or1 --help`
stays instant (no torch, vllm or deepspeed at import time).

Every role reads the same config file (`--config run.toml`, one section per role), then the
repeated `--set a.b=c` overrides, then the direct flags for the knobs people tune most.
"""

from __future__ import annotations

from typing import Optional

import typer

from common.config import Config, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file (sections: bus, learner, actor, reward, run).")
SetOpt = typer.Option([], "--set", "-s", help="Override a config key, e.g. --set learner.optim.lr=1e-4 (repeatable).")
LogOpt = typer.Option("auto", "--log-format", help="auto | console | json")
LearnerOpt = typer.Option(None, "--learner", help="Learner control endpoint, e.g. tcp://10.0.0.1:5555.")
AdminKeyOpt = typer.Option("", "--admin-key", envvar="OR1_ADMIN_KEY", help="The learner's admin key, if it sets one.")


def _config(path: Optional[str], sets: list[str], **flags) -> Config:
    try:
        return load_config(path, sets, **flags)
    except ConfigError as e:
        typer.echo(f"or1: {e}", err=True)
        raise typer.Exit(2) from None


def _exit_with(fn, /, *args, errors: tuple[type[Exception], ...] = (), **kwargs) -> None:
    """Run an offline command and exit with its status; bad data (`DataError`) or any of `errors`
    is one line on stderr saying what to change, and exit 2, never a traceback."""
    from common.data import DataError

    try:
        status = fn(*args, **kwargs)
    except (DataError, *errors) as e:
        typer.echo(f"or1: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(status)


TASKS = {"addition": "tiny.toml", "chain": "chain.toml"}
"""`or1 run --task NAME`: the embedded tasks, each a config in deploy/configs/ (the tiny model on
toy:NAME, warm-started on it)."""


def default_run_config(task: str = "addition") -> str:
    """The embedded config of `task` (deploy/configs/tiny.toml for the default, addition)."""
    from pathlib import Path

    if task not in TASKS:
        raise typer.BadParameter(f"unknown task {task!r}; known: {', '.join(TASKS)}", param_hint="--task")
    return str(Path(__file__).parent / "configs" / TASKS[task])


@app.command()
def run(
    config: Optional[str] = ConfigOpt,
    set_: list[str] = SetOpt,
    steps: Optional[int] = typer.Option(None, help="Total optimizer steps."),
    actors: Optional[int] = typer.Option(None, help="Actor processes to start."),
    reward_workers: Optional[int] = typer.Option(None, help="Reward worker processes to start."),
    max_staleness: Optional[int] = typer.Option(None, help="η: 0 = synchronous on-policy."),
    engine: Optional[str] = typer.Option(None, help="auto | vllm | vllm-async | hf"),
    model: Optional[str] = typer.Option(None, help="Model folder, hub name, or 'tiny' (e.g. from or1 make-model)."),
    out: Optional[str] = typer.Option(None, help="Run directory (default runs/<timestamp>)."),
    task: Optional[str] = typer.Option(
        None, help="An embedded task instead of --config: addition (the default; 8-token answers) or chain "
                   "(running sums worked step by step, 35-60-token answers)."),
    log_format: str = LogOpt,
) -> None:
    """Train on this machine: learner, actors and reward workers as separate processes over the bus.
    With no arguments: the embedded tiny model on the toy task, nothing downloaded."""
    if config and task:
        raise typer.BadParameter("give --config or --task, not both (a task is an embedded config)", param_hint="--task")
    cfg = _config(config or default_run_config(task or "addition"), set_, **{"run.steps": steps, "run.actors": actors, "run.reward_workers": reward_workers,
                                   "learner.max_staleness": max_staleness, "actor.engine": engine, "learner.run_dir": out,
                                   "learner.model": model})
    from deploy.local import run as run_local

    raise typer.Exit(run_local(cfg, explicit_out=out is not None, log_format=log_format))


@app.command()
def learner(
    config: Optional[str] = ConfigOpt,
    set_: list[str] = SetOpt,
    model: Optional[str] = typer.Option(None, help="Model folder, hub name, or 'tiny'."),
    max_staleness: Optional[int] = typer.Option(None, help="η: most optimizer steps a trained group may lag."),
    port: Optional[int] = typer.Option(None, help="Control port (weights port = this + 1 unless set)."),
    run_dir: Optional[str] = typer.Option(None, help="Run directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the run directory."),
    advertise: Optional[str] = typer.Option(
        None, help="Host or address other nodes dial for the weights port (multi-homed nodes); default: "
                   "the address each peer reached the control port at."),
    log_format: str = LogOpt,
) -> None:
    """The learner: scheduler, buffer, DeepSpeed trainer and weight store, serving the bus."""
    flags = {"learner.model": model, "learner.max_staleness": max_staleness, "learner.control_port": port,
             "learner.run_dir": run_dir, "learner.resume": resume or None, "learner.advertise_host": advertise}
    if port is not None and not any(s.startswith("learner.weights_port") for s in set_):
        flags["learner.weights_port"] = port + 1 if port else 0
    cfg = _config(config, set_, **flags)
    from learner.run import run as run_learner

    raise typer.Exit(run_learner(cfg, log_format=log_format) or 0)


@app.command()
def actor(
    config: Optional[str] = ConfigOpt,
    set_: list[str] = SetOpt,
    learner: Optional[str] = LearnerOpt,
    engine: Optional[str] = typer.Option(None, help="auto | vllm | vllm-async | hf"),
    relay_bind: Optional[str] = typer.Option(None, help="Serve weights to peers, e.g. tcp://*:5557."),
    advertise: Optional[str] = typer.Option(
        None, help="Endpoint other actors dial for this relay, e.g. tcp://10.0.0.7:5557 (multi-homed nodes); "
                   "default: the address the learner sees this actor at."),
    worker_id: Optional[str] = typer.Option(None, help="Stable id of this actor."),
    log_format: str = LogOpt,
) -> None:
    """A rollout worker: leases prompts, generates with vLLM (or HF), submits, pulls new weights."""
    cfg = _config(config, set_, **{"actor.learner": learner, "actor.engine": engine, "actor.relay_bind": relay_bind,
                                   "actor.relay_advertise": advertise, "actor.worker_id": worker_id})
    from actors.actor import run as run_actor

    raise typer.Exit(run_actor(cfg, log_format=log_format) or 0)


@app.command()
def reward(
    config: Optional[str] = ConfigOpt,
    set_: list[str] = SetOpt,
    learner: Optional[str] = LearnerOpt,
    workers: Optional[int] = typer.Option(None, help="Scoring processes."),
    worker_id: Optional[str] = typer.Option(None, help="Stable id of this reward worker."),
    log_format: str = LogOpt,
) -> None:
    """A reward worker service: scores math and code responses for the learner."""
    cfg = _config(config, set_, **{"reward.learner": learner, "reward.workers": workers, "reward.worker_id": worker_id})
    from common.log import setup_logging
    from rewards.worker import run as run_reward

    setup_logging("reward", cfg.reward.worker_id, log_format)
    raise typer.Exit(run_reward(cfg.reward, cfg.bus) or 0)


@app.command()
def score(
    file: str = typer.Argument(..., help="JSONL of {response, reference} records."),
    kind: str = typer.Option(..., help="math | code"),
    workers: int = typer.Option(2, help="Scoring processes."),
    config: Optional[str] = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Score a file of responses and print one JSON result per line, in input order."""
    if kind not in ("math", "code"):
        typer.echo(f"or1: --kind must be math or code, got {kind!r}", err=True)
        raise typer.Exit(2)
    cfg = _config(config, set_)
    from rewards.score import score_file

    raise typer.Exit(score_file(file, kind, workers, cfg.reward))


@app.command()
def status(
    learner: str = typer.Option("tcp://127.0.0.1:5555", help="Learner control endpoint."),
    watch: float = typer.Option(0.0, help="Refresh every N seconds (0 = print once)."),
    json_out: bool = typer.Option(False, "--json", help="Print the raw status as JSON."),
    admin_key: str = AdminKeyOpt,
    config: Optional[str] = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Show the fleet (role, id, host, address, held version, lag, tokens/s, last heartbeat, trouble), version, η, queues."""
    cfg = _config(config, set_)
    from deploy.admin import show_status

    raise typer.Exit(show_status(learner, cfg, watch=watch, as_json=json_out, admin_key=admin_key))


@app.command("set")
def set_cmd(
    key: str = typer.Argument(..., help="Setting, e.g. max-staleness."),
    value: str = typer.Argument(..., help="New value."),
    learner: str = typer.Option("tcp://127.0.0.1:5555", help="Learner control endpoint."),
    admin_key: str = AdminKeyOpt,
    config: Optional[str] = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Change a setting of a live run, e.g. `or1 set max-staleness 2`."""
    cfg = _config(config, set_)
    from deploy.admin import set_value

    raise typer.Exit(set_value(learner, key, value, cfg, admin_key=admin_key))


@app.command()
def keys(
    directory: str = typer.Argument(..., help="Where to write the keys (then use --set bus.curve_dir=DIR on every node)."),
    clients: list[str] = typer.Option(["actor", "reward", "admin"], "--client", help="Client key pairs to make (repeatable)."),
) -> None:
    """Make CurveZMQ keys: DIR/server.key[_secret] for the learner (and relays), DIR/clients/NAME.key[_secret]
    per client role; DIR/clients is the learner's allow-list (delete a client's .key to refuse it)."""
    from bus.auth import make_layout

    make_layout(directory, clients)
    typer.echo(f"keys in {directory}: server + {', '.join(clients)}; start every role with --set bus.curve_dir={directory}")


@app.command()
def plot(run_dir: str = typer.Argument(..., help="A run directory with metrics.jsonl.")) -> None:
    """Write RUN_DIR/curves.png: reward, entropy and coefficient, staleness, throughput."""
    from deploy.plot import plot_run

    typer.echo(plot_run(run_dir))


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Model folder (a run's model/, or an exported checkpoint)."),
    data: Optional[str] = typer.Option(None, "--data", help="Eval set: jsonl/json/parquet (Skywork-OR1 or plain "
                                       "schema), Hub name or toy:NAME (default: the config's learner.data)."),
    split: str = typer.Option("train", help="Split of a Hub name or folder given with --data."),
    samples: int = typer.Option(4, "--samples", "-n", help="n: samples per problem."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature (default learner.sampling)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Most response tokens (default: the last stage's)."),
    k: Optional[str] = typer.Option(None, "--k", help="pass@k for these k, e.g. 1,8 (default 1, 2, 4, … n)."),
    limit: Optional[int] = typer.Option(None, help="Problems to evaluate."),
    out: Optional[str] = typer.Option(None, help="Write each problem's rewards here (JSONL)."),
    engine: Optional[str] = typer.Option(None, help="auto | vllm | vllm-async | hf"),
    config: Optional[str] = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """avg@n and unbiased pass@k per data source, scored by the training rewards; one JSON line."""
    cfg = _config(config, set_, **{"actor.engine": engine})
    from deploy.evaluate import evaluate

    _exit_with(evaluate, model, cfg, data=data, samples=samples, temperature=temperature, max_tokens=max_tokens,
               ks=k, limit=limit, out=out, split=split, errors=(ValueError,))


@app.command("filter")
def filter_cmd(
    model: str = typer.Argument(..., help="Model folder whose pass rates decide (unused for rows judged by model_difficulty)."),
    out: str = typer.Argument(..., help="Output of the kept rows, as read: .jsonl or .parquet."),
    data: Optional[str] = typer.Option(None, "--data", help="Input file, Hub name or toy:NAME (default: the config's learner.data)."),
    split: str = typer.Option("train", help="Split of a Hub name or folder given with --data (Skywork-OR1-RL-Data: math, code)."),
    math_samples: int = typer.Option(16, help="N samples per math problem (Skywork-OR1: 16)."),
    code_samples: int = typer.Option(8, help="N samples per code problem (Skywork-OR1: 8)."),
    samples: Optional[int] = typer.Option(None, help="N for both kinds (overrides the two above)."),
    difficulty: bool = typer.Option(True, "--difficulty/--no-difficulty",
                                    help="Judge rows carrying extra_info.model_difficulty by it, without sampling."),
    difficulty_model: Optional[str] = typer.Option(None, help="model_difficulty entry to use, e.g. "
                                                   "DeepSeek-R1-Distill-Qwen-7B (default: the one named in MODEL)."),
    difficulty_samples: int = typer.Option(16, help="Samples model_difficulty counts over (keep 0 < d < this)."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature (default learner.sampling)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Most response tokens (default: the last stage's)."),
    report: Optional[str] = typer.Option(None, help="Write one JSONL verdict per problem here."),
    engine: Optional[str] = typer.Option(None, help="auto | vllm | vllm-async | hf"),
    config: Optional[str] = ConfigOpt,
    set_: list[str] = SetOpt,
) -> None:
    """Offline difficulty filter: keep problems solved 0 < s < N times; rows written back unchanged."""
    cfg = _config(config, set_, **{"actor.engine": engine})
    from deploy.evaluate import offline_filter

    _exit_with(offline_filter, model, out, cfg, data=data, math_samples=samples or math_samples,
               code_samples=samples or code_samples, use_difficulty=difficulty, difficulty_model=difficulty_model,
               difficulty_samples=difficulty_samples, temperature=temperature, max_tokens=max_tokens, report=report,
               split=split, errors=(ValueError,))


@app.command("check-data")
def check_data_cmd(
    config: str = typer.Argument(..., help="Run config (TOML) whose learner.data to check."),
    set_: list[str] = SetOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
) -> None:
    """Parse every reference and tokenize every prompt as the learner will; print usable / unparseable /
    too-long counts per source and kind. Exit 1 when the learner would refuse to start."""
    cfg = _config(config, set_)
    from deploy.evaluate import check_data

    _exit_with(check_data, cfg, as_json=json_out)


@app.command("export")
def export_cmd(
    checkpoint: str = typer.Argument(..., help="A checkpoint directory, e.g. runs/x/checkpoints/step_000100."),
    directory: str = typer.Argument(..., help="Where to write the HF folder."),
    model: Optional[str] = typer.Option(None, help="Base model folder (default: the run's learner_config.json)."),
    dtype: str = typer.Option("auto", help="auto (the base folder's) | float32 | bfloat16 | float16"),
) -> None:
    """Write a checkpoint as an ordinary HF folder (config, tokenizer, model.safetensors)."""
    from learner.export import export_checkpoint

    try:
        typer.echo(export_checkpoint(checkpoint, directory, model=model, dtype=dtype))
    except (FileNotFoundError, ValueError) as e:
        typer.echo(f"or1: {e}", err=True)
        raise typer.Exit(2) from None


@app.command("tiny-model")
def tiny_model(
    directory: str = typer.Argument(..., help="Where to write the model folder."),
    warm: bool = typer.Option(True, "--warm/--no-warm", help="Warm-start with a short supervised pass."),
    seed: int = typer.Option(0, help="Seed."),
    task: str = typer.Option("addition", help="The toy task to warm-start on: addition or chain."),
) -> None:
    """Build the embedded tiny Qwen2 model with its own tokenizer (an ordinary HF folder)."""
    from common.tinymodel import main

    raise typer.Exit(main(directory, warm=warm, seed=seed, task=task))


@app.command("make-model")
def make_model(
    directory: str = typer.Argument(..., help="Where to write the model folder (empty or absent)."),
    like: str = typer.Option(..., "--like", help="Architecture shape: qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-3b, "
                                                   "qwen2.5-7b, r1-distill-qwen-1.5b, r1-distill-qwen-7b."),
    layers: Optional[int] = typer.Option(None, help="Fewer decoder layers than the shape (quick tests)."),
    dtype: str = typer.Option("bfloat16", help="bfloat16 | float32 | float16"),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """A real architecture's shape with random weights and the tiny model's tokenizer (padded to the
    real vocabulary): an ordinary HF folder, nothing downloaded."""
    from common.model_shapes import main

    raise typer.Exit(main(directory, like, layers=layers, dtype=dtype, seed=seed))


if __name__ == "__main__":
    app()
