"""Turn a config into a finished run directory: prepare everything, then loop over rounds.

Everything that can fail because of user input (config values, data, partition, model parameters,
device) fails in :func:`prepare`, *before* a run directory is created, so a bad run leaves nothing
behind.  :func:`run` drives any engine round by round, evaluates, writes metrics and checkpoints, and
resumes from the last checkpoint exactly (per-round seeds are derived from the run seed and the round
number, so the rounds after a resume are those an uninterrupted run would have done; a ``[privacy]`` run's
noise and cohorts come from OS entropy instead, and each of its rounds is checkpointed before its model
leaves the server, so a resume never re-runs a released round).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hetfl.accounting import evaluated_models, tier_totals
from hetfl.algorithms.base import ServerState
from hetfl.config import RunConfig, parse_toml
from hetfl.decentralized.torchrun import serve_if_worker
from hetfl.engines import check_engine, engine_for, loop_for
from hetfl.errors import ConfigError, HetflError
from hetfl.experiment import Experiment, resolve_device  # noqa: F401  (re-exported)
from hetfl.experiment import prepare as build_experiment
from hetfl.logwriters import check_writers, open_writers
from hetfl.model_cache import ModelCache
from hetfl.precision import PrecisionChoice, choose_for
from hetfl.privacy.plan import check_resume
from hetfl.progress import RunProgress
from hetfl.reliability.guard import fault_summary
from hetfl.resolve import config_from_dict
from hetfl.results import CONFIG, PARTITION, RunDir, atomic_write_text, config_text, read_summary


def prepare(cfg: RunConfig) -> Experiment:
    """:func:`hetfl.experiment.prepare` after checking the engine name: everything a run needs, built and
    checked before any file is written."""
    check_engine(cfg.engine.name)  # an unknown engine fails before anything is loaded or written
    check_writers(cfg)  # [log] to: a writer whose package is missing fails here, naming the extra
    noised = cfg.privacy.noise_multiplier > 0 or cfg.privacy.target_epsilon is not None
    if noised and cfg.checkpoint_every != 1:
        raise ConfigError(f"checkpoint_every={cfg.checkpoint_every}: a [privacy] run with noise checkpoints every "
                          f"round before its model leaves the server, so that a resume never re-runs (and re-noises) "
                          f"a round that was already released; set checkpoint_every = 1 (docs/privacy.md, Resume)")
    exp = build_experiment(cfg)
    engine_for(cfg.engine.name, exp.algorithm)  # and one that does not carry the algorithm's protocol
    return exp


def default_out_dir(cfg: RunConfig, config_path: str | Path | None) -> Path:
    stem = cfg.name or (Path(config_path).stem if config_path else f"{cfg.data.name}_{cfg.algorithm.name}")
    return Path("runs") / f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def summarize_metrics(rows: list[dict[str, Any]], wall_time_s: float, cfg: RunConfig,
                      status: str) -> dict[str, Any]:
    evals = [r for r in rows if r.get("test_accuracy") is not None]
    last = evals[-1] if evals else {}
    best = max(evals, key=lambda r: r["test_accuracy"]) if evals else {}
    last5 = [r["test_accuracy"] for r in evals[-5:]]
    summary: dict[str, Any] = {
        "status": status,
        "name": cfg.name,
        "dataset": cfg.data.name,
        "partition": cfg.data.partition.name,
        "model": cfg.model.name,
        "algorithm": cfg.algorithm.name,
        "num_clients": cfg.data.num_clients,
        "seed": cfg.seed,
        "rounds": cfg.rounds,
        "rounds_completed": rows[-1]["round"] if rows else 0,
        "test_accuracy": last.get("test_accuracy"),
        "test_loss": last.get("test_loss"),
        "best_test_accuracy": best.get("test_accuracy"),
        "best_round": best.get("round"),
        "test_accuracy_last5_mean": float(np.mean(last5)) if last5 else None,
        # FedGen's reference metric: the mean of the 5 best evaluated rounds (selected on the test set)
        "test_accuracy_best5_mean": float(np.mean(sorted(r["test_accuracy"] for r in evals)[-5:])) if evals else None,
        "wall_time_s": round(wall_time_s, 3),
        "bytes_up": int(sum(r.get("bytes_up", 0) for r in rows)),
        "bytes_down": int(sum(r.get("bytes_down", 0) for r in rows)),
    }
    for key in ("client_acc_mean", "client_acc_p10", "client_acc_worst10"):
        if key in last:
            summary[key] = last[key]
    summary.update(fault_summary(rows))  # participation per tier, skipped rounds, drops (guarded engines)
    tiers = tier_totals(rows)  # the run's per-tier costs (server engines write tier.<label>.<field> each round)
    if tiers:
        summary["tier_totals"] = tiers
    return summary


def run_or_resume(cfg: RunConfig, run_dir: str | Path, *, quiet: bool = True) -> str:
    """Bring ``run_dir`` to ``cfg.rounds`` rounds: ``"reused"`` if it already holds a complete run of that
    many rounds, ``"resumed"`` if it holds an interrupted or shorter one (continued from its checkpoint),
    ``"done"`` after a fresh run.  What benchmark scripts use to make re-running them cheap."""

    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    if summary is not None:
        if summary.get("status") == "complete" and summary.get("rounds_completed") == cfg.rounds:
            return "reused"
        run(cfg, resume=run_dir, quiet=quiet)
        return "resumed"
    run(cfg, run_dir, quiet=quiet)
    return "done"


def virtual_clock(row: dict[str, Any], rows: list[dict[str, Any]]) -> float:
    """``virtual_time_s`` of a metrics row: the simulated seconds since the run began (the fleet's time model,
    :mod:`hetfl.reliability.plan`): the previous row's plus this round's ``round_sim_time_s``, unless the round
    rule keeps its own clock (FedBuff, :mod:`hetfl.asynchronous`)."""
    if "virtual_time_s" not in row:
        before = float(rows[-1].get("virtual_time_s", 0.0) or 0.0) if rows else 0.0
        row["virtual_time_s"] = round(before + float(row.get("round_sim_time_s", 0.0) or 0.0), 6)
    return float(row["virtual_time_s"])


def run(
    cfg: RunConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    quiet: bool = False,
    config_path: str | Path | None = None,
    engine: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) an experiment; returns the summary written to summary.json.

    ``engine``: a factory ``(algorithm, federation, ctx, device, cfg) -> engine`` to use instead of the
    registered ``cfg.engine.name`` (a test's transport, a Flower simulation with a custom ClientApp).  The
    algorithm's protocol (server or graph, :func:`hetfl.engines.loop_for`) picks the engines and the evaluator."""

    served = serve_if_worker(cfg, prepare)  # a torchrun rank above 0 hosts nodes for rank 0, which writes every file
    if served is not None:
        return served
    ckpt = None
    if resume is not None:
        run_dir = RunDir.open(resume)
        saved = config_from_dict(parse_toml((run_dir.path / CONFIG).read_text(), str(run_dir.path / CONFIG)))
        cfg = _merge_resume(saved, cfg)
        check_resume(saved.privacy, saved.rounds, cfg.rounds)
        ckpt = run_dir.load_checkpoint()
        exp = prepare(cfg)
        if not (run_dir.path / PARTITION).is_file():  # killed between creating the directory and writing it
            run_dir.write_json(PARTITION, exp.federation.summary.to_dict())
        if cfg.rounds != saved.rounds:
            atomic_write_text(run_dir.path / CONFIG, config_text(cfg))
    else:
        if cfg is None:
            raise HetflError("no config given")
        exp = prepare(cfg)
        run_dir = RunDir.create(out_dir or default_out_dir(cfg, config_path), config_text(cfg))
        run_dir.write_json(PARTITION, exp.federation.summary.to_dict())

    setup = settle_precision(exp, read_summary(run_dir.path) if ckpt is not None else None, quiet)
    writers = open_writers(cfg, run_dir.path, config_text(cfg))  # [log]: TensorBoard / MLflow (none by default)
    loop = loop_for(exp.algorithm)
    factory = engine if engine is not None else engine_for(cfg.engine.name, exp.algorithm)
    # the engine sees the resolved train config: what Flower nodes and torchrun ranks rebuild their setup from
    engine = factory(exp.algorithm, exp.federation, exp.ctx, exp.device, cfg.replace(train=exp.ctx.train))
    evaluator = loop.evaluator(exp.federation, exp.ctx, cfg.eval, ModelCache(exp.ctx, exp.device), exp.device, cfg.seed)
    if ckpt is not None:
        state = ServerState.from_dict(ckpt["state"])
        start, elapsed = int(ckpt["round"]), float(ckpt["elapsed_s"])
    else:
        state = exp.algorithm.init_state(exp.ctx)
        start, elapsed = 0, 0.0
    run_dir.truncate_metrics(start)
    # [privacy] with noise: the release rule, a checkpoint every round before its model leaves (docs/privacy.md)
    private = exp.ctx.privacy is not None and exp.ctx.privacy.noise_multiplier > 0
    if ckpt is not None and ckpt.get("row") and not any(r.get("round") == start for r in run_dir.metrics()):
        _finish_row(run_dir, json.loads(ckpt["row"]), cfg, evaluator, exp, state)  # killed after the checkpoint

    t_start = time.perf_counter() - elapsed
    status = "running"
    # until this run ends, summary.json must not claim an earlier "complete" (a kill -9 leaves "running")
    rows = run_dir.metrics()
    run_dir.write_summary({**summarize_metrics(rows, elapsed, cfg, status), **setup, "run_dir": str(run_dir.path)})
    label = cfg.name or f"{cfg.algorithm.name}/{cfg.model.name}/{cfg.data.name}"
    try:
        with RunProgress(cfg.rounds, start, label=label, quiet=quiet) as bar:
            evaluator.progress = bar.eval_step  # evaluation shows as its own step (per model: width, family, ...)
            for rnd in range(start + 1, cfg.rounds + 1):
                t0 = time.perf_counter()
                bar.phase(rnd, "training")
                state, report = engine.run_round(state, rnd)
                for message in getattr(report, "messages", ()):  # failed/rejected clients, skipped rounds
                    bar.log(f"round {rnd}: {message}")
                row: dict[str, Any] = {"round": rnd, **report.as_metrics()}
                row.update(exp.algorithm.round_metrics(state))
                virtual_clock(row, rows)
                if private:  # saved before evaluation sends the model anywhere: a resume never re-runs this round
                    run_dir.save_checkpoint({"round": rnd, "state": state.to_dict(),
                                             "elapsed_s": time.perf_counter() - t_start, "seed": cfg.seed,
                                             "torch_rng": torch.get_rng_state(),
                                             "row": json.dumps(row, default=_json_value)})
                if cfg.eval.due(rnd, cfg.rounds):
                    t1 = time.perf_counter()
                    bar.phase(rnd, "evaluating")
                    row.update(evaluator(exp.algorithm, state))
                    row["eval_time_s"] = round(time.perf_counter() - t1, 4)
                now = time.perf_counter()
                row["round_time_s"] = round(now - t0, 4)
                row["time_s"] = round(now - t_start, 4)
                if not row.get("skipped") and not math.isfinite(row.get("train_loss", 0.0) or 0.0):
                    bar.log(f"round {rnd}: training loss is not finite (diverged?); lower train.lr")
                run_dir.append_metrics(row)
                for writer in writers:
                    writer.write(rnd, row)
                rows.append(row)
                if rnd == cfg.rounds or (cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0):
                    if not private:
                        run_dir.save_checkpoint({"round": rnd, "state": state.to_dict(),
                                                 "elapsed_s": now - t_start, "seed": cfg.seed,
                                                 "torch_rng": torch.get_rng_state()})
                    # summary.json follows the checkpoint (atomically): rounds_completed, accuracy so far
                    run_dir.write_summary({**summarize_metrics(rows, now - t_start, cfg, status), **setup,
                                           "run_dir": str(run_dir.path)})
                bar.update(rnd, row)
        status = "complete"
    except KeyboardInterrupt as exc:
        status = "interrupted"
        exc.run_dir = str(run_dir.path)  # type: ignore[attr-defined]  (the CLI's resume hint names it)
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        engine.close()
        rows = run_dir.metrics()
        summary = summarize_metrics(rows, time.perf_counter() - t_start, cfg, status)
        summary.update(exp.algorithm.summarize(rows))
        if status == "complete" and loop.protocol == "server":  # every tier's model: its FLOPs beside its accuracy
            last = next((r for r in reversed(rows) if r.get("test_accuracy") is not None), {})
            summary["evaluated_models"] = evaluated_models(exp.algorithm.eval_targets(state, exp.ctx), exp.ctx.info,
                                                           last)
        summary.update(setup)
        if exp.ctx.privacy is not None:  # epsilon is recomputed from the rounds done (exact after a resume)
            summary["privacy"] = exp.ctx.privacy.summary(rows[-1]["round"] if rows else 0)
        summary["run_dir"] = str(run_dir.path)
        run_dir.write_summary(summary)
        for writer in writers:
            writer.close(summary)
    return summary


