"""Two-domain data: the per-(user, target domain) CSV row format, and overlap-rate resampling.

Used by the cross-domain methods that work on one domain pair (RecGURU, AMID).

The CSV row format (AMID's released files; RecGURU reads the same files): one row per
(user, target domain), with the user's whole sequence in each domain as a JSON list, oldest first:

    user_id,seq_d1,seq_d2,domain_id[,ob_label]
    7,"[3, 9, 4]","[]",0            # user 7 has only domain-1 history; the row's target domain is d1
    8,"[5, 1]","[12, 40, 2]",1      # an overlapped user (both lists non-empty), target domain d2

`domain_id` 0 = d1, 1 = d2; `ob_label` (optional) is 1 when the row's user is observed. An
overlapped user usually has one row per domain, both carrying the same two sequences.

API:
    rows = read_two_domain_csv(path)                        # Arrow table, checked (errors name file, row)
    inter = two_domain_interactions(rows, ("movie", "book"))  # canonical interactions (+ observed)
    inter = resample_overlap(inter, rate=0.1, reference="movie", seed=0)

`two_domain_interactions` gives each item the position in its list as its timestamp, so the
leave-one-out split of `xdtrain.data.recipes` holds out each list's last two items.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xdtrain.data.schemas import DataError

CSV_COLUMNS = ("user_id", "seq_d1", "seq_d2", "domain_id")
OPTIONAL_COLUMNS = ("ob_label",)


def _int_list(text: str, where: str) -> list[int]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not a JSON list ({e.msg})") from None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise DataError(f"{where}: expected a JSON list of integers, got {text[:60]!r}")
    return value


def _flag(text: str, where: str) -> int:
    if text.strip() not in ("0", "1"):
        raise DataError(f"{where}: expected 0 or 1, got {text!r}")
    return int(text)


def read_two_domain_csv(path: str | Path) -> pa.Table:
    """The rows of a two-domain CSV: user_id int64, seq_d1 / seq_d2 list<int64>, domain_id int8, and
    ob_label int8 when the file has it. A bad header or cell raises DataError naming file, row, column."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: two-domain CSV not found")
    cols: dict[str, list] = {c: [] for c in CSV_COLUMNS + OPTIONAL_COLUMNS}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; header is {header}")
        has_ob = "ob_label" in header
        for n, rec in enumerate(reader, start=2):  # row 1 is the header
            where = f"{path} row {n}"
            try:
                cols["user_id"].append(int(rec["user_id"]))
            except (TypeError, ValueError):
                raise DataError(f"{where} column user_id: not an integer: {rec['user_id']!r}") from None
            for c in ("seq_d1", "seq_d2"):
                cols[c].append(_int_list(rec[c] or "", f"{where} column {c}"))
            cols["domain_id"].append(_flag(rec["domain_id"] or "", f"{where} column domain_id"))
            if has_ob:
                cols["ob_label"].append(_flag(rec["ob_label"] or "", f"{where} column ob_label"))
    out = {"user_id": pa.array(cols["user_id"], pa.int64()),
           "seq_d1": pa.array(cols["seq_d1"], pa.list_(pa.int64())),
           "seq_d2": pa.array(cols["seq_d2"], pa.list_(pa.int64())),
           "domain_id": pa.array(cols["domain_id"], pa.int8())}
    if has_ob:
        out["ob_label"] = pa.array(cols["ob_label"], pa.int8())
    return pa.table(out)


def two_domain_interactions(rows: pa.Table, domains: tuple[str, str] = ("d1", "d2")) -> pa.Table:
    """Canonical interactions (user_id, item_id, domain, timestamp = position in the list) of each
    user's two sequences, taken from the user's first row; with `ob_label`, an `observed` column
    (true when any of the user's rows has ob_label 1). Rows of one user must agree on the sequences."""
    users = rows["user_id"].to_numpy()
    _, first_idx, inverse = np.unique(users, return_index=True, return_inverse=True)
    first_of_row = first_idx[inverse.reshape(-1)]
    first = np.sort(first_idx)
    parts = []
    for col, dom in zip(("seq_d1", "seq_d2"), domains):
        seqs = rows[col].combine_chunks()
        listed = seqs.to_pylist()
        bad = next((i for i, j in enumerate(first_of_row) if listed[i] != listed[j]), None)
        if bad is not None:
            raise DataError(f"two-domain rows: user {users[bad]}'s rows disagree on {col} "
                            f"(rows {first_of_row[bad]} and {bad}, 0-based)")
        mine = seqs.take(pa.array(first))
        lengths = pc.fill_null(pc.list_value_length(mine), 0).to_numpy()
        parts.append(pa.table({
            "user_id": pa.array(np.repeat(users[first], lengths), pa.int64()),
            "item_id": pc.cast(mine.flatten(), pa.int64()),
            "domain": pa.array([dom] * int(lengths.sum()), pa.string()),
            "timestamp": pa.array(np.concatenate([np.arange(n) for n in lengths] + [np.zeros(0, np.int64)]),
                                  pa.int64()),
        }))
    inter = pa.concat_tables(parts)
    if "ob_label" in rows.column_names:
        observed = np.unique(users[rows["ob_label"].to_numpy() == 1])
        inter = inter.append_column("observed", pa.array(np.isin(inter["user_id"].to_numpy(), observed)))
    return inter


def resample_overlap(inter: pa.Table, rate: float, reference: str, seed: int = 0) -> pa.Table:
    """Keep round(rate * |users of `reference`|) of the overlapped users (a seeded random choice);
    every other overlapped user keeps one domain, chosen at random, and loses its interactions in
    the other. The number of distinct users does not change (RecGURU sec. 6.3.2, Table 4)."""
    domains = sorted(pc.unique(pc.cast(inter["domain"], pa.string())).to_pylist())
    if len(domains) != 2 or reference not in domains:
        raise DataError(f"data.overlap_rate: needs exactly two domains, one of them data.overlap_reference "
                        f"({reference!r}); the data has {domains}")
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"data.overlap_rate: expected a rate in [0, 1], got {rate}")
    dom = pc.cast(inter["domain"], pa.string())
    users = {d: np.unique(inter.filter(pc.equal(dom, d))["user_id"].to_numpy()) for d in domains}
    overlap = np.intersect1d(users[domains[0]], users[domains[1]])
    n_keep = int(round(rate * len(users[reference])))
    if n_keep > len(overlap):
        raise DataError(f"data.overlap_rate: {rate} of {len(users[reference])} {reference} users is {n_keep}, "
                        f"but only {len(overlap)} users are in both domains")
    rng = np.random.default_rng(seed)
    demoted = rng.permutation(overlap)[n_keep:]
    lose = rng.integers(0, 2, len(demoted))  # the domain each demoted user loses
    drop = np.zeros(inter.num_rows, dtype=bool)
    uid = inter["user_id"].to_numpy()
    for k, d in enumerate(domains):
        drop |= np.isin(uid, demoted[lose == k]) & (dom.to_numpy(zero_copy_only=False) == d)
    return inter.filter(pa.array(~drop))


def overlap_users(inter: pa.Table) -> np.ndarray:
    """Users with interactions in two domains or more."""
    pairs = pa.table({"u": inter["user_id"], "d": pc.cast(inter["domain"], pa.string())})
    counts = pairs.group_by("u").aggregate([("d", "count_distinct")])
    return np.sort(counts.filter(pc.greater_equal(counts["d_count_distinct"], 2))["u"].to_numpy())
