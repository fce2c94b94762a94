"""Chaos suite: seeded random faults against the demo pipeline, and what each one cost.

    .venv/bin/python bench/chaos.py --faults 30 --seed 0

Every run is a real `python -m jobs.pretrain` driver (configs/demo.yaml on a small generated world,
2 Ray Train workers, a 2-shard Ray PS, an embedded Ray of its own), hit once by a fault drawn from:

  worker      SIGKILL one Ray Train worker process                   (Ray Train restarts the group)
  ps_shard    SIGKILL one PS shard actor process                     (restart, checkpoint + replay)
  driver      SIGKILL the driver process, then re-run                (resume from the newest checkpoint)
  checkpoint  SIGKILL the driver while a checkpoint is half written, then re-run
  disk_full   run_dir on a tmpfs shrunk to fail the next checkpoint, then grown back and re-run
  node        SIGKILL a worker node of a 3-node cluster/local.py cluster (elastic: 2 -> 1 workers)

at a step drawn uniformly from the run. Per run it records: finished (exit 0 after at most one
re-run), rows read exactly once (`samples` equals the uninterrupted run's), the test NDCG@10's
deviation from the uninterrupted run, and what was left behind: processes of the run still alive
60 s after it ended, and /dev/shm/xdps-* buffers. It prints one row per fault and a summary, and
writes both to --out (JSON). The default suite runs one of each fault kind in tests/test_engine.py
and tests/test_programs_engine.py (worker, shard, full disk, mid-phase resume); this is the count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.local import LocalCluster, NodeSpec  # noqa: E402
from xdtrain.ps.shm import SHM_DIR  # noqa: E402

KINDS = ["worker", "ps_shard", "driver", "checkpoint", "disk_full", "node"]
RUN = ["model.d=16", "model.max_len=20", "model.layers=1", "train.batch_size=64", "train.epochs=2",
       "train.log_every=1", "train.progress=false", "train.eval_every=1", "eval.candidates=[full]",
       "train.max_minutes=0", "train.checkpoint_every=4", "scale.workers=2", "ps.shards=2",
       "export_embeddings=false", "verbose=false"]
GRACE_S = 60  # how long a finished run's processes may take to exit before they count as leaked


def make_world(out: Path) -> str:
    from xdtrain.config import load_config
    from xdtrain.data.synthetic import WorldConfig, generate_world

    cfg = load_config(WorldConfig, str(REPO / "configs/world_demo.yaml"),
                      ["users.n_users=800", "graph.n_entities=200", "graph.n_triplets=400", f"out={out}"])
    generate_world(cfg, str(out), progress=False)
    return str(out)


def steps_done(run: Path) -> int:
    path = run / "curves.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if '"kind": "train"' in x]
    return max(steps, default=0)


def shm_buffers() -> set[str]:
    return {p.name for p in Path(SHM_DIR).glob("xdps-*")} if Path(SHM_DIR).exists() else set()


class Driver:
    """One `jobs.pretrain` process in its own process group; remembers every process of its tree."""

    def __init__(self, world: str, run: Path, env: dict | None = None, extra: tuple = ()) -> None:
        self.log = run.parent / f"{run.name}.log"
        argv = [sys.executable, "-m", "jobs.pretrain", "--config", "configs/demo.yaml", f"run_dir={run}",
                f"data.world_url={world}", *RUN, *extra]
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env or os.environ.copy(), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: dict[int, float] = {}

    def watch(self) -> None:
        try:
            for p in [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]:
                self.seen.setdefault(p.pid, p.create_time())
        except psutil.NoSuchProcess:
            pass

    def find(self, marker: str) -> list[int]:
        self.watch()
        out = []
        for pid in self.seen:
            try:
                if marker in " ".join(psutil.Process(pid).cmdline()):
                    out.append(pid)
            except psutil.Error:
                pass
        return sorted(out)

    def wait(self, timeout: float = 900) -> int:
        deadline = time.time() + timeout
        while self.proc.poll() is None:
            if time.time() > deadline:
                self.kill(group=True)
                raise TimeoutError(f"driver ran past {timeout} s; log {self.log}")
            self.watch()
            time.sleep(0.5)
        return self.proc.returncode

    def kill(self, group: bool = False) -> None:
        """SIGKILL the driver alone (what a crash or OOM kill does; its Ray must go by itself), or its
        whole process group (cleanup after a timeout)."""
        self.watch()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL) if group else self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()

    def alive(self) -> list[int]:
        """Processes of this run still running (same pid and start time), zombies excluded."""
        out = []
        for pid, t in self.seen.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - t) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except psutil.Error:
                pass
        return out


def wait_for(cond, driver: Driver, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while not (value := cond()):
        if driver.proc.poll() is not None:
            raise RuntimeError(f"driver exited ({driver.proc.returncode}) before {what}; log {driver.log}")
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}; log {driver.log}")
        driver.watch()
        time.sleep(poll)
    return value


def leaked(drivers: list[Driver]) -> int:
    deadline = time.time() + GRACE_S
    while (left := [pid for d in drivers for pid in d.alive()]) and time.time() < deadline:
        time.sleep(1)
    return len(left)


def run_fault(kind: str, at_step: int, world: str, root: Path) -> dict:
    run = root / "run"
    drivers: list[Driver] = []
    rc, extra_info = None, {}
    if kind in ("worker", "ps_shard"):
        d = Driver(world, run)
        drivers.append(d)
        marker = "RayTrainWorker" if kind == "worker" else "_EmbeddingShard"
        wait_for(lambda: steps_done(run) >= at_step, d, 600, f"step {at_step}")
        pids = wait_for(lambda: d.find(marker), d, 60, f"a {marker} process")
        os.kill(random.Random(at_step).choice(pids), signal.SIGKILL)
        rc = d.wait()
    elif kind in ("driver", "checkpoint"):
        d = Driver(world, run)
        drivers.append(d)
        wait_for(lambda: steps_done(run) >= at_step, d, 600, f"step {at_step}")
        if kind == "checkpoint":  # a checkpoint folder whose manifest is not written yet
            train = run / "train"
            half = lambda: [p for p in train.glob("checkpoint_*") if not (p / "MANIFEST.json").exists()]  # noqa: E731
            wait_for(half, d, 600, "a checkpoint being written", poll=0.005)
            extra_info["killed_during"] = [p.name for p in half()]
        d.kill()
        again = Driver(world, run)
        drivers.append(again)
        rc = again.wait()
    elif kind == "disk_full":
        rc, extra_info = _disk_full(world, root, at_step, drivers)
    elif kind == "node":
        rc = _node_kill(world, root, at_step, drivers)
    summary = json.loads((run / "metrics.json").read_text()) if rc == 0 else {}
    return {"rc": rc, "summary": summary, "drivers": drivers, **extra_info}


def _disk_full(world: str, root: Path, at_step: int, drivers: list[Driver]) -> tuple[int, dict]:
    disk = root / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], check=True)
    run = disk / "run"
    try:
        first = Driver(world, run, extra=(f"train.max_steps={at_step}",))
        drivers.append(first)
        assert first.wait() == 0, first.log.read_text()[-2000:]
        ckpts = sorted((run / "train").glob("checkpoint_*"))
        size = sum(p.stat().st_size for p in ckpts[-1].rglob("*") if p.is_file())
        st = os.statvfs(disk)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        subprocess.run(["mount", "-o", f"remount,size={used + size // 2}", str(disk)], check=True)
        full = Driver(world, run)
        drivers.append(full)
        full_rc = full.wait()
        said = [x for x in full.log.read_text().splitlines() if "disk full:" in x]
        subprocess.run(["mount", "-o", "remount,size=256m", str(disk)], check=True)
        again = Driver(world, run)
        drivers.append(again)
        rc = again.wait()
        if rc == 0:
            (root / "run").mkdir()
            (root / "run" / "metrics.json").write_text((run / "metrics.json").read_text())
        return rc, {"full_rc": full_rc, "said": said[-1][-160:] if said else ""}
    finally:
        leaked(drivers)  # nothing may still write to the tmpfs when it goes
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _node_kill(world: str, root: Path, at_step: int, drivers: list[Driver]) -> int:
    run = root / "run"
    head, node = NodeSpec(num_cpus=1, ps=4), NodeSpec(num_cpus=1, trainer=1)
    with LocalCluster.start(root / "cl", head=head, workers=[node, node], dashboard=False) as cl:
        env = {**os.environ, **cl.client_env()}
        d = Driver(world, run, env=env, extra=("scale.min_workers=1",))
        drivers.append(d)
        wait_for(lambda: steps_done(run) >= at_step, d, 600, f"step {at_step}")
        cl.kill_node("worker-2")
        rc = d.wait()
    return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    ap.add_argument("--out", default=str(REPO / "bench/results/chaos.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0 and "disk_full" in args.kinds:
        ap.error("disk_full mounts a tmpfs: run as root, or pass --kinds without it")
    rng = random.Random(args.seed)
    kinds = args.kinds.split(",")
    plan = [kinds[i % len(kinds)] for i in range(args.faults)]  # every kind, in a seeded order
    rng.shuffle(plan)
    base_dir = Path(tempfile.mkdtemp(prefix="xdchaos-", dir="/tmp"))
    world = make_world(base_dir / "world")
    t0 = time.time()
    shm0 = shm_buffers()
    (base_dir / "clean").mkdir()
    base = Driver(world, base_dir / "clean" / "run")
    assert base.wait() == 0, base.log.read_text()[-3000:]
    clean = json.loads((base_dir / "clean" / "run" / "metrics.json").read_text())
    total_steps, ndcg0 = clean["steps"], clean["test"]["seqrec"]["full"]["ndcg@10"]
    print(f"uninterrupted run: {total_steps} steps, {clean['samples']} samples, NDCG@10 {ndcg0:.4f} "
          f"({time.time() - t0:.0f} s)", flush=True)
    rows = []
    for i, kind in enumerate(plan):
        at = rng.randint(2, total_steps - 2)
        root = base_dir / f"f{i:02d}-{kind}"
        root.mkdir()
        t = time.time()
        try:
            r = run_fault(kind, at, world, root)
            err = ""
        except Exception as e:  # noqa: BLE001 - a fault the suite could not even stage is a failed run
            r, err = {"rc": None, "summary": {}, "drivers": []}, f"{type(e).__name__}: {e}"[:300]
        s = r["summary"]
        ndcg = s.get("test", {}).get("seqrec", {}).get("full", {}).get("ndcg@10")
        row = {"fault": kind, "at_step": at, "finished": r["rc"] == 0, "samples": s.get("samples"),
               "exactly_once": s.get("samples") == clean["samples"],
               "ndcg_dev": None if ndcg is None else round(abs(ndcg - ndcg0), 4),
               "leaked_processes": leaked(r["drivers"]), "leaked_shm": len(shm_buffers() - shm0),
               "attempts": s.get("attempts"), "seconds": round(time.time() - t, 1), "error": err,
               **{k: v for k, v in r.items() if k not in ("rc", "summary", "drivers")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    done = [r for r in rows if r["finished"]]
    devs = [r["ndcg_dev"] for r in done if r["ndcg_dev"] is not None]
    summary = {"faults": len(rows), "finished": len(done), "exactly_once": sum(r["exactly_once"] for r in rows),
               "max_ndcg_dev": max(devs, default=None), "leaked_processes": sum(r["leaked_processes"] for r in rows),
               "leaked_shm": len(shm_buffers() - shm0), "by_kind": {k: plan.count(k) for k in kinds},
               "clean_ndcg": ndcg0, "clean_samples": clean["samples"], "seconds": round(time.time() - t0)}
    print("summary:", json.dumps(summary), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "runs": rows}, indent=1))
    return 0 if summary["finished"] == len(rows) and summary["exactly_once"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
