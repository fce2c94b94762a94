"""The engine's driver: data, PS, Ray Train, progress, final evaluation, embedding export.

    summary = train(load_config(EngineConfig, "configs/demo.yaml"))

1. connect to Ray (`scale.address`, RAY_ADDRESS, or an embedded local Ray);
2. prepare the data (leave-one-out; train sequences written as Parquet shards under run_dir/data);
3. build the model once here to learn its PS tables; create the PS (Ray actors, or in-process for
   one worker) and write its initial state, so any restart before the first checkpoint starts clean;
4. run `train_loop_per_worker` under `TorchTrainer` (DDP over gloo on CPU, NCCL with GPUs), with
   FailureConfig retries and, when `scale.min_workers > 0`, elastic between min and max workers;
5. restore the best validated checkpoint (dense + PS), evaluate it and the baselines on the test
   split, export its vectors as Parquet (the model's `export` hook, else the PS tables), and write
   metrics.json beside curves.jsonl.

A second `train` on the same run_dir resumes the run from its latest checkpoint (Ray Train keeps
the run's state under run_dir/train); `resume_from` points at any checkpoint directory instead.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from xdtrain.config import ConfigError, to_dict
from xdtrain.localray import bind_to_loopback, init_local
from xdtrain.models import build_model, model_config
from xdtrain.outputs import claim_output_dir, disk_full, write_json_atomic
from xdtrain.ps.shm import reclaim_orphans
from xdtrain.report import render_report
from xdtrain.train import checkpointing as ck
from xdtrain.train import plan
from xdtrain.train.config import EngineConfig, check_ranges
from xdtrain.train.datasets import PreparedData, prepare_data
from xdtrain.train.evaluation import summarize_tests, test_report
from xdtrain.train.progress import ProgressBoard, ProgressWatcher
from xdtrain.train.raylog import RayLog
from xdtrain.train.transfer import export_embeddings, transfer_ps
from xdtrain.train.worker import train_loop_per_worker

RUN_NAME = "train"  # Ray Train's run directory inside run_dir


def connect_ray(cfg: EngineConfig, log: RayLog | None = None) -> bool:
    """Join the configured cluster or start an embedded one; True when this call started Ray.
    Worker output is always forwarded to the driver: `log` (when quiet) takes it into its file."""
    if log is not None and log.active:
        print(log.describe())
    if ray.is_initialized():
        if log is not None:
            log.take_worker_output()
        return False
    env = {"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}}
    address = cfg.scale.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        # Under `ray job submit` the job's runtime_env already applies (cluster/runtime_env.py) and
        # Ray refuses a second one with the same keys.
        in_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
        if address.split("://")[-1].split(":")[0] in ("127.0.0.1", "localhost"):
            bind_to_loopback()  # a cluster on this machine (cluster/local.py): the driver listens on loopback too
        ray.init(address=address, runtime_env=None if in_job else env, log_to_driver=True)
    else:
        need = cfg.scale.workers * cfg.scale.cpus_per_worker
        init_local(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                 resources={"ps": 8.0, "trainer": float(cfg.scale.workers)},
                 include_dashboard=False, runtime_env=env, log_to_driver=True)
    if log is not None:
        log.take_worker_output()
    return True


def _check(cfg: EngineConfig) -> None:
    s = cfg.scale
    check_ranges(cfg)
    if s.min_workers and not 1 <= s.min_workers <= s.workers:
        raise ConfigError(f"scale.min_workers must be in [1, scale.workers={s.workers}], got {s.min_workers}")
    if cfg.ps.backend == "local" and (s.workers > 1 or s.min_workers > 1):
        raise ConfigError("ps.backend 'local' keeps tables inside the one worker: use scale.workers=1 "
                          "or ps.backend=ray")
    model_config(cfg.model)  # a bad model section fails before any data or Ray work


def check_program(cfg: EngineConfig, model: object, data: PreparedData) -> None:
    """The model's training program under this config, checked on the driver before any Ray work
    (e.g. train.epochs=0 with a program whose phases count epochs), and every dataset its streams
    read prepared by the data recipe: a ConfigError (exit 2) before any worker starts."""
    t = cfg.train
    try:
        prog = plan.program_for(model, t)
    except ValueError as e:
        raise ConfigError(f"model {cfg.model.get('name')!r} cannot train with train.epochs={t.epochs}, "
                          f"train.batch_size={t.batch_size}: {e}") from None
    for name, spec in prog.streams.items():
        if spec.dataset not in data.streams:
            raise ConfigError(f"data.streams: the model's stream {name!r} reads dataset {spec.dataset!r}, but the "
                              f"data recipe prepares only {sorted(data.streams)}; add {spec.dataset!r} to data.streams")


def make_ps(cfg: EngineConfig, run_id: str):
    if cfg.ps.backend == "local":
        from xdtrain.ps import LocalPS

        return LocalPS(cfg.ps.shards, staleness=cfg.ps.staleness)
    from xdtrain.ps import PSClient

    return PSClient(cfg.ps.shards, name=f"ps-{run_id}", staleness=cfg.ps.staleness,
                    max_restarts=cfg.ps.max_restarts)


def scaling(cfg: EngineConfig) -> ScalingConfig:
    s = cfg.scale
    resources = {"CPU": s.cpus_per_worker}
    if s.trainer_resource > 0:
        resources["trainer"] = s.trainer_resource
    workers = (s.min_workers, s.workers) if s.min_workers else s.workers
    return ScalingConfig(num_workers=workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                         elastic_resize_monitor_interval_s=s.resize_check_s)


def stream_datasets(data: PreparedData) -> dict[str, tuple[str, str]]:
    """Dataset name -> (URL, reader table kind) of every prepared dataset a stream may read."""
    return {name: (url, data.stream_tables[name]) for name, url in data.streams.items()}


def fit(cfg: EngineConfig, data: PreparedData, ps, ps_init: str, board, init_dense: str = "",
        faults: dict | None = None):
    """Run the Ray Train part; returns Ray's Result."""
    run_dir = Path(cfg.run_dir).resolve()
    config = {
        "cfg": cfg, "board": board, "storage": str(run_dir / RUN_NAME),
        "model_data": data.model_data, "datasets": stream_datasets(data),
        "valid": ray.put(data.valid) if cfg.train.eval_every else None,
        "ps": ps if cfg.ps.backend == "ray" else None, "ps_init": ps_init, "init_dense": init_dense,
        "resume_from": cfg.resume_from, "faults": faults or {},
    }
    ck.reconcile_ray_snapshot(run_dir / RUN_NAME)  # a re-run resumes, though old checkpoints were pruned
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if cfg.scale.use_gpu else "gloo"),
        scaling_config=scaling(cfg),
        run_config=RunConfig(
            name=RUN_NAME, storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # Retention is the engine's own (checkpointing.prune): keep every registered checkpoint here.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    with ProgressWatcher(board, run_dir, show=cfg.train.progress):
        return trainer.fit()


def best_checkpoint(run_dir: Path) -> tuple[Path, ck.EngineState]:
    """The checkpoint of the best validation (or the latest when nothing was validated)."""
    latest = ck.latest_checkpoint(run_dir / RUN_NAME)
    if latest is None:
        raise RuntimeError(f"{run_dir / RUN_NAME}: training wrote no checkpoint")
    state = ck.load_state(latest)
    best = run_dir / RUN_NAME / state.best_dir
    if state.best_dir and ck.is_complete(best):
        return best, state
    return latest, state


def train(cfg: EngineConfig, faults: dict | None = None) -> dict:
    """The pretrain job (see the module docstring); returns the summary written to metrics.json."""
    _check(cfg)
    # Ray Train workers run in their own working directory: a relative checkpoint path is the driver's
    cfg = replace(cfg, **{k: str(Path(v).resolve()) for k in ("resume_from", "init_from")
                          if (v := getattr(cfg, k)) and "://" not in v})
    for named in (cfg.resume_from, cfg.init_from):  # a checkpoint a user names must be complete
        if named:
            ck.require_complete(named)
    run_dir = claim_output_dir(cfg.run_dir, "run_dir", overwrite=cfg.overwrite)  # before anything is written
    with RayLog(run_dir, cfg.verbose) as log:
        try:
            return _train(cfg, run_dir, log, faults)
        finally:
            reclaim_orphans()  # the shared memory of workers that ended without cleaning up (killed)


def _train(cfg: EngineConfig, run_dir: Path, log: RayLog, faults: dict | None) -> dict:
    t0 = time.time()
    reclaim_orphans()  # shared-memory buffers of crashed runs
    # Data and model first: bad input or config fails in seconds, before Ray starts.
    connected = []  # the Ray Data preparation path joins Ray first
    data = prepare_data(cfg.data, run_dir, min_groups=4 * cfg.scale.workers,
                        connect=lambda: connected.append(connect_ray(cfg, log)))
    print(f"[xdtrain] data: {data.stats}")
    model = build_model(cfg.model, data.model_data, cfg.train.seed)
    check_program(cfg, model, data)
    if not connected:
        connect_ray(cfg, log)
    ps = make_ps(cfg, run_dir.name)
    for spec in model.sparse_tables():
        ps.create_table(spec)
    init_dense = ""
    if cfg.init_from:  # the PS of the transfer (cfg.transfer) becomes this run's starting checkpoint
        src = Path(cfg.init_from)  # verified in `train`
        report = transfer_ps(ps, ck.ps_url(src), model.sparse_tables(), cfg.transfer)
        print(f"[xdtrain] init_from {src.name}, {report.line('PS tables')}, optimizer {cfg.transfer.ps_optimizer}")
        init_dense = str(src)
    ps_init = str(run_dir / "ps_init")
    ps.checkpoint(ps_init)
    # On the driver's node: it must outlive any worker node that is lost or removed. Hard
    # affinity: with soft=True Ray placed it on another node of a local cluster (seen in CI),
    # which the elasticity test then killed.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = ProgressBoard.options(scheduling_strategy=here, max_restarts=-1, max_task_retries=-1).remote(
        str(run_dir / "attempts.json"))
    t_fit = time.time()
    result = fit(cfg, data, ps, ps_init, board, init_dense, faults)
    if result.error is not None:
        if disk_full(result.error) is not None:
            ck.discard_incomplete(run_dir / RUN_NAME)
        raise result.error  # a full disk in it: one line from the job runner (outputs.disk_full)
    fit_seconds = time.time() - t_fit
    summary = finish(cfg, data, model, ps, run_dir)
    attempts = ray.get(board.since.remote(0))[2]
    summary.update(fit_seconds=round(fit_seconds, 1), wall_seconds=round(time.time() - t0, 1),
                   attempts=attempts, data=data.stats)
    if cfg.ps.backend == "ray":
        summary["ps_stats"] = {k: v for k, v in ps.stats(shards=False).items()}
        summary["ps_shard_pids"] = ps.shard_pids()
    write_json_atomic(run_dir / "metrics.json", summary)  # the job runner rewrites it with the config
    summary["report"] = render_report(str(run_dir)).get("html", "")
    print(f"[xdtrain] report: {summary['report']}")
    return summary