def settle_precision(exp: Experiment, recorded: dict[str, Any] | None, quiet: bool = True) -> dict[str, Any]:
    """Resolve ``train.precision`` (``auto``: measured, :mod:`hetfl.precision`) once for the whole run and
    write it into ``exp.ctx.train``, from which every task's train config comes (so worker processes,
    batched clients and Flower nodes follow it); a resumed run reuses the choice its summary recorded.
    Returns what summary.json records."""
    train = exp.ctx.train
    if recorded is not None and recorded.get("precision") in ("fp32", "bf16") and train.precision != "fp32":
        choice = PrecisionChoice(recorded["precision"], recorded.get("memory_format", train.memory_format),
                                 recorded.get("precision_reason", "recorded at the run's start"))
    else:
        choice = choose_for(exp.ctx, exp.federation.train.x[:64], exp.device)
    exp.ctx = dataclasses.replace(exp.ctx, train=choice.apply(train))
    if train.precision != "fp32" and not quiet:
        print(f"precision: {choice.precision}, memory_format {choice.memory_format} ({choice.reason})", flush=True)
    return choice.summary()
def _json_value(obj: Any) -> Any:
    return obj.item() if hasattr(obj, "item") else str(obj)


def _finish_row(run_dir: RunDir, row: dict[str, Any], cfg: RunConfig, evaluator: Any, exp: Experiment,
                state: ServerState) -> None:
    """A private run killed between a round's checkpoint and its metrics row: the row, saved in the
    checkpoint, is completed (evaluating the checkpointed model again releases nothing new) and appended."""
    rnd = int(row["round"])
    if cfg.eval.due(rnd, cfg.rounds):
        row.update(evaluator(exp.algorithm, state))
    run_dir.append_metrics(row)


def _merge_resume(saved: RunConfig, given: RunConfig | None) -> RunConfig:
    """A resumed run keeps its saved config; only ``rounds`` may be extended (or given equal)."""
    if given is None:
        return saved
    # how the rounds are carried may change (processes, threads, timeouts); what they compute may not
    engine = dataclasses.replace(saved.engine, name=given.engine.name, batched=given.engine.batched)
    if dataclasses.replace(given, rounds=saved.rounds, device=saved.device, engine=engine) != saved:
        raise ConfigError("--resume continues the run with its saved config.toml; only rounds (and device, and "
                          "[engine] knobs but name and batched: workers, threads_per_worker, worker_timeout_s, ...) "
                          "may change. Drop the CONFIG argument or the other --set overrides")
    if given.rounds < saved.rounds:
        raise ConfigError(f"rounds={given.rounds} is less than the run's rounds={saved.rounds}")
    return given
