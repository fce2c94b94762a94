"""`train_loop_per_worker`: the one training loop every method runs under Ray Train's TorchTrainer.

The loop runs the model's training program (xdtrain/nn/program.py): phases -> rounds -> steps ->
iterations. One iteration, on every worker (all workers step together):
  1. the next batch of each of the step's streams (this worker's shard, shuffled, exact cursors)
     -> model.make_batch; the next iteration's batches are read ahead and their rows prefetched;
  2. pull the rows their sparse ids need from the PS;
  3. forward (a loss, or named losses) and backward;
  4. average the stepped optimizer's gradients over the workers (xdtrain/train/optimizers.py says
     why this replaces DDP), clip, step it, and push its tables' row gradients (scaled 1/world, so
     the PS sees the global-batch mean).
A worker whose main stream is dry takes zero-weight iterations until every worker is, so the
collectives stay in lockstep (shards are balanced by rows, so this is at most a step or two).

Checkpoints (phase epochs, every `checkpoint_every` iterations, and the end) are consistent at one
iteration: pushes are flushed, all workers meet at a barrier, the PS shards write their state,
then each worker reports its cursors (rank 0 also the dense state, the optimizers and the program
position) through `ray.train.report`, itself a barrier. Any restart, after a failure, an elastic
resize or a new `fit`, continues from the latest checkpoint, mid-phase if need be.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from xdtrain.models import build_model
from xdtrain.nn.program import Phase, Step
from xdtrain.nn.sparse import prefetch_rows, pull_rows, push_row_grads, row_grads
from xdtrain.train import checkpointing as ck
from xdtrain.train import plan
from xdtrain.train.config import EngineConfig
from xdtrain.train.evaluation import RankingEval
from xdtrain.train.optimizers import OptimizerSet, broadcast_dense
from xdtrain.train.row_reduce import all_reduce_row_grads, share
from xdtrain.train.streams import Dataset, Stream, accepts, seed_of
from xdtrain.train.transfer import transfer_dense


@dataclass
class Pending:
    """One iteration's batches, read ahead, with each stream's cursor from before it was read."""

    position: tuple[int, int]
    batches: dict[str, dict] | None  # None: this worker's main stream is dry
    rows: int
    cursors: dict[str, dict]
    keys: dict[str, list] | None = None  # stream -> the user ids read (train.trace_rows)


def _agree_any(flags: list[bool], world: int, device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over all workers (one tiny all-reduce; on the worker's
    device, since NCCL reduces GPU tensors only)."""
    t = torch.tensor([float(f) for f in flags], device=device)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0.5) for v in t]


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _make_ps(cfg: EngineConfig, handed):
    """The Ray PS handed over by the driver, or an in-process one (1 worker)."""
    if handed is not None:
        return handed
    from xdtrain.ps import LocalPS

    return LocalPS(cfg.ps.shards, staleness=cfg.ps.staleness)


def _to_device(batch, device: torch.device):
    if device.type == "cpu":
        return batch
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def pick_loss(out, step: Step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the loss to back-propagate, the named losses) of a forward's output."""
    if isinstance(out, torch.Tensor):
        return out, {}
    if step.loss:
        if step.loss not in out:
            raise KeyError(f"step {step.label!r} back-propagates {step.loss!r}, but forward returned {sorted(out)}")
        return out[step.loss], out
    return (out["loss"] if "loss" in out else sum(out.values())), out


