"""Prepared data on disk: eval rows read back in chunks, and a manifest that lets a re-run reuse it.

`<run_dir>/data/prepared.json` is written last, atomically, after every stream and eval file: it
holds a hash of what the preparation depended on (the `data:` config, the workers' row-group
minimum, the input files' names / sizes / modification times, and the data code itself) and what
`prepare_data` returned. A re-run whose hash matches loads that instead of preparing again; a
missing, partial or mismatched manifest means the data is prepared again.

Eval rows live as Parquet under `<run_dir>/data/eval/<valid|test>/` (one file per user partition
on the distributed path, one file in memory) with the catalogues and train counts in
`<run_dir>/data/eval/catalogue_<part>.parquet`. `read_eval_set` reads them back one row group at a time,
keeping only the configured domains and user sample, so the driver holds the eval set it was asked
for, not every eval row of the log.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xdtrain.data.schemas import DataError
from xdtrain.data.sequences import write_parquet
from xdtrain.data.splits import assign_users
from xdtrain.eval.candidates import EvalSet
from xdtrain.outputs import write_json_atomic
from xdtrain.train.config import DataConfig

MANIFEST = "prepared.json"
EVAL_SAMPLE_SEED = 7919  # mixed into data.split_seed for the eval-user sample
CODE = ("xdtrain/data", "xdtrain/train/datasets.py", "xdtrain/train/prepared_store.py", "xdtrain/eval/candidates.py")
AT_ASSEMBLY = ("eval_domains", "eval_user_fraction", "reuse_prepared")  # applied when the data is read back
LARGE_EVAL = 2_000_000  # eval rows held by the driver beyond which it says how to hold fewer


def input_fingerprint(cfg: DataConfig, run_dir: Path, min_groups: int) -> str:
    """A hash of everything the prepared data depends on (module docstring)."""
    urls = {"synthetic": [cfg.world_url] if cfg.world_url else [],
            "parquet": [cfg.interactions_url], "two_domain_csv": [cfg.interactions_url],
            "released": [cfg.released_dir]}.get(cfg.source, [])
    files = [_listing(u) for u in urls if u]
    if cfg.source == "synthetic" and not cfg.world_url and Path(cfg.world_config).exists():
        files.append(Path(cfg.world_config).read_text())
    if cfg.source == "movielens":
        from xdtrain.data.movielens import data_root

        files.append(_listing(str(data_root())))
    root = Path(__file__).resolve().parents[2]
    code = hashlib.sha256()
    for rel in CODE:
        for f in sorted((root / rel).rglob("*.py")) if (root / rel).is_dir() else [root / rel]:
            code.update(f.read_bytes())
    data = {k: v for k, v in asdict(cfg).items() if k not in AT_ASSEMBLY}
    blob = json.dumps({"data": data, "min_groups": min_groups, "files": files,
                       "code": code.hexdigest()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _listing(url: str) -> list:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return [url, "missing"]
    info = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    stamp = ("mtime", "LastModified", "last_modified", "updated")  # local, s3, azure, gcs
    return sorted([p, d.get("size"), str(next((d[k] for k in stamp if d.get(k)), ""))] for p, d in info.items())


# ---------------------------------------------------------------- eval sets


def write_catalogue(catalogue: dict[str, np.ndarray], counts: dict[str, np.ndarray] | None, data_dir: Path,
                    part: str) -> None:
    """An eval set's catalogues and train counts as `<data_dir>/eval/catalogue_<part>.parquet`."""
    doms = sorted(catalogue)
    ids = [np.asarray(catalogue[d], np.int64) for d in doms]
    cnt = [np.asarray(counts[d], np.int64) if counts else np.zeros(len(i), np.int64) for d, i in zip(doms, ids)]
    table = pa.table({"domain": pa.array(np.repeat(doms, [len(i) for i in ids]) if doms else [], pa.string()),
                      "item_id": pa.array(np.concatenate(ids) if ids else [], pa.int64()),
                      "count": pa.array(np.concatenate(cnt) if cnt else [], pa.int64())})
    write_parquet(table, data_dir / "eval" / f"catalogue_{part}.parquet")


