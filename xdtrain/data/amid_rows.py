"""AMID's open-world two-domain rows (Xu et al., WWW '24; spec docs: shared/specs/amid.md §2).

One row = one (user, target domain) sample over a two-domain pair, in one item-id space:

    user_id    int64
    seq_d1     list<int64>   the user's domain-1 items, oldest first ([] = no domain-1 history)
    seq_d2     list<int64>   the same for domain 2
    domain_id  int64         0: the target is the last item of seq_d1; 1: of seq_d2
    ob_label   int64         1: the row is observed (in O), 0: only in D (labels unavailable)
    overlap    bool          the user has history in both domains

Two input paths give the same rows (tests/test_amid_data.py checks it on a fixture):
  (a) canonical interaction logs -> `rows_from_interactions` (a domain-X row when |S^X| >= min_seq
      and |S^Y| >= min_seq or |S^Y| = 0, the NMCDR rule) -> `split_rows` (80/20 by row) ->
      `subsample_observed` (K_u: O = every overlapping row + int(K_u * N_no) non-overlapping rows,
      D = all with ob_label);
  (b) the authors' released CSVs `<pair>_train{K}.csv` (O), `<pair>_train{K}_DR.csv` (D) and
      `<pair>_test.csv` (`read_released`, checked: O must equal D's ob_label = 1 rows).
Then both go through `finish`: the validation split (observed rows only, seeded by (user, domain))
and the eval sets, whose candidates the engine samples once per seed (`eval.candidates:
[uniform:999]`), so every method ranks the same 999 negatives.
"""

from __future__ import annotations

import csv
import json
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xdtrain.data.recipes import InteractionsSource, RecipeConfig, RecipeOutput, StreamData, group_rows
from xdtrain.data.schemas import DataError
from xdtrain.data.sequences import write_dataset
from xdtrain.data.two_domain import read_two_domain_csv
from xdtrain.eval.candidates import EvalSet

RELEASED = "amid_released"  # source side-table kind: "<folder>/<pair>" of the released CSVs
ROW_TABLE = "two_domain_rows"  # reader table kind of the O and D streams (xdtrain.data.schemas.TABLES)
LIST = pa.list_(pa.int64())
SCHEMA = pa.schema([("user_id", pa.int64()), ("seq_d1", LIST), ("seq_d2", LIST), ("domain_id", pa.int64()),
                    ("ob_label", pa.int64()), ("overlap", pa.bool_())])


@dataclass
class AmidDataConfig:
    domains: tuple[str, str]  # (domain 1, domain 2): domain_id 0 and 1
    k_u: float = 0.25  # share of non-overlapping train rows kept in O
    mnar: float = 0.0  # O's non-overlapping rows drawn ∝ popularity(target)^mnar (0: uniform; < 0: rare targets)
    test_ratio: float = 0.2  # rows to test (the released split is 80/20 by row)
    valid_ratio: float = 0.1  # observed train rows carved out for model selection
    min_seq: int = 5  # NMCDR: a domain-X row needs |S^X| >= min_seq and (|S^Y| >= min_seq or 0)
    hide_other: float = 0.0  # share of both-domain users whose other domain is dropped (open-world data)
    seed: int = 0
    rows_per_group: int = 256
    min_groups: int = 1


@dataclass
class AmidRows:
    O: pa.Table  # noqa: E741 (the paper's names)
    D: pa.Table
    valid: pa.Table
    test: pa.Table


# ---------------------------------------------------------------- building the rows


def make_rows(user_id, seq_d1, seq_d2, domain_id, ob_label=None) -> pa.Table:
    """A rows table in `SCHEMA` (overlap computed; ob_label 1 when not given)."""
    n = len(user_id)
    seq_d1, seq_d2 = (s.combine_chunks().cast(LIST) if isinstance(s, pa.ChunkedArray) else pa.array(s, LIST)
                      for s in (seq_d1, seq_d2))
    overlap = pc.and_(pc.greater(pc.list_value_length(seq_d1), 0), pc.greater(pc.list_value_length(seq_d2), 0))
    ob = np.ones(n, np.int64) if ob_label is None else np.asarray(ob_label, np.int64)
    return pa.Table.from_arrays([pa.array(np.asarray(user_id, np.int64)), seq_d1, seq_d2,
                                 pa.array(np.asarray(domain_id, np.int64)), pa.array(ob), overlap], schema=SCHEMA)


