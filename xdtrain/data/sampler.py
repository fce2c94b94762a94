"""Domain-balanced sampling: PreRec's `WeightedRandomSampler` (specs/prerec.md sec. 2.6) as a stream reader.

The rule: a row of domain k has weight 1 / (N_k * |K|) (N_k rows of domain k, |K| domains, both over
the whole dataset), draws are with replacement, and an epoch draws as many rows as the dataset has:
every domain is equally likely per draw, whatever its size. A row must belong to one domain (a
`domain` column), e.g. the `train_by_domain` stream of `xdtrain.data.recipes`.

Distributed, done globally (spec sec. 8: "globally, or per rank with the same weights"). The N draws
of an epoch are stratified: domain k gets N / |K| of them (the remainder of N / |K| goes to domains
in a rotating order), and those are split over the ranks in proportion to the rows of k each rank's
shard holds (largest remainder, so every rank computes the same split). A rank draws its share of
each domain uniformly from its own rows of that domain and emits the draws in a random order. So
every row's expected draws per epoch is N / (|K| N_k), exactly the global sampler's, and the domains
are balanced over all ranks together even when shards hold different domain mixes (per-rank weights
would then balance each rank's draws, not the epoch's). When every shard mixes domains like the
dataset (the recipes write rows in user order), a rank draws about as many rows as its shard has; a
rank with fewer draws finishes its epoch early, as with unequal shards of the plain reader. The
per-domain row counts of every shard come from one pass over the `domain` column of the whole
dataset when the reader opens (one row group's column at a time).

Draws are a pure function of (seed, epoch, rank, world size, the dataset), so the cursor is the
plain reader's `(epoch, rows_emitted)`: a restored reader regenerates the epoch's draws and skips
those already emitted.

Elastic resume (another world size, `load_global_state`): with replacement, what is left of an
epoch is a number of draws per domain, not a set of rows. The old ranks' draws not yet emitted are
counted per domain (each old rank's draw order is regenerated); the new ranks split those counts
exactly as an ordinary epoch splits N / |K| (by the rows of each domain their new shards hold) and
draw their share with keys (seed, epoch, depth, rank). The state records the old worlds' cursors as
the plain reader does ("elastic" levels); the next `set_epoch` starts an ordinary epoch.

Memory: the rank's shard (every row and column of its row groups, decoded once on the first
iteration and kept, for random access) and the epoch's draws (8 bytes each) -- bounded by the
shard, not the dataset. The count pass keeps a few integers per row group and domain.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xdtrain.data.reader import Levels, ParquetStreamReader, _concat, shard_units
from xdtrain.data.schemas import DataError
from xdtrain.data.validate import read_unit

__all__ = ["BalancedSampleReader", "domain_balanced_indices"]

SAMPLER = "domain_balanced"


def domain_balanced_indices(domains: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` row indices of an in-memory table drawn with replacement, each domain equally likely per
    draw (code: WeightedRandomSampler, weight 1 / (rows of the domain * number of domains)); the
    single-process loops' sampler. The engine's streams use `BalancedSampleReader`."""
    doms = np.asarray(domains, dtype=object)
    names, inv, counts = np.unique(doms, return_inverse=True, return_counts=True)
    p = 1.0 / (counts[inv] * len(names))
    return rng.choice(len(doms), size=n, replace=True, p=p / p.sum())