def read_catalogue(data_dir: Path, part: str, domains: list[str] | None = None
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`write_catalogue`'s catalogues and counts; `domains` (the written ones) keeps empty ones."""
    table = pq.read_table(data_dir / "eval" / f"catalogue_{part}.parquet")
    doms = np.asarray(table["domain"].to_numpy(zero_copy_only=False))
    ids, cnt = table["item_id"].to_numpy(), table["count"].to_numpy()
    names = sorted(set(doms.tolist()) | set(domains or []))
    return {d: ids[doms == d] for d in names}, {d: cnt[doms == d] for d in names}


def read_eval_set(folder: str | Path, catalogue: dict[str, np.ndarray], counts: dict[str, np.ndarray] | None,
                  name: str, domains: list[str], fraction: float, seed: int, by_user: bool = False,
                  history_column: str = "history") -> EvalSet:
    """The eval rows under `folder` (every file, one row group at a time), restricted to `domains`
    (empty = all) and to the users `eval_user_sample` keeps. `by_user`: the files are user partitions
    (rows in the in-memory order within each), put in user order by a stable sort."""
    kept = []
    for f in sorted(Path(folder).glob("*.parquet")):
        pf = pq.ParquetFile(f)
        for g in range(pf.num_row_groups):
            rows = pf.read_row_group(g)
            keep = eval_user_sample(rows["user_id"], fraction, seed)
            if domains:
                keep &= np.asarray(pc.is_in(pc.cast(rows["domain"], pa.string()),
                                            pa.array(domains, pa.string())).to_numpy(zero_copy_only=False), bool)
            kept.append(rows.filter(pa.array(keep)))
    if not kept:
        raise DataError(f"{folder}: no eval rows were prepared")
    rows = pa.concat_tables(kept).combine_chunks()
    if rows.num_rows > LARGE_EVAL:
        print(f"[xdtrain] warning: {name}: the driver holds {rows.num_rows:,} eval rows; data.eval_user_fraction "
              "(a seeded user sample) or data.max_history hold fewer", file=sys.stderr, flush=True)
    if by_user:
        rows = rows.take(pc.sort_indices(rows, [("user_id", "ascending")]))  # stable
    if domains:
        if rows.num_rows == 0:
            raise DataError(f"data.eval_domains: no eval rows in {domains} ({name})")
        catalogue = {d: catalogue[d] for d in domains if d in catalogue}
        counts = {d: counts[d] for d in catalogue} if counts is not None else None
    return EvalSet(rows, catalogue, counts, name=name, history_column=history_column)


def eval_user_sample(users: pa.Array | pa.ChunkedArray, fraction: float, seed: int) -> np.ndarray:
    """Which rows belong to the seeded `fraction` of users (`data.eval_user_fraction`; 1 = all)."""
    if fraction >= 1.0:
        return np.ones(len(users), bool)
    return assign_users(users, [fraction, 1.0 - fraction, 0.0], seed + EVAL_SAMPLE_SEED) == 0


# ---------------------------------------------------------------- the manifest


def save_manifest(data_dir: Path, key: str, record: dict) -> None:
    write_json_atomic(data_dir / MANIFEST, {"key": key, **record})


def load_manifest(data_dir: Path, key: str) -> dict | None:
    """The manifest's record when its key is `key` and every file it names exists, else None."""
    path = data_dir / MANIFEST
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("key") != key:
        return None
    files = ("catalogue_valid.parquet", "catalogue_test.parquet", "item_ids.parquet", "valid", "test")
    urls = [*rec.get("streams", {}).values(), *rec.get("tables", {}).values(),
            *(str(data_dir / "eval" / f) for f in files)]
    if not all(fsspec.core.url_to_fs(u)[0].exists(fsspec.core.url_to_fs(u)[1]) for u in urls):
        return None
    return rec