def finish(cfg: EngineConfig, data: PreparedData, model, ps, run_dir: Path) -> dict:
    """Restore the best checkpoint, test it (and the baselines), export the tables."""
    best_dir, state = best_checkpoint(run_dir)
    ck.load_dense(best_dir, model)
    ps.restore(ck.ps_url(best_dir))
    print(f"[xdtrain] testing {best_dir.name} (step {state.best_step if state.best_step >= 0 else state.step})")
    t0 = time.time()
    tests = run_tests(cfg, data, model, ps, run_dir)
    exports = {}
    if cfg.export_embeddings:
        exports = export_embeddings(model, ps, run_dir / "embeddings", state.best_step, users=data.test.rows)
    return {
        "run_dir": str(run_dir),
        "checkpoint": str(best_dir),
        "steps": state.step, "epochs": state.epoch,
        "samples": state.samples, "stop_reason": state.stop_reason,
        "best_step": state.best_step, "valid": state.best_metrics, "validations": state.validations,
        **summarize_tests(tests), "test_seconds": round(time.time() - t0, 1), "embeddings": exports,
        "config_resolved": to_dict(cfg),
    }


def run_tests(cfg: EngineConfig, data: PreparedData, model, ps, run_dir: Path) -> dict:
    """The model and the baselines on the test split (text baselines share the model's text cache)."""
    return test_report(model, ps.pull, data.test, cfg.eval, run_dir / "test", name=cfg.model.get("name", "model"),
                       model_data=data.model_data, text_cache=str(cfg.model.get("text_cache", "")))