def rows_from_interactions(inter: pa.Table, cfg: AmidDataConfig) -> pa.Table:
    """Per-(user, target domain) rows from canonical logs (user_id, item_id, domain, timestamp),
    sequences in time order; rows sorted by (user, domain_id)."""
    d1, d2 = cfg.domains
    dom = pc.cast(inter["domain"], pa.string())
    present = set(pc.unique(dom).to_pylist())
    if not {d1, d2} <= present:
        raise DataError(f"data.pair: domains {[d1, d2]} not all in the interactions (have {sorted(present)})")
    keep = pc.is_in(dom, pa.array([d1, d2]))
    t = pa.table({"user_id": pc.cast(inter["user_id"], pa.int64()), "item_id": pc.cast(inter["item_id"], pa.int64()),
                  "d": pc.cast(pc.equal(dom, d2), pa.int64()), "ts": inter["timestamp"]}).filter(keep)
    t = t.sort_by([("user_id", "ascending"), ("ts", "ascending")])
    users, items, d = (t[c].to_numpy() for c in ("user_id", "item_id", "d"))
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    hide_rng = np.random.default_rng([cfg.seed, 1])
    out: dict[str, list] = {"user_id": [], "seq_d1": [], "seq_d2": [], "domain_id": []}
    for s, e in zip(starts, ends):
        seqs = [items[s:e][d[s:e] == 0].tolist(), items[s:e][d[s:e] == 1].tolist()]
        if seqs[0] and seqs[1] and cfg.hide_other > 0 and hide_rng.random() < cfg.hide_other:
            seqs[int(hide_rng.integers(2))] = []  # make the user non-overlapping (open-world ML data)
        for x in (0, 1):
            other = len(seqs[1 - x])
            if len(seqs[x]) >= cfg.min_seq and (other >= cfg.min_seq or other == 0):
                for k, v in zip(out, (int(users[s]), seqs[0], seqs[1], x)):
                    out[k].append(v)
    if not out["user_id"]:
        raise DataError(f"no user has >= {cfg.min_seq} items in {d1} or {d2} (data.amid_min_seq)")
    return make_rows(*out.values())


