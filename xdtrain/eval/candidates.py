"""What each evaluation row is ranked against: the eval rows, the catalogues, the candidate sets.

An `EvalSet` is a table of eval rows (one per (user, target) sample) plus each domain's item
catalogue. Columns of `rows`:

    user_id   int64                      required
    item_id   int64, or list<int64>      the target; a list means several positives per row
    domain    string (or integer code)   the row's domain; its catalogue is the candidate pool
    history   list<int64>, optional      the user's items: excluded from candidates when
                                         configured (never the target), and given to the scorer
    ...       any other columns: group flags (bool/int/string) and model inputs

Candidate modes (`CandidateSpec.parse`):
    full          the whole domain catalogue (minus history items when configured);
    uniform:N     N negatives drawn uniformly, without replacement, from the domain catalogue;
    popularity:N  N negatives drawn without replacement with probability ∝ count^exponent.
Sampled negatives are never a positive of the row, nor (when configured) a history item. They
are drawn once per split with a seed and saved to Parquet, so every model is scored on the same
candidates; `prepare_candidates` loads them back (checking they belong to these rows).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, field
from typing import Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xdtrain.data.schemas import DataError
from xdtrain.outputs import AtomicFile

_META_KEY = b"xdtrain.candidates"


def is_list_type(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def list_column(arr: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [R+1], values) of a list column; null lists count as empty."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], type=arr.type)
    lengths = np.asarray(pc.fill_null(pc.list_value_length(arr), 0), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.asarray(arr.flatten().to_numpy(zero_copy_only=False))
    return offsets, values


def pad_lists(offsets: np.ndarray, values: np.ndarray, idx: np.ndarray, pad: float = -1) -> np.ndarray:
    """Rows `idx` of a list column as a right-padded matrix [len(idx), max(1, longest)]."""
    lens = offsets[idx + 1] - offsets[idx]
    width = max(1, int(lens.max()) if len(idx) else 1)
    out = np.full((len(idx), width), pad, dtype=values.dtype if len(values) else np.int64)
    if len(values):
        cols = np.arange(width)
        take = cols[None, :] < lens[:, None]
        pos = np.minimum(offsets[idx][:, None] + cols[None, :], len(values) - 1)
        out[take] = values[pos][take]
    return out


@dataclass
class EvalSet:
    """Eval rows and per-domain catalogues (sorted unique int64 item ids). `name` names the
    source in error messages; `item_counts[domain]` (aligned with the catalogue) feeds
    `popularity:N` sampling."""

    rows: pa.Table
    catalogue: dict[str, np.ndarray]
    item_counts: dict[str, np.ndarray] | None = None
    name: str = "eval rows"
    history_column: str = "history"
    _pos: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False)
    _hist: tuple[np.ndarray, np.ndarray] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        where = self.name
        for col in ("user_id", "item_id", "domain"):
            if col not in self.rows.schema.names:
                raise DataError(
                    f"{where}: missing required column '{col}' (found: {', '.join(self.rows.schema.names)})"
                )
        if self.rows.num_rows == 0:
            raise DataError(f"{where}: no eval rows")
        dom = self.rows.column("domain")
        if not pa.types.is_string(dom.type):
            self.rows = self.rows.set_column(
                self.rows.schema.get_field_index("domain"), "domain", pc.cast(dom, pa.string())
            )
        self.catalogue = {
            str(d): np.unique(np.asarray(ids, dtype=np.int64)) for d, ids in self.catalogue.items()
        }
        for col in ("user_id", "item_id", "domain"):
            if self.rows.column(col).null_count:
                raise DataError(f"{where}: column '{col}' has null values")
        t = self.rows.schema.field("item_id").type
        if is_list_type(t):
            self._pos = list_column(self.rows.column("item_id"))
        elif pa.types.is_integer(t):
            ids = np.asarray(self.rows.column("item_id").to_numpy(), dtype=np.int64)
            self._pos = (np.arange(len(ids) + 1, dtype=np.int64), ids)
        else:
            raise DataError(f"{where}: column 'item_id' has type {t}, expected int64 or list<int64>")
        self._hist = None
        if self.history_column in self.rows.schema.names:
            ht = self.rows.schema.field(self.history_column).type
            if not (is_list_type(ht) and pa.types.is_integer(ht.value_type)):
                raise DataError(
                    f"{where}: column '{self.history_column}' has type {ht}, expected list<int64>"
                )
            self._hist = list_column(self.rows.column(self.history_column))
        self._check_targets()

    def _check_targets(self) -> None:
        off, vals = self._pos
        lens = np.diff(off)
        if (lens == 0).any():
            r = int(np.nonzero(lens == 0)[0][0])
            raise DataError(f"{self.name}: row {r} has an empty target list in column 'item_id'")
        domains = self.domains_of_rows()
        for d, idx in self.domain_rows().items():
            if d not in self.catalogue:
                raise DataError(f"{self.name}: row {int(idx[0])} has domain '{d}', which has no catalogue")
            ids, owner = self._slice(off, vals, idx)
            found = self.index_of(d, ids)
            if (found < 0).any():
                k = int(np.nonzero(found < 0)[0][0])
                raise DataError(
                    f"{self.name}: row {int(owner[k])} target item {int(ids[k])} is not in the catalogue "
                    f"of domain '{domains[owner[k]]}'"
                )
            if len(ids) != len(idx):  # several positives: no duplicates within a row
                key = owner * (len(self.catalogue[d]) + 1) + found
                uniq, counts = np.unique(key, return_counts=True)
                if (counts > 1).any():
                    r = int(uniq[counts > 1][0] // (len(self.catalogue[d]) + 1))
                    raise DataError(f"{self.name}: row {r} lists the same target item twice in 'item_id'")

    @staticmethod
    def _slice(off: np.ndarray, vals: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flattened values of rows idx, and the row each value belongs to."""
        lens = off[idx + 1] - off[idx]
        owner = np.repeat(idx, lens)
        starts = np.repeat(off[idx] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
        return vals[np.arange(len(owner)) + starts], owner

    # ------------------------------------------------------------ accessors

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    @property
    def multi_positive(self) -> bool:
        return is_list_type(self.rows.schema.field("item_id").type)

    def domains_of_rows(self) -> np.ndarray:
        return np.asarray(self.rows.column("domain").to_numpy(zero_copy_only=False), dtype=object)

    def domain_rows(self) -> dict[str, np.ndarray]:
        """Row indices of each domain, in table order; domains sorted by name."""
        doms = self.domains_of_rows()
        return {d: np.nonzero(doms == d)[0] for d in sorted(set(doms.tolist()))}

    def user_ids(self) -> np.ndarray:
        return np.asarray(self.rows.column("user_id").to_numpy(), dtype=np.int64)

    def index_of(self, domain: str, ids: np.ndarray) -> np.ndarray:
        """Positions of item ids in the domain's catalogue; -1 where absent."""
        cat = self.catalogue[domain]
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(cat, ids)
        ok = pos < len(cat)
        ok[ok] = cat[pos[ok]] == ids[ok]
        return np.where(ok, pos, -1)

    def positives(self, idx: np.ndarray) -> np.ndarray:
        """Target ids of rows idx, [B, P] padded with -1."""
        return pad_lists(*self._pos, idx, pad=-1)

    def history(self, idx: np.ndarray) -> np.ndarray:
        """History ids of rows idx, [B, L] padded with -1 (an empty [B, 1] without a history column)."""
        if self._hist is None:
            return np.full((len(idx), 1), -1, dtype=np.int64)
        return pad_lists(*self._hist, idx, pad=-1)


def catalogue_from_items(items: pa.Table, where: str = "items") -> dict[str, np.ndarray]:
    """Per-domain sorted unique item ids of an items table (item_id, domain)."""
    for col in ("item_id", "domain"):
        if col not in items.schema.names:
            raise DataError(f"{where}: missing required column '{col}'")
    ids = np.asarray(items.column("item_id").to_numpy(), dtype=np.int64)
    doms = np.asarray(
        pc.cast(items.column("domain"), pa.string()).to_numpy(zero_copy_only=False), dtype=object
    )
    return {d: np.unique(ids[doms == d]) for d in sorted(set(doms.tolist()))}


def count_items(interactions: pa.Table, catalogue: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Interaction counts of each catalogue item (aligned with the catalogue), per domain."""
    ids = np.asarray(interactions.column("item_id").to_numpy(), dtype=np.int64)
    doms = np.asarray(pc.cast(interactions.column("domain"), pa.string()).to_numpy(zero_copy_only=False))
    out = {}
    for d, cat in catalogue.items():
        sel = ids[doms == d]
        pos = np.searchsorted(cat, sel)
        ok = pos < len(cat)
        ok[ok] = cat[pos[ok]] == sel[ok]
        out[d] = np.bincount(pos[ok], minlength=len(cat)).astype(np.int64)
    return out


# ---------------------------------------------------------------- candidate specs and sets


@dataclass(frozen=True)
class CandidateSpec:
    mode: Literal["full", "uniform", "popularity"]
    n: int = 0
    exclude_history: bool = True
    seed: int = 0
    pop_exponent: float = 1.0

    @classmethod
    def parse(
        cls, text: str, exclude_history: bool = True, seed: int = 0, pop_exponent: float = 1.0
    ) -> CandidateSpec:
        """'full', 'uniform:N' or 'popularity:N'."""
        mode, _, num = text.partition(":")
        if mode == "full" and not num:
            return cls("full", 0, exclude_history, seed, pop_exponent)
        if mode in ("uniform", "popularity") and num.isdigit() and int(num) > 0:
            return cls(mode, int(num), exclude_history, seed, pop_exponent)  # type: ignore[arg-type]
        raise ValueError(f"candidates: expected 'full', 'uniform:N' or 'popularity:N' (N > 0), got {text!r}")


@dataclass
class Candidates:
    """Sampled negatives of every eval row ([R, n] item ids), or None for `full`."""

    spec: CandidateSpec
    negatives: np.ndarray | None
    fingerprint: str = ""


def fingerprint(data: EvalSet, spec: CandidateSpec) -> str:
    """Hash of everything the sampled candidates depend on, to refuse a file made for other rows."""
    h = hashlib.sha256()
    h.update(json.dumps(asdict(spec), sort_keys=True).encode())
    h.update(data.user_ids().tobytes())
    for a in data._pos:
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    h.update("\0".join(data.domains_of_rows().tolist()).encode())
    if spec.exclude_history and data._hist is not None:
        for a in data._hist:
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    for d in sorted(data.catalogue):
        h.update(d.encode() + b"\0" + data.catalogue[d].tobytes())
        if spec.mode == "popularity" and data.item_counts is not None and d in data.item_counts:
            h.update(np.asarray(data.item_counts[d], dtype=np.float64).tobytes())
    return h.hexdigest()


def _valid_prefix(draws: np.ndarray, excl_keys: np.ndarray, N: int) -> np.ndarray:
    """[b, D] mask of the draws that are neither excluded (keys row * N + item) nor repeats."""
    b, D = draws.shape
    keys = (np.arange(b, dtype=np.int64)[:, None] * N + draws).ravel()
    first = np.zeros(keys.size, dtype=bool)
    first[np.unique(keys, return_index=True)[1]] = True
    return (first & ~np.isin(keys, excl_keys)).reshape(b, D)


def _draw_rows(
    rng: np.random.Generator,
    N: int,
    weights: np.ndarray | None,
    cdf: np.ndarray | None,
    excl_keys: np.ndarray,
    b: int,
    n: int,
    rounds: int = 4,
) -> np.ndarray:
    """n distinct allowed items for each of b rows ([b, n]; excluded pairs as keys row * N + item).

    Each row draws a stream with replacement (uniform, or by the cdf) and keeps its first n
    items that are neither excluded nor repeats: exactly sequential sampling without replacement
    among the allowed items. Rows still short after a few rounds keep their valid prefix and draw
    the rest with numpy's exact (slower) sampler, which continues the same process."""
    streams = np.empty((b, 0), dtype=np.int64)
    todo = np.arange(b)
    out = np.full((b, n), -1, dtype=np.int64)
    step = n + n // 4 + 16
    ok, done = np.zeros((b, 0), dtype=bool), np.zeros(b, dtype=bool)
    for _ in range(rounds):
        if cdf is None:
            more = rng.integers(0, N, size=(len(todo), step))
        else:
            more = np.minimum(
                np.searchsorted(cdf, rng.random((len(todo), step)) * cdf[-1], side="right"), N - 1
            )
        streams = np.concatenate([streams, more], 1)
        local = np.isin(excl_keys // N, todo)
        keys = np.searchsorted(todo, excl_keys[local] // N) * N + excl_keys[local] % N
        ok = _valid_prefix(streams, keys, N)
        rank = ok.cumsum(1)
        done = rank[:, -1] >= n
        out[todo[done]] = streams[done][ok[done] & (rank[done] <= n)].reshape(-1, n)
        todo, streams = todo[~done], streams[~done]
        if not len(todo):
            return out
        step *= 2
    for j, row in enumerate(todo):
        banned = excl_keys[excl_keys // N == row] % N
        got = streams[j][ok[~done][j]]
        rest = np.setdiff1d(
            np.arange(N) if weights is None else np.nonzero(weights > 0)[0], np.union1d(banned, got)
        )
        p = None if weights is None else weights[rest] / weights[rest].sum()
        out[row] = np.concatenate([got, rng.choice(rest, size=n - len(got), replace=False, p=p)])
    return out


def _draw_pool(data: EvalSet, spec: CandidateSpec, d: str, rows: np.ndarray
               ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """What the rows `rows` of domain `d` draw from under `spec`: (item weights, None when uniform;
    the sorted excluded keys local_row * N + item, i.e. the positives and, by default, the history;
    per row, how many items are left to draw)."""
    N = len(data.catalogue[d])
    weights = None
    if spec.mode == "popularity":
        if data.item_counts is None or d not in data.item_counts:
            raise DataError(f"{data.name}: popularity candidates need item counts for domain '{d}'")
        counts = np.asarray(data.item_counts[d], dtype=np.float64)
        if counts.shape != (N,) or (counts < 0).any():
            raise DataError(f"{data.name}: item counts of domain '{d}' must be {N} non-negative values")
        weights = counts**spec.pop_exponent * (counts > 0)
    excl = data.index_of(d, data.positives(rows).ravel()).reshape(len(rows), -1)
    if spec.exclude_history:
        excl = np.concatenate([excl, data.index_of(d, data.history(rows).ravel()).reshape(len(rows), -1)], 1)
    local = np.repeat(np.arange(len(rows), dtype=np.int64), excl.shape[1])
    flat = excl.ravel()
    keys = np.unique(local[flat >= 0] * N + flat[flat >= 0])
    # Items left per row: (positive-weight) items minus the excluded ones.
    n_items = N if weights is None else int((weights > 0).sum())
    usable = np.ones(len(keys), dtype=bool) if weights is None else weights[keys % N] > 0
    return weights, keys, n_items - np.bincount(keys[usable] // N, minlength=len(rows))


def max_negatives(data: EvalSet, spec: CandidateSpec) -> int:
    """The most negatives every row of `data` can draw under `spec` (its `n` ignored)."""
    free = [_draw_pool(data, spec, d, rows)[2].min() for d, rows in data.domain_rows().items() if len(rows)]
    return int(min(free)) if free else 0


def sample_candidates(data: EvalSet, spec: CandidateSpec, block: int = 2048) -> Candidates:
    """Draw `spec.n` negatives per row (see the module docstring); deterministic in spec.seed."""
    if spec.mode == "full":
        return Candidates(spec, None, fingerprint(data, spec))
    n = spec.n
    out = np.empty((data.num_rows, n), dtype=np.int64)
    for d, rows in data.domain_rows().items():
        cat = data.catalogue[d]
        N = len(cat)
        # One generator per domain, so a domain's candidates do not depend on the other domains.
        rng = np.random.default_rng([spec.seed, zlib.crc32(d.encode())])
        weights, keys, free = _draw_pool(data, spec, d, rows)
        cdf = None if weights is None else np.cumsum(weights)
        if (free < n).any():
            j = int(np.nonzero(free < n)[0][0])
            what = "items" if weights is None else "items with a non-zero count"
            raise DataError(
                f"{data.name}: row {int(rows[j])} (user {int(data.user_ids()[rows[j]])}, domain '{d}') has "
                f"only {int(free[j])} {what} left to sample {n} negatives from"
            )
        # Streams grow to ~19n draws per row in the worst case: bound a block to ~32 MB of them.
        step = max(1, min(block, (1 << 22) // (19 * n + 64)))
        for s0 in range(0, len(rows), step):
            s1 = min(s0 + step, len(rows))
            lo, hi = np.searchsorted(keys, [s0 * N, s1 * N])
            picked = _draw_rows(rng, N, weights, cdf, keys[lo:hi] - s0 * N, s1 - s0, n)
            out[rows[s0:s1]] = cat[picked]
    return Candidates(spec, out, fingerprint(data, spec))


def save_candidates(cands: Candidates, url: str) -> None:
    """Write the negatives to Parquet (row, negatives) with the spec and fingerprint as metadata;
    a temporary name first, then a rename, so a crash never leaves a partial file."""
    if cands.negatives is None:
        raise ValueError("full-catalogue candidates have nothing to save")
    R, n = cands.negatives.shape
    flat = pa.array(cands.negatives.reshape(-1), type=pa.int64())
    negs = (
        pa.FixedSizeListArray.from_arrays(flat, n) if n else pa.array([[]] * R, type=pa.list_(pa.int64(), 0))
    )
    meta = {"spec": asdict(cands.spec), "fingerprint": cands.fingerprint, "n_rows": R}
    table = pa.table({"row": pa.array(np.arange(R), type=pa.int64()), "negatives": negs})
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    with AtomicFile(url) as f:
        pq.write_table(table, f)


def load_candidates(url: str, data: EvalSet, spec: CandidateSpec) -> Candidates:
    """Read candidates saved by `save_candidates`, refusing a file made with another spec or for
    other eval rows."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"{url}: cannot read candidates ({e})") from None
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise DataError(f"{url}: not a candidates file (no '{_META_KEY.decode()}' metadata)")
    meta = json.loads(raw)
    if meta["spec"] != asdict(spec):
        raise DataError(f"{url}: candidates were drawn with {meta['spec']}, but {asdict(spec)} was asked for")
    fp = fingerprint(data, spec)
    if meta["fingerprint"] != fp:
        raise DataError(f"{url}: candidates were drawn for different eval rows or catalogues ({data.name})")
    rows = np.asarray(table.column("row").to_numpy())
    if not np.array_equal(rows, np.arange(data.num_rows)):
        raise DataError(f"{url}: column 'row' is not 0..{data.num_rows - 1} in order")
    col = table.column("negatives").combine_chunks()
    negs = np.asarray(col.flatten().to_numpy(), dtype=np.int64).reshape(data.num_rows, spec.n)
    return Candidates(spec, negs, fp)


def prepare_candidates(data: EvalSet, spec: CandidateSpec, url: str | None = None) -> Candidates:
    """The candidates of this split: loaded from `url` if it exists, else drawn (and saved there)."""
    if spec.mode == "full":
        return sample_candidates(data, spec)
    if url is not None:
        fs, path = fsspec.core.url_to_fs(url)
        if fs.exists(path):
            return load_candidates(url, data, spec)
    cands = sample_candidates(data, spec)
    if url is not None:
        save_candidates(cands, url)
    return cands