# ---------------------------------------------------------------- jobs


def run_pretrain(cfg: EngineConfig) -> dict:
    """`python -m jobs.pretrain --config ...`: train from scratch (or resume the run in run_dir)."""
    return train(cfg)


def run_finetune(cfg: EngineConfig) -> dict:
    """`python -m jobs.finetune --config ... init_from=<checkpoint>`: start dense + PS from a
    checkpoint (fresh optimizer and data cursor) and train on this config's data."""
    if not cfg.init_from:
        raise ConfigError("finetune: set init_from=<checkpoint directory> (e.g. a pretrain run's "
                          "train/checkpoint_*)")
    return train(cfg)


def run_evaluate(cfg: EngineConfig) -> dict:
    """`python -m jobs.evaluate --config ... init_from=<checkpoint>`: test a checkpoint, no training
    (loaded as a finetune would start from it: `transfer:` applies)."""
    if not cfg.init_from:
        raise ConfigError("evaluate: set init_from=<checkpoint directory>")
    check_ranges(cfg)
    src = Path(cfg.init_from).resolve()
    state = ck.open_checkpoint(src)
    run_dir = claim_output_dir(cfg.run_dir, "run_dir", overwrite=cfg.overwrite)
    with RayLog(run_dir, cfg.verbose) as log:
        connected = [connect_ray(cfg, log)] if cfg.ps.backend == "ray" else []
        data = prepare_data(cfg.data, run_dir, min_groups=1,
                            connect=lambda: connected or connected.append(connect_ray(cfg, log)))
        model = build_model(cfg.model, data.model_data, cfg.train.seed)
        # the model a finetune from this checkpoint would start from (cfg.transfer): modules and tables
        # the checkpoint lacks are at their init, and the report says which
        transfer = {"dense": ck.load_dense_partial(src, model).line("dense")}
        ps = make_ps(cfg, run_dir.name)
        transfer["ps"] = transfer_ps(ps, ck.ps_url(src), model.sparse_tables(), cfg.transfer).line("PS tables")
        print(f"[xdtrain] init_from {src.name}: {transfer['dense']}; {transfer['ps']}")
        t0 = time.time()
        tests = run_tests(cfg, data, model, ps, run_dir)
    return {"run_dir": str(run_dir), "checkpoint": str(src), "checkpoint_step": state.step, **summarize_tests(tests),
            "test_seconds": round(time.time() - t0, 1), "data": data.stats, "transfer": transfer}