def split_rows(rows: pa.Table, test_ratio: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """(train100, test): a seeded row shuffle, the first 1 - test_ratio of it to train (released split)."""
    order = np.random.default_rng([seed, 2]).permutation(rows.num_rows)
    cut = int(round((1 - test_ratio) * rows.num_rows))
    return rows.take(np.sort(order[:cut])), rows.take(np.sort(order[cut:]))


def subsample_observed(train100: pa.Table, k_u: float, seed: int, mnar: float = 0.0) -> tuple[pa.Table, pa.Table]:
    """(O, D): O = every overlapping row + int(k_u * N_no) non-overlapping rows (filter_DR_dataset.py);
    D = every row, ob_label 1 for the rows in O. The non-overlapping rows are drawn uniformly (mnar 0,
    the released files) or, for the spec's extra MNAR factor (§10.2-F), without replacement with
    probability ∝ c^mnar, c = how often the row's target item occurs in train100's lists: with mnar > 0
    rows whose target is popular are observed more often (O's targets skewed towards popular items),
    with mnar < 0 less often (towards rare items)."""
    if not 0 <= k_u <= 1:
        raise DataError(f"data.k_u must be in [0, 1], got {k_u}")
    if not np.isfinite(mnar):
        raise DataError(f"data.mnar must be a finite number, got {mnar}")
    ov = train100["overlap"].to_numpy(zero_copy_only=False)
    non = np.flatnonzero(~ov)
    rng = np.random.default_rng([seed, 3])
    if mnar == 0:
        keep = rng.choice(non, int(k_u * len(non)), replace=False)
    else:
        w = target_counts(train100)[non].astype(np.float64) ** mnar
        keep = rng.choice(non, int(k_u * len(non)), replace=False, p=w / w.sum())
    ob = ov.copy()
    ob[keep] = True
    D = train100.set_column(SCHEMA.get_field_index("ob_label"), "ob_label", pa.array(ob.astype(np.int64)))
    return D.filter(pa.array(ob)), D


def target_counts(rows: pa.Table) -> np.ndarray:
    """[rows] how often each row's target (the last item of its target-domain list) occurs in all
    lists of `rows`, both domains (one id space)."""
    items = np.concatenate([pc.list_flatten(rows[c]).to_numpy() for c in ("seq_d1", "seq_d2")])
    ids, counts = np.unique(items, return_counts=True)
    return counts[np.searchsorted(ids, strip_target(rows)[0])]


def carve_valid(D: pa.Table, ratio: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """(D without valid, valid): a seeded share of the *observed* rows, by a hash of (user, domain),
    so the cut does not depend on row order (both input paths carve the same rows). Observed rows
    only: labels of unobserved rows are not available at training time."""
    key = [f"{u}:{x}:{seed}".encode() for u, x in zip(D["user_id"].to_pylist(), D["domain_id"].to_pylist())]
    h = np.fromiter((zlib.crc32(k) / 2**32 for k in key), np.float64, count=len(key))
    valid = (h < ratio) & (D["ob_label"].to_numpy() == 1)
    return D.filter(pa.array(~valid)), D.filter(pa.array(valid))


def d_and_test(inter: pa.Table, cfg: AmidDataConfig) -> tuple[pa.Table, pa.Table]:
    """Path (a) up to the released files: (D = train100 with ob_label, test)."""
    train100, test = split_rows(rows_from_interactions(inter, cfg), cfg.test_ratio, cfg.seed)
    return subsample_observed(train100, cfg.k_u, cfg.seed, cfg.mnar)[1], test


def rows_from_logs(inter: pa.Table, cfg: AmidDataConfig) -> AmidRows:
    """Path (a): canonical logs -> O, D, valid, test."""
    return finish(*d_and_test(inter, cfg), cfg)


def finish(D: pa.Table, test: pa.Table, cfg: AmidDataConfig) -> AmidRows:
    D, valid = carve_valid(D, cfg.valid_ratio, cfg.seed)
    O = D.filter(pc.equal(D["ob_label"], 1))  # noqa: E741
    return AmidRows(O, D, valid, test)


# ---------------------------------------------------------------- the released CSV format


def released_paths(folder: str | Path, pair: str, k: int) -> dict[str, Path]:
    f = Path(folder)
    return {"O": f / f"{pair}_train{k}.csv", "D": f / f"{pair}_train{k}_DR.csv", "test": f / f"{pair}_test.csv"}


def read_released_csv(path: Path) -> pa.Table:
    """One released CSV in `SCHEMA`, read by the shared two-domain reader
    (xdtrain/data/two_domain.py: JSON-list sequences, errors naming file, row and column); a row's
    domain_id must name a non-empty sequence (it holds the target)."""
    t = read_two_domain_csv(path)
    dom = t["domain_id"].to_numpy().astype(np.int64)
    lengths = np.stack([pc.list_value_length(t[c]).to_numpy(zero_copy_only=False) for c in ("seq_d1", "seq_d2")])
    empty = np.flatnonzero(lengths[dom, np.arange(len(dom))] == 0)
    if len(empty):
        raise DataError(f"{path} row {empty[0] + 2} column domain_id: {dom[empty[0]]} names an empty sequence "
                        "(the target is its last item)")
    ob = t["ob_label"].to_numpy() if "ob_label" in t.column_names else None
    return make_rows(t["user_id"], t["seq_d1"], t["seq_d2"], dom, ob)


def read_released(folder: str | Path, pair: str, cfg: AmidDataConfig) -> AmidRows:
    """Path (b): the released files of `pair` at K_u = cfg.k_u -> O, D, valid, test."""
    k = int(round(cfg.k_u * 100))
    paths = released_paths(folder, pair, k)
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise DataError(f"{missing[0]}: no such file (data.released_dir / data.pair / data.k_u)")
    O, D, test = (read_released_csv(paths[s]) for s in ("O", "D", "test"))  # noqa: E741
    if _row_keys(O) != _row_keys(D.filter(pc.equal(D["ob_label"], 1))):
        raise DataError(f"{paths['O']}: its rows are not the ob_label = 1 rows of {paths['D'].name}")
    return finish(D, test, cfg)


def _row_keys(t: pa.Table) -> list:
    return sorted(zip(t["user_id"].to_pylist(), t["domain_id"].to_pylist(),
                      map(tuple, t["seq_d1"].to_pylist()), map(tuple, t["seq_d2"].to_pylist())))


def write_released(D: pa.Table, test: pa.Table, folder: str | Path, pair: str, k_u: float) -> dict[str, Path]:
    """D (with ob_label), its observed rows O and test in the released format (`d_and_test`'s output;
    for fixtures, and for running the authors' code on our data)."""
    paths = released_paths(folder, pair, int(round(k_u * 100)))
    Path(folder).mkdir(parents=True, exist_ok=True)
    O = D.filter(pc.equal(D["ob_label"], 1))  # noqa: E741
    for name, t, ob in (("O", O, False), ("D", D, True), ("test", test, False)):
        with open(paths[name], "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["user_id", "seq_d1", "seq_d2", "domain_id"] + (["ob_label"] if ob else []))
            for r in t.to_pylist():
                w.writerow([r["user_id"], json.dumps(r["seq_d1"]), json.dumps(r["seq_d2"]), r["domain_id"]]
                           + ([r["ob_label"]] if ob else []))
    return paths


# ---------------------------------------------------------------- eval sets and the recipe output


def strip_target(rows: pa.Table) -> tuple[np.ndarray, list[list[int]], list[list[int]]]:
    """(targets, seq_d1, seq_d2) with the target (the target list's last item) and every other
    occurrence of it removed from the target-domain list (released `dataset_seq.py`)."""
    dom = rows["domain_id"].to_numpy()
    s = [rows["seq_d1"].to_pylist(), rows["seq_d2"].to_pylist()]
    targets = np.array([s[x][i][-1] for i, x in enumerate(dom)], dtype=np.int64)
    for i, x in enumerate(dom):
        s[x][i] = [v for v in s[x][i] if v != targets[i]]
    return targets, s[0], s[1]


def eval_set(rows: pa.Table, domains: tuple[str, str], catalogue: dict[str, np.ndarray], name: str) -> EvalSet:
    """Eval rows: target `item_id`, `domain` (name), `history` (the target-domain list without the
    target: excluded from candidates), the model inputs seq_d1 / seq_d2 / domain_id, and `overlap`
    (for eval.groups)."""
    targets, s1, s2 = strip_target(rows)
    dom = rows["domain_id"].to_numpy()
    hist = [s1[i] if x == 0 else s2[i] for i, x in enumerate(dom)]
    table = pa.table({"user_id": rows["user_id"], "item_id": pa.array(targets),
                      "domain": pa.array([domains[x] for x in dom], pa.string()), "history": pa.array(hist, LIST),
                      "seq_d1": pa.array(s1, LIST), "seq_d2": pa.array(s2, LIST), "domain_id": rows["domain_id"],
                      "overlap": rows["overlap"]})
    return EvalSet(table, catalogue, name=name)


def domain_catalogues(tables: list[pa.Table], domains: tuple[str, str]) -> dict[str, np.ndarray]:
    """Each domain's pool: every item in that domain's lists of any split (fixed across methods)."""
    out = {}
    for x, d in enumerate(domains):
        parts = [pc.list_flatten(t[f"seq_d{x + 1}"]).to_numpy() for t in tables]
        out[d] = np.unique(np.concatenate(parts).astype(np.int64))
    return out


def recipe_output(rows: AmidRows, cfg: AmidDataConfig, out_dir: str | Path, name: str) -> RecipeOutput:
    """Write streams O and D (reader kind `two_domain_rows`) and build the valid / test eval sets."""
    for part in ("O", "valid", "test"):
        if getattr(rows, part).num_rows == 0:
            raise DataError(f"{name}: the AMID rows leave {part} empty (data.k_u / data.valid_ratio / more data)")
    catalogue = domain_catalogues([rows.D, rows.valid, rows.test], cfg.domains)
    streams = {}
    for s in ("O", "D"):
        t = getattr(rows, s)
        group = group_rows(t.num_rows, cfg.rows_per_group, cfg.min_groups)
        streams[s] = StreamData(write_dataset(t, Path(out_dir) / s, group), ROW_TABLE, t.num_rows, group)
    valid, test = (eval_set(getattr(rows, p), cfg.domains, catalogue, f"{name} {p}") for p in ("valid", "test"))
    ov = {p: int(pc.sum(getattr(rows, p)["overlap"]).as_py() or 0) for p in ("O", "D", "valid", "test")}
    stats = {"recipe": "amid", "k_u": cfg.k_u, **{f"{p}_rows": getattr(rows, p).num_rows for p in ov},
             **{f"{p}_overlap_rows": v for p, v in ov.items()},
             "items": {d: int(len(c)) for d, c in catalogue.items()}}
    item_ids = np.unique(np.concatenate(list(catalogue.values())))
    return RecipeOutput(streams, valid, test, item_ids, stats)


class AmidRecipe:
    """Recipe `amid` behind the `Recipe` protocol (`RecipeConfig.amid` configures it; streams O and D
    always): the released CSVs when the source names them (side table `amid_released`:
    "<folder>/<pair>"), else the source's interaction logs."""

    def prepare(self, source: InteractionsSource, cfg: RecipeConfig, out_dir: str | Path) -> RecipeOutput:
        cfg.check()
        acfg = replace(cfg.amid, rows_per_group=cfg.rows_per_group, min_groups=cfg.min_groups)
        if RELEASED in source.tables:
            folder, _, pair = source.tables[RELEASED].rpartition("/")
            rows = read_released(folder, pair, acfg)
        else:
            rows = rows_from_logs(source.load(), acfg)
        return recipe_output(rows, acfg, out_dir, source.name)