def split_counts(total: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[K, W] draws: each domain's `total[k]` split over ranks in proportion to `rows[k, w]`, the rows
    of domain k on rank w; integers by largest remainder (ties: lowest rank), so each row sums to total."""
    K, W = rows.shape
    out = np.zeros((K, W), dtype=np.int64)
    for k in range(K):
        t, n = int(total[k]), [int(x) for x in rows[k]]  # Python ints: t * n can exceed int64
        if t == 0:
            continue
        have = sum(n)
        if have == 0:
            raise ValueError(f"{t} draws of domain {k} but no rank holds a row of it")
        base = [t * x // have for x in n]
        frac = [t * x % have for x in n]
        for w in sorted(range(W), key=lambda w: (-frac[w], w))[: t - sum(base)]:
            base[w] += 1
        out[k] = base
    return out


class BalancedSampleReader(ParquetStreamReader):
    """Domain-balanced draws, with replacement, from a rank's shard (see the module docstring).

    The plain reader's interface and cursor (`__iter__` yields RecordBatches of `batch_size` rows,
    `epoch`, `set_epoch`, `state_dict`, `load_state_dict`, `load_global_state`, `num_rows`,
    `epoch_rows`); its state carries `sampler: "domain_balanced"`, so neither reader loads the
    other's cursor. `domains` are the dataset's domains (sorted, as strings), `domain_rows` their
    row counts N_k.
    """

    def __init__(self, url: str, table: str = "sequences", *, batch_size: int = 1024, seed: int = 0,
                 world_size: int = 1, rank: int = 0, storage_options: dict | None = None) -> None:
        super().__init__(url, table, batch_size=batch_size, seed=seed, world_size=world_size, rank=rank,
                         storage_options=storage_options, prefetch=0)
        if "domain" not in self.ds.schema.names:
            raise DataError(f"{self.ds.files[0]}: no 'domain' column (found columns: "
                            f"{', '.join(self.ds.schema.names)}); the domain-balanced sampler needs one "
                            "domain per row (PreRec: data.streams [train_by_domain])")
        self.domains, self._unit_counts = self._count_domains()
        self.domain_rows = self._unit_counts.sum(axis=0)
        self._unit_index = {u: i for i, u in enumerate(self.ds.units)}
        self._shard_rows: dict[int, np.ndarray] = {}  # world size -> [K, W] rows per domain and rank
        self._split_cache: tuple[tuple, np.ndarray] | None = None
        self._draw_cache: tuple[tuple, np.ndarray] | None = None
        self._shard: tuple[pa.RecordBatch, list[np.ndarray]] | None = None

    def _fingerprint(self) -> dict:
        return {**super()._fingerprint(), "sampler": SAMPLER}

    # --- counts and the split of an epoch's draws ---------------------------------------------

    def _count_domains(self) -> tuple[list[str], np.ndarray]:
        """(sorted domain names, [units, K] rows of each domain per row group): one pass over `domain`."""
        only = replace(self.ds, schema=pa.schema([self.ds.schema.field("domain")]))
        handles: dict = {}
        per_unit = []
        for unit in self.ds.units:
            vc = pc.value_counts(_domain_strings(read_unit(only, unit, handles)))
            per_unit.append(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))
        names = sorted(set().union(*per_unit))
        counts = np.array([[c.get(d, 0) for d in names] for c in per_unit], dtype=np.int64)
        return names, counts

    def _rows_per_rank(self, world_size: int) -> np.ndarray:
        """[K, world_size] rows of each domain in each rank's shard."""
        if world_size not in self._shard_rows:
            cols = [self._unit_counts[[self._unit_index[u] for u in shard_units(self.ds.units, world_size, r)]]
                    .sum(axis=0) for r in range(world_size)]
            self._shard_rows[world_size] = np.stack(cols, axis=1)
        return self._shard_rows[world_size]

    def _epoch_draws(self, epoch: int) -> np.ndarray:
        """[K] draws of each domain in an ordinary epoch: N / |K| each, the remainder rotating with the epoch."""
        K, N = len(self.domains), int(self.domain_rows.sum())
        out = np.full(K, N // K, dtype=np.int64)
        out[(epoch + np.arange(N % K)) % K] += 1
        return out

    def _split(self, epoch: int, levels: Levels, world_size: int) -> np.ndarray:
        """[K, world_size] draws per domain and rank of `epoch` after the resumes in `levels`."""
        key = (epoch, levels, world_size)
        if self._split_cache is not None and self._split_cache[0] == key:
            return self._split_cache[1]
        left = self._epoch_draws(epoch)
        for depth, (old_world, done) in enumerate(levels):
            if len(done) != old_world:
                raise ValueError(f"reader state 'elastic' level {depth} lists {len(done)} ranks, not {old_world}")
            quota = split_counts(left, self._rows_per_rank(old_world))
            left = np.zeros(len(self.domains), dtype=np.int64)
            for r in range(old_world):
                total = int(quota[:, r].sum())
                if not 0 <= done[r] <= total:
                    raise ValueError(f"reader state of old rank {r}: rows_emitted={done[r]} outside [0, {total}]")
                codes = self._codes(epoch, depth, r, quota[:, r])
                left += np.bincount(codes[done[r]:], minlength=len(self.domains))
        out = split_counts(left, self._rows_per_rank(world_size))
        self._split_cache = (key, out)
        return out

    def _plan_rows(self, epoch: int, levels: Levels, world_size: int | None = None, rank: int | None = None) -> int:
        world_size = self.world_size if world_size is None else world_size
        rank = self.rank if rank is None else rank
        return int(self._split(epoch, levels, world_size)[:, rank].sum())

    # --- draws --------------------------------------------------------------------------------

    def _key(self, epoch: int, depth: int, rank: int) -> list[int]:
        return [self.seed, epoch, rank] if depth == 0 else [self.seed, epoch, depth, rank]

    def _codes(self, epoch: int, depth: int, rank: int, per_domain: np.ndarray) -> np.ndarray:
        """The domain of each draw of `rank`, in emission order: a seeded shuffle of its per-domain counts."""
        codes = np.repeat(np.arange(len(self.domains), dtype=np.int32), per_domain)
        return np.random.default_rng([*self._key(epoch, depth, rank), 0]).permutation(codes)

    def draws(self, epoch: int | None = None) -> np.ndarray:
        """This rank's draws of `epoch` (default: the current one, after its resumes), in emission
        order: indices into its shard (rows of its row groups in canonical order)."""
        levels = self._levels if epoch is None or epoch == self.epoch else ()
        epoch = self.epoch if epoch is None else epoch
        key = (epoch, levels)
        if self._draw_cache is not None and self._draw_cache[0] == key:
            return self._draw_cache[1]
        per_domain = self._split(epoch, levels, self.world_size)[:, self.rank]
        codes = self._codes(epoch, len(levels), self.rank, per_domain)
        rng = np.random.default_rng([*self._key(epoch, len(levels), self.rank), 1])
        _, by_domain = self._load()
        out = np.empty(len(codes), dtype=np.int64)
        order = np.argsort(codes, kind="stable")  # positions of domain 0's draws, then domain 1's, ...
        start = 0
        for k, n in enumerate(per_domain.tolist()):
            if n:
                rows = by_domain[k]
                out[order[start : start + n]] = rows[rng.integers(0, len(rows), n)]
                start += n
        self._draw_cache = (key, out)
        return out

    def _load(self) -> tuple[pa.RecordBatch, list[np.ndarray]]:
        """The shard's rows, and each domain's row indices in it (read once)."""
        if self._shard is None:
            handles: dict = {}
            shard = _concat([read_unit(self.ds, u, handles) for u in self.units])
            names = np.asarray(_domain_strings(shard).to_numpy(zero_copy_only=False), dtype=object)
            codes = np.searchsorted(np.asarray(self.domains, dtype=object), names)
            expect = self._rows_per_rank(self.world_size)[:, self.rank]
            found = np.bincount(codes, minlength=len(self.domains))
            if len(found) != len(expect) or (found != expect).any():
                raise DataError(f"{self.ds.url}: the 'domain' column changed while the reader was open "
                                f"(rank {self.rank}: counted {expect.tolist()}, read {found.tolist()})")
            order = np.argsort(codes, kind="stable")
            self._shard = (shard, np.split(order, np.cumsum(found)[:-1]))
        return self._shard

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        """Yield the rest of the current epoch's draws from the cursor (nothing if the epoch is done)."""
        rows = self.draws()
        shard, _ = self._load()
        while self._rows_emitted < len(rows):
            take = rows[self._rows_emitted : self._rows_emitted + self.batch_size]
            self._rows_emitted += len(take)
            yield shard.take(pa.array(take))


def _domain_strings(rows: pa.RecordBatch) -> pa.Array:
    """The `domain` column as plain strings (string, dictionary or integer codes)."""
    return pc.cast(rows.column("domain"), pa.string())