class Worker:
    """The state of one worker's training loop (see the module docstring)."""

    def __init__(self, config: dict) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.cfg: EngineConfig = config["cfg"]
        self.board = config["board"]
        self.storage: str = config["storage"]
        cfg, t = self.cfg, self.cfg.train
        if cfg.scale.threads:
            torch.set_num_threads(cfg.scale.threads)
        self.attempt = ray.get(self.board.new_attempt.remote(self.world)) if self.rank == 0 else -1
        self.board.register.remote(self.rank, os.getpid())

        torch.manual_seed(t.seed)
        self.model = build_model(cfg.model, config["model_data"], t.seed)
        self.device = ray.train.torch.get_device() if cfg.scale.use_gpu else torch.device("cpu")
        self.model.to(self.device)
        self.ps = _make_ps(cfg, config["ps"])
        self.prog = plan.program_for(self.model, t)
        self.optimizers = OptimizerSet(self.model, self.prog.optimizers)
        datasets = {k: Dataset(*v) for k, v in config["datasets"].items()}  # engine.check_program: all there
        self.streams = {name: Stream(name, spec, datasets[spec.dataset], self.model,
                                     world=self.world, rank=self.rank, seed=t.seed, shuffle_buffer=t.shuffle_buffer)
                        for name, spec in self.prog.streams.items()}
        self.forward_takes_step = accepts(self.model.forward, "step")
        self.state = ck.EngineState(world_size=self.world)
        self._restore(config)
        self.state.world_size = self.world
        if self.state.stop_reason in ("max_steps", "time budget"):  # a budget stop: the new budget applies
            self.state.finished, self.state.stop_reason = False, ""
        broadcast_dense(self.model, self.world)
        self.valid = RankingEval(ray.get(config["valid"]), cfg.eval) if self.rank == 0 and config["valid"] else None
        self.faults = dict(config.get("faults") or {})
        self.pending: Pending | None = None
        self.t_start = time.time()
        self._reset_window()

    # ---- restore ---------------------------------------------------------------------------------
    def _restore(self, config: dict) -> None:
        # The newest complete checkpoint (Ray Train's latest may be incomplete), else resume_from.
        found = ck.resume_point(config.get("resume_from", ""), self.storage)
        ckpt = Checkpoint(found) if found else None
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self.state = ck.load_state(d)
                ck.load_dense(d, self.model)
                ck.load_optimizer(d, self.optimizers)
                cursors = ck.load_cursors(d, self.state.world_size)
                # A local checkpoint is read in place; a downloaded copy is not visible to remote
                # shards, which then read the PS state where it was written.
                in_place = os.path.abspath(d) == os.path.abspath(ckpt.path)
                ps_src = ck.ps_url(d) if in_place or not self.state.ps_url else self.state.ps_url
                for name, stream in self.streams.items():
                    if name in cursors:  # a stream the checkpoint knew (else it starts at its beginning)
                        stream.restore(cursors[name])
                if self.rank == 0:
                    self.ps.restore(ps_src)
        else:
            if config.get("init_dense"):  # finetune: shared weights (and optimizer state, if kept)
                reports = transfer_dense(config["init_dense"], self.model, self.optimizers, self.cfg.transfer)
                if self.rank == 0:
                    print("[xdtrain] init_from: " + "; ".join(r.line(k) for k, r in reports.items()))
            ps_src = config["ps_init"]
            if self.rank == 0:
                self.ps.restore(ps_src)
        _barrier(self.world)
        self._committed(ps_src)
        self._apply_ps_lr_scales()

    def _apply_ps_lr_scales(self) -> None:
        """The current phase's learning-rate scale of every table (only programs that use scales).
        Every worker sets it: each client replays its own pushes, in order, after a shard fails."""
        if not any(ph.ps_lr_scale for ph in self.prog.phases):
            return
        scales = self.prog.phases[self.state.phase].ps_lr_scale
        for table in self.ps.tables():
            self.ps.set_lr_scale(table, float(scales.get(table, 1.0)))

    # ---- data ------------------------------------------------------------------------------------
    def _read(self, position: tuple[int, int]) -> Pending:
        """The batches of the iteration at `position`; the main stream first, so that a dry main
        stream leaves the others untouched."""
        step = self.prog.phases[position[0]].steps[position[1]]
        main = self.prog.main_stream(step)
        order = ([main] if main else []) + [s for s in step.streams if s != main]
        batches, cursors, rows, keys = {}, {}, 0, {}
        for name in order:
            cursors[name] = self.streams[name].cursor()
            got = self.streams[name].read()
            if got is None:
                return Pending(position, None, 0, cursors)
            batches[name], table = got
            rows += table.num_rows if name == main or main is None else 0
            if self.cfg.train.trace_rows:
                keys[name] = table["user_id"].to_pylist() if "user_id" in table.column_names else []
        return Pending(position, batches, rows, cursors, keys or None)

    def _take(self) -> Pending:
        """This iteration's batches: the read-ahead ones when they were read for this position."""
        position = (self.state.phase, self.state.step_index)
        pending, self.pending = self.pending, None
        if pending is not None and pending.position == position:
            return pending
        return self._read(position)

    def _read_ahead(self) -> None:
        nxt = plan.next_position(self.prog, self.state)
        if nxt is None:
            return
        self.pending = self._read(nxt)
        if self.pending.batches is not None and self.cfg.ps.prefetch and not self.cfg.ps.sync:
            step = self.prog.phases[nxt[0]].steps[nxt[1]]
            prefetch_rows(self.ps, self.model.sparse_ids(self._model_batch(step, self.pending.batches)))

    def _cursors(self) -> dict[str, dict]:
        """Each stream's cursor, excluding what was read ahead."""
        ahead = self.pending.cursors if self.pending is not None else {}
        return {name: ahead.get(name) or s.cursor() for name, s in self.streams.items()}

    @staticmethod
    def _model_batch(step: Step, batches: dict[str, dict]) -> dict:
        """One stream: its batch as is; several: a dict of batches by stream name."""
        return batches[step.streams[0]] if len(step.streams) == 1 else {s: batches[s] for s in step.streams}

    # ---- one iteration ---------------------------------------------------------------------------
    def _iterate(self, phase: Phase, step: Step, cur: Pending) -> None:
        t = self.cfg.train
        torch.manual_seed(seed_of(t.seed, self.rank, self.state.step, 7))  # dropout: resumable
        real = cur.batches is not None
        batches = cur.batches if real else {s: self.streams[s].spare() for s in step.streams}
        batch = _to_device(self._model_batch(step, batches), self.device)
        emb = pull_rows(self.ps, self.model.sparse_ids(batch), device=self.device)
        out = self.model(batch, emb, step=step.label) if self.forward_takes_step else self.model(batch, emb)
        loss, named = pick_loss(out, step)
        if not real:
            loss = loss * 0.0
        self.optimizers.zero_grad()
        loss.backward()
        opt = self.optimizers[step.optimizer]
        tables = [k for k in emb if (opt.spec.tables is None or k in opt.spec.tables)
                  and k not in phase.frozen_tables]
        local = row_grads({k: emb[k] for k in tables}) if real else {}
        if self.cfg.ps.sync and self.world > 1:  # one optimizer step per row, as in one process
            local = share(all_reduce_row_grads(local, self.world), self.rank, self.world)
        rows = push_row_grads(self.ps, local, scale=1.0 / self.world)
        if real:
            rows += sum(r.ids.numel() for r in emb.values())  # pulled too
        if cur.keys:
            self._trace(cur.keys)
        if self.cfg.ps.sync:  # every pull of the next iteration sees every push of this one
            self.ps.flush()
        opt.step(self.world)
        self.state.step += 1
        self._account(float(loss.detach()), {k: float(v.detach()) for k, v in named.items()}, cur.rows, rows)

    def _trace(self, keys: dict[str, list]) -> None:
        """train.trace_rows: which users each rank read at each iteration (a restarted attempt's
        lines come later in the file, so the last line of a (step, rank) is the one that counted)."""
        path = os.path.join(os.path.dirname(self.storage), "trace", f"rank{self.rank}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": self.state.step, "rank": self.rank, "streams": keys}) + "\n")

    def _reset_window(self) -> None:
        self._window = {"loss": 0.0, "samples": 0.0, "rows": 0.0, "steps": 0.0}
        self._named: dict[str, list[float]] = {}  # name -> [sum of value x samples, samples]
        self._window_t = time.perf_counter()

    def _account(self, loss: float, named: dict[str, float], samples: int, rows: int) -> None:
        w = self._window
        w["loss"] += loss * samples
        w["samples"] += samples
        w["rows"] += rows
        w["steps"] += 1
        for k, v in named.items():
            acc = self._named.setdefault(k, [0.0, 0.0])
            acc[0] += v * samples
            acc[1] += samples

    def _log(self) -> None:
        """Every `log_every` iterations: global losses / throughput -> the progress bar and curves."""
        names = sorted(self._named)
        w = self._window
        vec = [w["loss"], w["samples"], w["rows"], w["steps"]] + [x for k in names for x in self._named[k]]
        v = torch.tensor(vec, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(v)
        v = v.cpu()
        secs = max(time.perf_counter() - self._window_t, 1e-9)
        if self.rank == 0 and v[1] > 0:
            record = {
                "kind": "train", "step": self.state.step, "epoch": self.state.epoch,
                "loss": float(v[0] / v[1]), "samples_per_s": float(v[1] / secs),
                "ps_rows_per_s": float(v[2] / secs), "time_s": round(time.time() - self.t_start, 3),
                "workers": self.world, "attempt": self.attempt,
            }
            if len(self.prog.phases) > 1:
                record["phase"] = self.prog.phases[self.state.phase].name
            losses = {k: float(v[4 + 2 * i] / v[5 + 2 * i]) for i, k in enumerate(names) if v[5 + 2 * i] > 0}
            if losses:
                record["losses"] = losses
            self.board.add.remote(record)
        self.state.samples += int(v[1])
        self._reset_window()

    # ---- validation and checkpoints ----------------------------------------------------------------
    def _validate(self, phase: Phase) -> tuple[dict, bool]:
        """Rank 0 scores the validation split; every worker learns whether the phase plateaued."""
        self.ps.flush()
        _barrier(self.world)
        metrics, stop = {}, False
        if self.rank == 0 and self.valid is not None:
            model = self.model.to("cpu") if self.device.type != "cpu" else self.model
            metrics = self.valid.model_metrics(model, self.ps.pull)
            self.model.to(self.device)
            score = metrics[self.valid.monitor]
            s = self.state
            if score > s.best_score:
                s.best_score, s.best_step, s.best_metrics, s.bad_validations = score, s.step, metrics, 0
            else:
                s.bad_validations += 1
            s.validations.append({"step": s.step, "epoch": s.epoch, **metrics})
            self.board.add.remote({"kind": "valid", "step": s.step, "epoch": s.epoch, **metrics})
            stop = phase.patience > 0 and s.bad_validations >= phase.patience
        return metrics, _agree_any([stop], self.world, self.device)[0]

    def _checkpoint(self, metrics: dict | None = None) -> None:
        if self._window["steps"]:  # the samples trained so far belong in the checkpoint's state
            self._log()
        self.ps.flush()
        _barrier(self.world)
        name = ck.checkpoint_name(self.state.step, self.attempt_of_group())
        final = os.path.join(self.storage, name)
        if metrics and self.state.best_step == self.state.step:
            self.state.best_dir = name
        self.state.ps_url = ck.ps_url(final)
        try:
            if self.rank == 0:
                self.ps.checkpoint(self.state.ps_url)
            tmp = tempfile.mkdtemp(prefix="xdtrain-ckpt-")
            try:
                ck.save_cursor(tmp, self.rank, self._cursors())
                if self.rank == 0:
                    ck.save_rank0(tmp, self.state, self.model, self.optimizers)
                report = {"step": self.state.step, "epoch": self.state.epoch, **(metrics or {})}
                ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            _barrier(self.world)  # report returns once this worker's files are in place, not everyone's
            if self.rank == 0:
                ck.write_manifest(final)  # last: from here on the checkpoint counts
        except Exception as e:
            ck.raise_if_disk_full(e, final, discard=self.rank == 0)
            raise
        self._committed(self.state.ps_url)
        if self.rank == 0:
            ck.prune(self.storage, self.cfg.train.keep_checkpoints, {self.state.best_dir, name})

    def _committed(self, url: str) -> None:
        """Every worker's PS client learns the checkpoint that now holds all pushes (rank 0 wrote or
        restored it), so a failed shard is reset to it and each client replays only later pushes."""
        if self.rank != 0 and hasattr(self.ps, "checkpoint_committed"):
            self.ps.checkpoint_committed(url)

    def _inject_faults(self) -> None:
        """Testing aid (`faults` in the job config): kill a worker or a PS shard once, at a given step."""
        if not self.faults or self.attempt_of_group() != 0:
            return
        if self.faults.get("kill_worker_at_step") == self.state.step and \
                self.faults.get("kill_rank", self.world - 1) == self.rank:
            self._fault("worker", os.getpid())
        if self.faults.get("kill_ps_shard_at_step") == self.state.step and self.rank == 0:
            self._fault("ps_shard", self.ps.shard_pids()[int(self.faults.get("shard", 0))])

    def _fault(self, target: str, pid: int) -> None:
        ray.get(self.board.add.remote({"kind": "fault", "step": self.state.step, "epoch": self.state.epoch,
                                       "target": target, "pid": pid, "rank": self.rank}))
        os.kill(pid, signal.SIGKILL)

    def attempt_of_group(self) -> int:
        if not hasattr(self, "_group_attempt"):
            a = torch.tensor([float(self.attempt)], device=self.device)
            if self.world > 1:
                dist.all_reduce(a, op=dist.ReduceOp.MAX)
            self._group_attempt = int(a.item())
        return self._group_attempt

    # ---- the loop --------------------------------------------------------------------------------
    def _finish(self, reason: str) -> None:
        self.state.finished, self.state.stop_reason = True, reason

    def _stop(self, reason: str) -> None:
        """A budget stop mid-phase (max_steps, time): validate and checkpoint where it stands."""
        if self._window["steps"]:
            self._log()
        metrics = self._validate(plan.current(self.prog, self.state)[0])[0] if self.cfg.train.eval_every else {}
        self._finish(reason)
        self._checkpoint(metrics)

    def _end_phase(self, reason: str) -> None:
        self.pending = None
        if plan.enter_next_phase(self.prog, self.state):
            self._apply_ps_lr_scales()
        else:
            self._finish(reason)

    def _phase_epoch(self, phase: Phase, event: plan.Event) -> None:
        """A phase epoch (or the phase's last iteration): validate, maybe end the phase, checkpoint."""
        t, s = self.cfg.train, self.state
        if self._window["steps"]:
            self._log()
        reason = "iterations"
        if event == plan.Event.PHASE_EPOCH:
            s.epoch += 1
            s.phase_epoch += 1
            reason = "epochs"
        ends = event == plan.Event.PHASE_ITERATIONS or (phase.epochs and s.phase_epoch >= phase.epochs)
        metrics = {}
        if t.eval_every and (ends or (event == plan.Event.PHASE_EPOCH and s.phase_epoch % t.eval_every == 0)):
            metrics, plateau = self._validate(phase)
            if plateau and not ends:
                ends, reason = True, "early stopping"
        if ends:
            self._end_phase(reason)
        self._checkpoint(metrics)

    def run(self) -> None:
        t, s = self.cfg.train, self.state
        deadline = self.t_start + t.max_minutes * 60 if t.max_minutes > 0 else math.inf
        self.attempt_of_group()
        if t.eval_at_start and t.eval_every and s.step == 0 and not s.validations:
            # The starting model competes too (fine-tuning: the authors validate at epoch 0 before training).
            self._checkpoint(self._validate(self.prog.phases[s.phase])[0])
        self._window_t = time.perf_counter()
        while not s.finished:
            if t.max_steps and s.step >= t.max_steps:
                self._stop("max_steps")
                break
            phase, step = plan.current(self.prog, s)
            cur = self._take()
            have, late = _agree_any([cur.batches is not None, time.time() > deadline], self.world, self.device)
            if late:
                self.pending = cur  # not consumed: the checkpoint's cursors exclude it
                self._stop("time budget")
                break
            if not have:  # every worker's main stream is dry: that stream's epoch ends
                self.streams[self.prog.main_stream(step)].new_epoch()
                event = plan.after_stream_epoch(self.prog, s)
                if event != plan.Event.NONE:
                    self._phase_epoch(phase, event)
                self._window_t = time.perf_counter()  # throughput windows exclude validation and checkpoints
                continue
            self._read_ahead_after(cur)
            self._iterate(phase, step, cur)
            event = plan.after_iteration(self.prog, s)
            if s.step % t.log_every == 0:
                self._log()
            self._inject_faults()
            if event != plan.Event.NONE:
                self._phase_epoch(phase, event)
                self._window_t = time.perf_counter()
            elif t.checkpoint_every and s.step % t.checkpoint_every == 0:
                self._checkpoint()
        if self._window["steps"]:
            self._log()

    def _read_ahead_after(self, cur: Pending) -> None:
        """Read the next iteration's batches now (its rows' pull overlaps this iteration's compute)."""
        self.pending = None
        if cur.batches is not None:
            # Position after this iteration, assuming no stream runs dry first.
            self._read_ahead()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (see the module docstring)."""
    Worker(config).run()
