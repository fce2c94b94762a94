"""Live progress of a Ray Train run, shown in the driver.

Ray Train's own `report` reaches only its controller, so rank 0 also sends small records to a
`ProgressBoard` actor (fire and forget, no CPU reserved). The driver runs `trainer.fit()` in a
thread and polls the board: it draws a tqdm bar (loss, named losses and phase when the model has
them, samples/s, PS rows/s), appends every record to `<run_dir>/curves.jsonl` as it came, and lets
tests see worker pids and steps (fault injection).

The board is placed on the driver's node and restarts if its process dies. Its attempt counter
(which also makes checkpoint names unique per worker group) is kept in a small file in the run
directory, so a restarted board goes on counting; the watcher notices the new incarnation and
reads the new board from its first record.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from xdtrain.outputs import write_json_atomic


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self, state_path: str = "") -> None:
        self.incarnation = uuid.uuid4().hex
        self.state_path = state_path  # where the attempt count survives a restart of this actor
        self.records: list[dict] = []
        self.attempts = self._saved_attempts()
        self.pids: dict[int, int] = {}
        self.total_steps = 0

    def _saved_attempts(self) -> int:
        try:
            return int(json.loads(Path(self.state_path).read_text())["attempts"])
        except (OSError, ValueError, KeyError, TypeError):  # none yet (or not reachable from here)
            return 0

    def new_attempt(self, world_size: int) -> int:
        """Called by rank 0 when a worker group starts; returns the attempt number (0 = first)."""
        self.attempts += 1
        self.pids = {}
        if self.state_path:
            write_json_atomic(self.state_path, {"attempts": self.attempts})
        return self.attempts - 1

    def register(self, rank: int, pid: int) -> None:
        self.pids[rank] = pid

    def set_total(self, steps: int) -> None:
        self.total_steps = int(steps)

    def add(self, record: dict) -> None:
        self.records.append(record)

    def since(self, index: int, incarnation: str | None = None) -> tuple[list[dict], int, int, str]:
        """(records from `index` on, total steps, attempts so far, this board's incarnation).

        A caller that last read another incarnation (the board restarted since) gets every record
        from 0: the new board's list starts again.
        """
        if incarnation is not None and incarnation != self.incarnation:
            index = 0
        return self.records[index:], self.total_steps, self.attempts, self.incarnation

    def worker_pids(self) -> dict[int, int]:
        return dict(self.pids)


class ProgressWatcher:
    """Polls a board from the driver: tqdm bar + curves.jsonl. Use as a context manager around fit()."""

    def __init__(self, board: Any, run_dir: str | Path, show: bool = True, interval_s: float = 1.0) -> None:
        self.board, self.interval_s = board, interval_s
        self.curves = Path(run_dir) / "curves.jsonl"
        self.curves.parent.mkdir(parents=True, exist_ok=True)
        self.bar = tqdm(total=0, desc="train", unit="step", disable=not show, mininterval=1.0)
        self.seen = 0
        self.incarnation: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.last_train: dict = {}

    def __enter__(self) -> ProgressWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.poll()
        except Exception as e:  # progress is best effort: never fail a finished run over it
            print(f"[xdtrain] progress board unavailable at the end of the run ({type(e).__name__})")
        self.bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # the board may be gone while the job shuts down
                pass

    def poll(self) -> None:
        records, total, _, incarnation = ray.get(self.board.since.remote(self.seen, self.incarnation))
        if incarnation != self.incarnation:  # first read, or the board restarted: records are from 0
            self.seen, self.incarnation = 0, incarnation
        self.seen += len(records)
        if total and self.bar.total != total:
            self.bar.total = total
            self.bar.refresh()
        if not records:
            return
        with self.curves.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        for r in records:
            if r.get("kind") != "train":
                continue
            if self.last_train and r["attempt"] > self.last_train["attempt"]:
                self.bar.write(f"[xdtrain] training restarted from its latest checkpoint: attempt {r['attempt']}, "
                               f"{r['workers']} workers")
            self.last_train = r
            self.bar.n = int(r["step"])
            self.bar.set_postfix(bar_postfix(r), refresh=False)
        self.bar.refresh()


def bar_postfix(record: dict) -> dict[str, Any]:
    """The progress bar's fields for a train record, in order. The phase and the named losses (when
    the model has them) come next to the total loss, each named loss to 4 significant digits."""
    out: dict[str, Any] = {"attempt": record["attempt"], "epoch": record["epoch"]}
    if "phase" in record:
        out["phase"] = record["phase"]
    out["loss"] = f"{record['loss']:.4f}"
    for name, value in record.get("losses", {}).items():
        out[name if name not in FIELDS else f"loss_{name}"] = f"{value:.4g}"
    out.update(ps_rows_s=f"{record['ps_rows_per_s']:.0f}", samples_s=f"{record['samples_per_s']:.0f}",
               workers=record["workers"])
    return out


FIELDS = ("attempt", "epoch", "phase", "loss", "ps_rows_s", "samples_s", "workers")  # no loss takes these names


def wait_for_step(board: Any, step: int, timeout_s: float = 300.0) -> dict:
    """Block until rank 0 reported a train record at or after `step` (tests use it to time faults)."""
    deadline, seen, last = time.time() + timeout_s, 0, None
    while time.time() < deadline:
        records, _, _, incarnation = ray.get(board.since.remote(seen, last))
        if incarnation != last:  # first read, or the board restarted: records are from 0
            seen, last = 0, incarnation
        seen += len(records)
        for r in records:
            if r.get("kind") == "train" and r["step"] >= step:
                return r
        time.sleep(0.2)
    raise TimeoutError(f"training did not reach step {step} within {timeout_s}s")
