"""`train_loop_per_worker`: the one training loop every method runs under Ray Train's TorchTrainer.

Per step, on every worker (all workers step together):
  1. the next batch of this worker's data shard (streamed, shuffled, exact cursor) -> model.make_batch;
  2. pull the rows its sparse ids need from the PS (already in flight when prefetch is on: the batch
     after this one is read and its pull started before this one computes);
  3. forward + backward through DDP (dense gradients all-reduced, averaged);
  4. push the row gradients (scaled 1/world, so the PS sees the global-batch mean) and step Adam.
A worker whose shard is exhausted takes zero-weight steps until every worker is done, so the
collectives stay in lockstep (shards are balanced by rows, so this is at most a step or two).

Checkpoints (epoch ends, every `checkpoint_every` steps, and the end) are consistent at one step:
pushes are flushed, all workers meet at a barrier, the PS shards write their state, then each
worker reports its cursor (rank 0 also the dense state) through `ray.train.report`, itself a
barrier. Any restart, after a failure, an elastic resize or a new `fit`, starts from the latest
checkpoint: dense state, optimizer, PS rows and cursors all from the same step.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from xdtrain.data.reader import ParquetStreamReader
from xdtrain.models import build_model
from xdtrain.nn.sparse import prefetch_rows, pull_rows, push_grads
from xdtrain.train import checkpointing as ck
from xdtrain.train.config import EngineConfig
from xdtrain.train.evaluation import RankingEval

# Checkpoints without a validation rank below every validated one, newer above older (finite and
# distinct: Ray saves scores as JSON, and equal scores confused its retention of old checkpoints).
NO_SCORE = -1e9


@dataclass
class Pending:
    """A batch read ahead of time, with the reader cursor from before it was read."""

    batch: dict
    rows: int
    cursor: dict


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _agree_any(flags: list[bool], world: int) -> list[bool]:
    """Element-wise OR of boolean flags over all workers (one tiny all-reduce)."""
    t = torch.tensor([float(f) for f in flags])
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
        self.ps = _make_ps(cfg, config["ps"])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2),
                                          weight_decay=t.weight_decay)
        self.local_batch = max(1, t.batch_size // self.world)
        self.train_url = config["train_url"]
        self.reader = ParquetStreamReader(self.train_url, "sequences", batch_size=self.local_batch,
                                          shuffle_buffer=t.shuffle_buffer, seed=t.seed,
                                          world_size=self.world, rank=self.rank)
        self.state = ck.EngineState(world_size=self.world)
        self._restore(config)
        self.state.world_size = self.world
        if self.state.stop_reason in ("max_steps", "time budget"):  # a budget stop: the new budget applies
            self.state.finished, self.state.stop_reason = False, ""
        self.ddp = ray.train.torch.prepare_model(
            self.model, parallel_strategy_kwargs={
                "find_unused_parameters": bool(getattr(self.model, "ddp_find_unused_parameters", False))})
        self.valid = RankingEval(ray.get(config["valid"]), cfg.eval) if self.rank == 0 and config["valid"] else None
        self.faults = dict(config.get("faults") or {})
        self.spare: dict | None = None
        self.t_start = time.time()
        self._window = [0.0, 0.0, 0.0, 0.0]  # loss x samples, samples, PS rows, steps
        self._window_t = time.perf_counter()

    # ---- restore ---------------------------------------------------------------------------------
    def _restore(self, config: dict) -> None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None and config.get("resume_from"):
            ckpt = Checkpoint(config["resume_from"])
        if ckpt is not None:
            with ckpt.as_directory() as d:
                self.state = ck.load_state(d)
                ck.load_dense(d, self.model)
                ck.load_optimizer(d, self.optimizer)
                cursors = ck.load_cursors(d, self.state.world_size)
                # A local checkpoint is read in place; a downloaded copy is not visible to remote
                # shards, which then read the PS state where it was written.
                in_place = os.path.abspath(d) == os.path.abspath(ckpt.path)
                ps_src = ck.ps_url(d) if in_place or not self.state.ps_url else self.state.ps_url
                if self.state.world_size == self.world:
                    self.reader.load_state_dict(cursors[self.rank])
                else:  # elastic: the remaining rows of the epoch, split over the new workers
                    self.reader.load_global_state(cursors)
                if self.rank == 0:
                    self.ps.restore(ps_src)
        else:
            if config.get("init_dense"):
                ck.load_dense(config["init_dense"], self.model)
            ps_src = config["ps_init"]
            if self.rank == 0:
                self.ps.restore(ps_src)
        _barrier(self.world)
        self._committed(ps_src)

    # ---- data ------------------------------------------------------------------------------------
    def _read(self, it) -> Pending | None:
        cursor = self.reader.state_dict()
        try:
            rb = next(it)
        except StopIteration:
            return None
        rows = pa.Table.from_batches([rb])
        rng = np.random.default_rng(_seed_of(self.cfg.train.seed, self.rank, cursor["epoch"],
                                             cursor["rows_emitted"]))
        return Pending(self.model.make_batch(rows, rng), rows.num_rows, cursor)

    def _spare_batch(self) -> dict:
        """A real batch for zero-weight steps (the first one this worker can read)."""
        if self.spare is None:
            r = ParquetStreamReader(self.train_url, "sequences", batch_size=self.local_batch,
                                    world_size=self.world, rank=self.rank)
            rows = pa.Table.from_batches([next(iter(r))])
            self.spare = self.model.make_batch(rows, np.random.default_rng(0))
        return self.spare

    # ---- one step --------------------------------------------------------------------------------
    def _step(self, cur: Pending | None) -> float:
        t = self.cfg.train
        torch.manual_seed(_seed_of(t.seed, self.rank, self.state.step, 7))  # dropout: resumable
        batch = cur.batch if cur is not None else self._spare_batch()
        if cur is not None and self.spare is None:
            self.spare = cur.batch
        emb = pull_rows(self.ps, self.model.sparse_ids(batch))
        loss = self.ddp(batch, emb)
        if cur is None:
            loss = loss * 0.0
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        rows = 0
        if cur is not None:
            rows = push_grads(self.ps, emb, scale=1.0 / self.world)
            rows += sum(r.ids.numel() for r in emb.values())  # pulled too
        self.optimizer.step()
        self.state.step += 1
        n = cur.rows if cur is not None else 0
        self._window[0] += float(loss.detach()) * n
        self._window[1] += n
        self._window[2] += rows
        self._window[3] += 1
        return float(loss.detach())

    def _log(self) -> None:
        """Every `log_every` steps: global loss / throughput -> the driver's progress bar and curves."""
        w = torch.tensor(self._window, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(w)
        now = time.perf_counter()
        secs = max(now - self._window_t, 1e-9)
        if self.rank == 0 and w[1] > 0:
            self.board.add.remote({
                "kind": "train", "step": self.state.step, "epoch": self.state.epoch,
                "loss": float(w[0] / w[1]), "samples_per_s": float(w[1] / secs),
                "ps_rows_per_s": float(w[2] / secs), "time_s": round(time.time() - self.t_start, 3),
                "workers": self.world, "attempt": self.attempt,
            })
        self.state.samples += int(w[1])
        self._window = [0.0, 0.0, 0.0, 0.0]
        self._window_t = now

    # ---- validation and checkpoints ----------------------------------------------------------------
    def _validate(self) -> dict:
        """Rank 0 scores the validation split; every worker learns whether to stop early."""
        self.ps.flush()
        _barrier(self.world)
        metrics, stop = {}, False
        if self.rank == 0 and self.valid is not None:
            metrics = self.valid.model_metrics(self.model, self.ps.pull)
            score = metrics[self.valid.monitor]
            s = self.state
            if score > s.best_score:
                s.best_score, s.best_step, s.best_metrics, s.bad_validations = score, s.step, metrics, 0
            else:
                s.bad_validations += 1
            s.validations.append({"step": s.step, "epoch": s.epoch, **metrics})
            self.board.add.remote({"kind": "valid", "step": s.step, "epoch": s.epoch, **metrics})
            stop = self.cfg.train.patience > 0 and s.bad_validations >= self.cfg.train.patience
        if _agree_any([stop], self.world)[0]:
            self.state.finished, self.state.stop_reason = True, "early stopping"
        return metrics

    def _checkpoint(self, cursor: dict, metrics: dict | None = None) -> None:
        self.ps.flush()
        _barrier(self.world)
        name = ck.checkpoint_name(self.state.step, self.attempt_of_group())
        final = os.path.join(self.storage, name)
        if metrics and self.state.best_step == self.state.step:
            self.state.best_dir = name
        self.state.ps_url = ck.ps_url(final)
        if self.rank == 0:
            self.ps.checkpoint(self.state.ps_url)
        tmp = tempfile.mkdtemp(prefix="xdtrain-ckpt-")
        try:
            ck.save_cursor(tmp, self.rank, cursor)
            if self.rank == 0:
                ck.save_rank0(tmp, self.state, self.model, self.optimizer)
            score = (metrics or {}).get(self.valid.monitor) if self.valid is not None else None
            report = {"step": self.state.step, "epoch": self.state.epoch,
                      "score": float(score) if score is not None else NO_SCORE + self.state.step, **(metrics or {})}
            ray.train.report(report, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
            a = torch.tensor([float(self.attempt)])
            if self.world > 1:
                dist.all_reduce(a, op=dist.ReduceOp.MAX)
            self._group_attempt = int(a.item())
        return self._group_attempt

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        t, s = self.cfg.train, self.state
        deadline = self.t_start + t.max_minutes * 60 if t.max_minutes > 0 else math.inf
        self.attempt_of_group()
        if t.eval_at_start and t.eval_every and s.step == 0 and not s.validations:
            # The starting model competes too (fine-tuning: the authors validate at epoch 0 before training).
            self._checkpoint(self.reader.state_dict(), self._validate())
        while not s.finished:
            if t.max_steps and s.step >= t.max_steps:
                s.finished, s.stop_reason = True, "max_steps"
                break
            if s.epoch_done:
                s.epoch, s.epoch_done = s.epoch + 1, False
            if s.epoch >= t.epochs:
                s.finished, s.stop_reason = True, "epochs"
                break
            self.reader.set_epoch(s.epoch)
            self._window_t = time.perf_counter()  # throughput windows exclude validation and checkpoints
            it = iter(self.reader)
            nxt = self._read(it)
            cursor = nxt.cursor if nxt is not None else self.reader.state_dict()
            stop = ""
            while True:
                cur = nxt
                have, late = _agree_any([cur is not None, time.time() > deadline], self.world)
                if not have:
                    break
                if late:
                    stop = "time budget"
                    break
                cursor = cur.cursor if cur is not None else self.reader.state_dict()
                nxt = self._read(it) if cur is not None else None
                if nxt is not None and self.cfg.ps.prefetch:
                    prefetch_rows(self.ps, self.model.sparse_ids(nxt.batch))
                self._step(cur)
                cursor = nxt.cursor if nxt is not None else self.reader.state_dict()
                if s.step % t.log_every == 0:
                    self._log()
                self._inject_faults()
                if t.max_steps and s.step >= t.max_steps:
                    stop = "max_steps"
                    break
                if t.checkpoint_every and s.step % t.checkpoint_every == 0:
                    self._checkpoint(cursor)
            if self._window[3]:
                self._log()
            if stop:
                s.finished, s.stop_reason = True, stop
            else:
                s.epoch_done = True
                if s.epoch + 1 >= t.epochs:
                    s.finished, s.stop_reason = True, "epochs"
            metrics = {}
            last = s.finished
            if t.eval_every and ((s.epoch + 1) % t.eval_every == 0 or last):
                metrics = self._validate()
            self._checkpoint(cursor if stop else self.reader.state_dict(), metrics)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (see the module docstring)."""
    Worker(config).run()
