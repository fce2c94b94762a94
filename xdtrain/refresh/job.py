"""`python -m jobs.refresh_embeddings --config <pretrain yaml> checkpoint=<dir> out=<url>`: compute,
validate and publish one embedding version from a checkpoint (spec: peace.md sec. 5.2).

1. Freeze the inputs: the checkpoint (verified), the model and catalogue the config's data gives,
   and the user histories (`users`, else the test split's rows, copied into the work folder).
2. Every table of the model's `export_keys` (e.g. "item": the catalogue by domain) and "user" (the
   histories, streamed from Parquet) is computed by the model's `export_part` on a Ray Data actor
   pool (`workers`; 0 = in this process) and written as bucketed Parquet under <out>/v=<version>/.
3. Checks (xdtrain/refresh/checks.py): rows vs the source and the previous version, NaN/Inf, norms,
   drift on a fixed sample, and the canary (held-out ranking from the written vectors vs the model's
   own; xdtrain/refresh/canary.py, a `skip` entry saying why where it cannot run). A failure writes
   report.json (the version is then `failed`), leaves CURRENT as it was, and exits 2 naming the check.
4. VERSION.json (last in the version), then the publish: HISTORY.json, then CURRENT; then versions
   beyond `keep`, and failed ones checked before this publish, are deleted.

A re-run of the same checkpoint resumes the same version: finished tables (their manifest written)
are kept, an unfinished table is deleted and redone, a finished version is only published.
Killed anywhere, the store serves the previous version whole (see xdtrain/serving/store.py).
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from xdtrain.config import ConfigError
from xdtrain.eval.candidates import EvalSet
from xdtrain.outputs import AtomicFile, claim_output_dir, remove_owned, resolve, write_json_atomic
from xdtrain.ps.export import EXPORT_MANIFEST
from xdtrain.refresh import infer
from xdtrain.refresh.canary import canary_rows, run_canary
from xdtrain.refresh.checks import (
    Report,
    ValidationFailed,
    check_canary,
    check_drift,
    check_finite,
    check_norms,
    check_rows,
    table_stats,
)
from xdtrain.serving import store
from xdtrain.serving.reader import EmbeddingReader
from xdtrain.train import checkpointing as ck
from xdtrain.train.config import RefreshConfig
from xdtrain.train.datasets import PreparedData, prepare_data
from xdtrain.train.raylog import RayLog

FAULT_ENV = "XDTRAIN_REFRESH_FAULT"  # tests: the job kills itself (SIGKILL) at this point
SOURCE_FILE = "SOURCE.json"  # in a version being built: the checkpoint it is built from


def fault(point: str) -> None:
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def default_version(checkpoint: Path, step: int) -> str:
    """step<N>-<first 8 hex of the checkpoint manifest's sha256>: the same for a re-run of the same
    checkpoint (so it resumes), different for any other."""
    digest = hashlib.sha256((checkpoint / ck.MANIFEST_FILE).read_bytes()).hexdigest()[:8]
    return f"step{step:09d}-{digest}"


def _check_config(cfg: RefreshConfig) -> None:
    for key in ("checkpoint", "out"):
        if not getattr(cfg, key):
            raise ConfigError(f"refresh-embeddings: set {key}=<...> (checkpoint: an engine checkpoint directory, "
                              "out: the embedding store URL)")
    for key, low in (("keep", 1), ("workers", 0), ("batch_size", 1), ("rows_per_bucket", 1)):
        if getattr(cfg, key) < low:
            raise ConfigError(f"{key} must be >= {low}, got {getattr(cfg, key)}")
    if "/" in cfg.version or cfg.version.startswith("."):
        raise ConfigError(f"version {cfg.version!r}: a plain name, no '/' and no leading '.'")


def run_refresh(cfg: RefreshConfig) -> dict:
    _check_config(cfg)
    t0 = time.time()
    src_dir = Path(cfg.checkpoint).resolve()
    state = ck.open_checkpoint(src_dir)
    version = cfg.version or default_version(src_dir, state.step)
    work = claim_output_dir(cfg.refresh_dir or f"{cfg.run_dir}/refresh", "refresh_dir", overwrite=cfg.overwrite)
    out = str(claim_output_dir(cfg.out, "out"))
    previous = store.read_current(out)
    if cfg.workers > 0:
        import ray.data  # noqa: F401  (before RayLog: its loggers then go to the run's ray.log too)
    with RayLog(work, cfg.verbose) as log:
        info = store.read_version(out, version)
        if info is None:
            info = build_version(cfg, src_dir, state.step, version, out, work, log)
        elif info["checkpoint"] != str(src_dir):
            raise ConfigError(f"version {version} in {out} was built from {info['checkpoint']}, not {src_dir}; "
                              "set version=<another name>")
        else:
            print(f"[xdtrain] version {version} is finished already: publishing it")
    fault("before_publish")
    store.publish(out, version, info)
    removed = store.prune(out, cfg.keep)
    print(f"[xdtrain] published {version} (CURRENT was {previous}); removed {removed or 'none'}")
    return {"run_dir": str(work), "out": out, "version": version, "previous": previous, "removed": removed,
            "checkpoint": str(src_dir), "checkpoint_step": state.step,
            "tables": {t: {"rows": m["rows"], "dim": m["dim"]} for t, m in info["tables"].items()},
            "checks": {f"{e['check']}/{e['table']}": "skipped" if e.get("skipped") else e["ok"]
                       for e in info["checks"]},
            "wall_seconds": round(time.time() - t0, 1)}


def build_version(cfg: RefreshConfig, src_dir: Path, step: int, version: str, out: str, work: Path, log) -> dict:
    """Compute (or resume) every table of `version`, check it, and write VERSION.json; returns it."""
    vdir = str(claim_output_dir(store.version_dir(out, version), "embedding version"))
    fs, _ = resolve(vdir)
    source = store.read_json(vdir, SOURCE_FILE)
    if source is not None and source.get("checkpoint") != str(src_dir):
        raise ConfigError(f"{vdir} is being built from {source.get('checkpoint')}, not {src_dir}; "
                          "set version=<another name>")
    write_json_atomic(f"{vdir}/{SOURCE_FILE}", {"checkpoint": str(src_dir), "step": step}, fs)
    connected: list = []

    def connect() -> None:
        from xdtrain.train.engine import connect_ray

        if not connected:
            # an embedded Ray gets a CPU per actor plus one for Ray Data's read tasks (else on a
            # 2-core machine the 2 actors hold both CPUs and the read waits for ever)
            connected.append(connect_ray(replace(cfg, scale=replace(cfg.scale, workers=cfg.workers + 1,
                                                                    cpus_per_worker=1.0)), log))

    data = prepare_data(cfg.data, work, min_groups=1, connect=connect)
    src = infer.ExportSource(cfg.model, data.model_data, str(src_dir), cfg.train.seed, cfg.scale.threads)
    model = infer.export_model(src)
    users = cfg.users or freeze_users(data, work, version)
    canary = canary_rows(cfg, data.test)
    # the driver's own PS copy: for in-process inference and the canary's model scores only
    loaded = (model, infer.load_ps(src.checkpoint, model.sparse_tables())
              if cfg.workers == 0 or not canary[1] else None)
    sources: dict[str, pa.Table | str] = {**model.export_keys(), "user": users}
    if cfg.workers > 0:
        import ray.data

        connect()
        ray.data.DataContext.get_current().enable_progress_bars = False
    tables, source_rows = {}, {}
    for name, rows in sources.items():
        source_rows[name] = rows.num_rows if isinstance(rows, pa.Table) else infer.dataset_rows(rows)
        url = store.table_dir(out, version, name)
        tables[name] = compute_table(cfg, src, loaded, name, rows, source_rows[name], url)
        fault(f"after_table_{name}")
    report, keys = validate(cfg, out, version, tables, source_rows, data.test, canary, loaded)
    write_json_atomic(f"{vdir}/{store.REPORT_FILE}", {"version": version, "passed": report.passed,
                                                     "checked_at": time.time(), "checks": report.entries}, fs)
    print("\n".join([f"[xdtrain] checks of {version}:"] + report.lines()))
    if not report.passed:
        first = report.failed()[0]
        raise ValidationFailed(f"version {version} not published: check '{first['check']}' failed on table "
                               f"'{first['table']}': {first['detail']}; CURRENT is still "
                               f"{store.read_current(out)}; report: {vdir}/{store.REPORT_FILE}")
    info = {"version": version, "checkpoint": str(src_dir), "step": step, "model": cfg.model.get("name"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "users": users, "checks": report.entries,
            "tables": {n: {"rows": m["rows"], "dim": m["dim"], "buckets": m["buckets"], "keys": keys[n]}
                       for n, m in tables.items()}}
    write_json_atomic(f"{vdir}/{store.VERSION_FILE}", info, fs)  # last: the version counts from here on
    return info


def freeze_users(data: PreparedData, work: Path, version: str) -> str:
    """The test split's rows (histories as of the cut-off) as this version's user input, copied once."""
    path = work / "users" / f"{version}.parquet"
    if not path.exists():
        with AtomicFile(path) as f:
            pq.write_table(data.test.rows, f, row_group_size=65536)
    return str(path)


def compute_table(cfg: RefreshConfig, src: infer.ExportSource, loaded, name: str, rows: pa.Table | str,
                  n_rows: int, url: str) -> dict:
    """One table of the version: kept when its manifest says it is whole, else (re)computed."""
    fs, root = resolve(url)
    if fs.exists(f"{root}/{EXPORT_MANIFEST}"):
        manifest = store.read_json(root, EXPORT_MANIFEST)
        print(f"[xdtrain] {name}: {manifest['rows']} rows written before, kept")
        return {"rows": manifest["rows"], "dim": manifest["dim"], "buckets": len(manifest["files"])}
    if fs.exists(root):  # a table a killed run left unfinished: inside the version folder this job owns
        remove_owned(root, root.rpartition("/")[0], created=lambda p: p == root)
    t0 = time.time()
    if cfg.workers > 0:
        import ray.data

        ds = (ray.data.from_arrow(infer.table_slices(rows, cfg.batch_size)) if isinstance(rows, pa.Table)
              else ray.data.read_parquet(rows))
        batches = infer.infer_ray(src, name, ds, cfg.workers, cfg.batch_size)
    else:
        parts = [rows] if isinstance(rows, pa.Table) else infer.parquet_batches(rows, cfg.batch_size)
        batches = infer.infer_local(src, name, parts, cfg.batch_size, loaded)
    meta = infer.write_buckets(batches, url, name, infer.num_buckets(n_rows, cfg.rows_per_bucket))
    secs = time.time() - t0
    print(f"[xdtrain] {name}: {meta['rows']} vectors in {secs:.1f} s ({meta['rows'] / max(secs, 1e-9):,.0f}/s)")
    return meta


def validate(cfg: RefreshConfig, out: str, version: str, tables: dict, source_rows: dict, test: EvalSet,
             canary: tuple[pa.Table, str], loaded) -> tuple[Report, dict[str, list[str]]]:
    """Every check of the written tables against their source and the previous version (CURRENT)."""
    report, keys = Report(), {}
    current = store.read_current(out)
    prev = EmbeddingReader(out, current) if current and current != version else None
    for name in tables:
        st = table_stats(store.table_dir(out, version, name), cfg.checks.drift_sample)
        prev_st = (table_stats(store.table_dir(out, current, name), 0)
                   if prev is not None and name in prev.tables else None)
        has_domain = st.sample is not None and "domain" in st.sample.column_names
        keys[name] = ["id"] if st.keys_unique else ["id", "domain"]
        report.add("keys", name, st.keys_unique or has_domain,
                   "ids unique" if st.keys_unique else ("ids repeat across domains: keyed by (id, domain)"
                                                        if has_domain else "ids repeat and there is no domain column"))
        check_rows(report, name, st, source_rows[name], prev_st, cfg.checks)
        check_finite(report, name, st)
        check_norms(report, name, st, prev_st, cfg.checks)
        check_drift(report, name, st, prev, cfg.checks)
    held, why = canary
    why = why or ("" if report.passed else "an earlier check failed")
    if why:
        report.skip("canary", "user", why)
    else:
        published, own, n = run_canary(cfg, out, version, test, held, loaded)
        check_canary(report, published, own, cfg.checks.canary_metric, n, cfg.checks)
    return report, keys
