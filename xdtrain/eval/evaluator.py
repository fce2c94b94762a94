"""The evaluator: rank each eval row's positive(s) among its candidates and report metrics.

A model is seen only through a scoring callable (`Scorer`). Rows are scored per domain in user
batches; in `full` mode the catalogue is scored in chunks and each chunk only updates the rank
counts (#items scoring above / equal to each positive), so a 10^6-item catalogue needs memory
for one [batch, chunk] score block, never [batch, catalogue]. Results are per-group sums that
merge across shards (`xdtrain.eval.report`), which is how `evaluate_on_ray` splits users over
Ray tasks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from xdtrain.data.schemas import DataError
from xdtrain.eval import metrics as M
from xdtrain.eval.candidates import (
    Candidates,
    CandidateSpec,
    EvalSet,
    is_list_type,
    list_column,
    pad_lists,
    prepare_candidates,
)
from xdtrain.eval.report import EvalResult, group_label, merge_results


class EvalError(RuntimeError):
    """The scorer broke its contract (wrong shape, NaN, inconsistent scores)."""


@runtime_checkable
class Scorer(Protocol):
    """How the evaluator sees a model. `score_fn(users, items, domain=d) -> scores`.

    users   a batch of B eval rows, all of domain `d`, as tensors (see `user_batch`): `row`
            (index into the eval table), `user_id`, every numeric column, and every list column
            right-padded (-1 for ints, 0 for floats) with its lengths in `<name>_len`. The
            target column `item_id` is never given.
    items   LongTensor of raw item ids:
              1-D [N]    score every row against the same N items (catalogue chunks) -> [B, N]
              2-D [B, C] score row b against its own C candidates                     -> [B, C]
    returns a float tensor, higher is better, finite.

    Contract: a (row, item) pair gets the same score whatever else is in the call (eval mode,
    no dropout, no batch statistics); the evaluator checks this for each positive. It calls
    under torch.no_grad(); a 1-D call gets at most `item_chunk` ids, a 2-D call at most
    `item_chunk` ids in all.
    """

    def __call__(self, users: dict[str, Tensor], items: Tensor, *, domain: str) -> Tensor: ...


@dataclass
class EvalConfig:
    candidates: str = "full"  # "full", "uniform:N" or "popularity:N"
    exclude_history: bool = True  # history items are not candidates (the target always is)
    seed: int = 0  # seed of sampled negatives
    pop_exponent: float = 1.0  # popularity:N draws ∝ count^pop_exponent
    candidates_path: str | None = None  # Parquet of sampled negatives: loaded if present, else written
    tie_policy: Literal["pessimistic", "optimistic", "average"] = "average"
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    k_percents: list[float] = field(default_factory=list)  # PreRec Recall@K% and r-NDCG@K%, e.g. [0.04]
    rndcg_a: float = 2.0
    rndcg_b: float = 15000.0
    groups: list[str] = field(default_factory=list)  # eval-row columns to break results down by
    user_batch: int = 256
    item_chunk: int = 65536
    device: str = "cpu"
    keep_rows: bool = False  # also keep every row's metrics (for paired significance tests)

    def spec(self) -> CandidateSpec:
        return CandidateSpec.parse(self.candidates, self.exclude_history, self.seed, self.pop_exponent)


# ---------------------------------------------------------------- user batches


class _Columns:
    """The eval-row columns a scorer may read, converted once to numpy."""

    def __init__(self, rows: pa.Table) -> None:
        self.flat: dict[str, np.ndarray] = {}
        self.lists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for f in rows.schema:
            if f.name in ("item_id", "domain"):
                continue
            t = f.type
            if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
                self.flat[f.name] = np.asarray(rows.column(f.name).to_numpy(zero_copy_only=False))
            elif is_list_type(t) and (
                pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)
            ):
                self.lists[f.name] = list_column(rows.column(f.name))

    def batch(self, idx: np.ndarray, device: str) -> dict[str, Tensor]:
        out = {"row": torch.as_tensor(idx, dtype=torch.long)}
        for name, col in self.flat.items():
            out[name] = torch.as_tensor(col[idx])
        for name, (off, vals) in self.lists.items():
            pad = -1 if np.issubdtype(vals.dtype, np.integer) else 0.0
            out[name] = torch.as_tensor(pad_lists(off, vals, idx, pad=pad))
            out[f"{name}_len"] = torch.as_tensor(off[idx + 1] - off[idx])
        return {k: v.to(device) for k, v in out.items()}


def user_batch(data: EvalSet | pa.Table, idx: np.ndarray, device: str = "cpu") -> dict[str, Tensor]:
    """The `users` argument a scorer gets for eval rows `idx` (of an EvalSet, or of any rows table)."""
    return _Columns(data.rows if isinstance(data, EvalSet) else data).batch(np.asarray(idx), device)


# ---------------------------------------------------------------- calling the scorer


def _call(score_fn: Scorer, users: dict[str, Tensor], items: Tensor, domain: str, device: str) -> Tensor:
    out = score_fn(users, items, domain=domain)
    B = users["row"].shape[0]
    want = (B, items.shape[0]) if items.dim() == 1 else tuple(items.shape)
    if not isinstance(out, Tensor) or tuple(out.shape) != want or not out.is_floating_point():
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise EvalError(f"domain '{domain}': scorer returned {got}, expected a float tensor of shape {want}")
    # One cheap reduction: a NaN or inf anywhere makes the sum non-finite (then find it).
    bad = ~torch.isfinite(out) if not torch.isfinite(out.sum()) else None
    if bad is not None and bad.any():
        b, j = (int(x) for x in torch.nonzero(bad)[0])
        item = int(items[j] if items.dim() == 1 else items[b, j])
        raise EvalError(
            f"domain '{domain}': scorer returned {float(out[b, j])} "
            f"for eval row {int(users['row'][b])}, item {item}"
        )
    return out.detach().to(device)


def _score_matrix(score_fn: Scorer, users: dict, cand: Tensor, domain: str, cfg: EvalConfig) -> Tensor:
    """Scores of per-row candidates [B, C], in column blocks of at most item_chunk ids per call."""
    step = max(1, cfg.item_chunk // cand.shape[0])
    parts = [
        _call(score_fn, users, cand[:, j : j + step], domain, cfg.device)
        for j in range(0, cand.shape[1], step)
    ]
    return torch.cat(parts, 1)


def _score_items(score_fn: Scorer, users: dict, ids: Tensor, domain: str, cfg: EvalConfig) -> Tensor:
    """Scores of a shared item list [B, N], in chunks of item_chunk ids per call."""
    step = cfg.item_chunk
    return torch.cat(
        [_call(score_fn, users, ids[j : j + step], domain, cfg.device) for j in range(0, len(ids), step)], 1
    )


# ---------------------------------------------------------------- rank counts


def _count_full(
    score_fn: Scorer, users: dict, data: EvalSet, domain: str, idx: np.ndarray, cfg: EvalConfig, cat: Tensor
) -> M.RankCounts:
    """Rank counts against the whole catalogue, chunk by chunk (bounded memory)."""
    dev = cfg.device
    pos = data.positives(idx)
    pmask_np = pos != -1
    pmask = torch.as_tensor(pmask_np, device=dev)
    pos_idx = torch.as_tensor(data.index_of(domain, pos.ravel()).reshape(pos.shape), device=dev)
    B, P = pos.shape
    # The positives' own scores, from a 1-D call like the catalogue chunks.
    uniq, inv = np.unique(pos[pmask_np], return_inverse=True)
    s_u = _score_items(score_fn, users, torch.as_tensor(uniq, device=dev), domain, cfg)
    b_of = torch.as_tensor(np.nonzero(pmask_np)[0], device=dev)
    s_p = torch.zeros((B, P), dtype=s_u.dtype, device=dev)
    s_p[pmask] = s_u[b_of, torch.as_tensor(inv.reshape(-1), device=dev)]
    tied_pos = ((s_p[:, :, None] == s_p[:, None, :]) & pmask[:, None, :]).sum(-1)
    # History items to exclude: never a positive of the row.
    if cfg.exclude_history:
        hist = data.history(idx)
        hist_idx = data.index_of(domain, hist.ravel()).reshape(hist.shape)
        hist_idx[(hist == -1) | (hist[:, :, None] == pos[:, None, :]).any(-1)] = -1
    else:
        hist_idx = np.full((B, 1), -1)
    hist_idx = torch.as_tensor(hist_idx, device=dev)
    greater = torch.zeros((B, P), dtype=torch.long, device=dev)
    tied = torch.zeros((B, P), dtype=torch.long, device=dev)
    n_valid = torch.zeros(B, dtype=torch.long, device=dev)
    for c0 in range(0, len(cat), cfg.item_chunk):
        ids = cat[c0 : c0 + cfg.item_chunk]
        c1 = c0 + len(ids)
        s = _call(score_fn, users, ids, domain, dev)
        for p in range(P):
            sp = s_p[:, p : p + 1]
            greater[:, p] += (s > sp).sum(1)
            tied[:, p] += (s == sp).sum(1)
        # Excluded history items were counted too: take them back out (a few per row, no [B, chunk] mask).
        hb, hc = torch.nonzero((hist_idx >= c0) & (hist_idx < c1), as_tuple=True)
        if len(hb):
            cols = torch.unique(hb * (c1 - c0) + hist_idx[hb, hc] - c0)  # an item listed twice counts once
            eb, ec = cols // (c1 - c0), cols % (c1 - c0)
            s_ex = s[eb, ec]
            greater.index_put_((eb,), -(s_ex[:, None] > s_p[eb]).long(), accumulate=True)
            tied.index_put_((eb,), -(s_ex[:, None] == s_p[eb]).long(), accumulate=True)
            n_valid.index_put_((eb,), -torch.ones_like(eb), accumulate=True)
        n_valid += c1 - c0
        # Each positive was also compared with itself: undo that, and check the scorer agrees.
        pb, pp = torch.nonzero(pmask & (pos_idx >= c0) & (pos_idx < c1), as_tuple=True)
        s_self, s_ref = s[pb, pos_idx[pb, pp] - c0], s_p[pb, pp]
        greater[pb, pp] -= (s_self > s_ref).long()
        tied[pb, pp] -= (s_self == s_ref).long()
        off = (s_self.double() - s_ref.double()).abs() > 1e-5 + 1e-4 * s_ref.double().abs()
        if off.any():
            j = int(torch.nonzero(off)[0, 0])
            raise EvalError(
                f"domain '{domain}': eval row {int(idx[int(pb[j])])} item {int(pos[pb[j], pp[j]])} scored "
                f"{float(s_ref[j])} and {float(s_self[j])} in two calls; the scorer must not depend on the "
                "batch (eval mode, no dropout)"
            )
    return M.RankCounts(
        greater=greater * pmask,
        tied=tied * pmask,
        tied_pos=torch.where(pmask, tied_pos, torch.ones_like(tied_pos)),
        mask=pmask,
        n_candidates=n_valid,
    )


def _count_sampled(
    score_fn: Scorer,
    users: dict,
    data: EvalSet,
    domain: str,
    idx: np.ndarray,
    cfg: EvalConfig,
    negs: np.ndarray,
) -> M.RankCounts:
    """Rank counts among the row's positives plus its saved negatives."""
    pos = data.positives(idx)
    pmask = pos != -1
    pos = np.where(pmask, pos, pos[:, :1])  # padded slots get a real id; they are marked invalid
    cand = torch.as_tensor(np.concatenate([pos, negs], 1), device=cfg.device)
    scores = _score_matrix(score_fn, users, cand, domain, cfg)
    if not data.multi_positive:
        return M.rank_counts(scores, torch.zeros(len(idx), dtype=torch.long, device=cfg.device))
    rel = torch.zeros_like(scores, dtype=torch.bool)
    rel[:, : pos.shape[1]] = torch.as_tensor(pmask, device=cfg.device)
    valid = torch.ones_like(rel)
    valid[:, : pos.shape[1]] = rel[:, : pos.shape[1]]
    return M.rank_counts(scores, rel, valid)


def _row_metrics(c: M.RankCounts, cfg: EvalConfig, multi: bool, n_items: int) -> dict[str, Tensor]:
    pol = cfg.tie_policy
    out: dict[str, Tensor] = {}
    if multi:
        for k in cfg.ks:
            out[f"recall@{k}"] = M.recall(c, k, pol)
        for k in cfg.ks:
            out[f"hit@{k}"] = M.hit_rate(c, k, pol)
        for k in cfg.ks:
            out[f"ndcg@{k}"] = M.ndcg(c, k, pol)
        out["auc"] = M.rank_auc(c, pol)
        return out
    for k in cfg.ks:
        out[f"hr@{k}"] = M.hit_rate(c, k, pol)
    for k in cfg.ks:
        out[f"ndcg@{k}"] = M.ndcg(c, k, pol)
    out["mrr"] = M.mrr(c, pol)
    for pct in cfg.k_percents:
        out[f"recall@{pct:g}%"] = M.recall_at_k_percent(c, n_items, pct, pol)
        out[f"rndcg@{pct:g}%"] = M.rndcg_at_k_percent(c, n_items, pct, cfg.rndcg_a, cfg.rndcg_b, pol)
    out["auc"] = M.rank_auc(c, pol)
    out["rank"] = M.mean_rank(c, pol)
    return out


# ---------------------------------------------------------------- evaluation


def _in_shard(user_ids: np.ndarray, shard: tuple[int, int]) -> np.ndarray:
    """Rows whose user falls in shard i of n (a user's rows stay together)."""
    i, n = shard
    if n == 1:
        return np.ones(len(user_ids), dtype=bool)
    mixed = (user_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    return (mixed % np.uint64(n)).astype(np.int64) == i


def _check(data: EvalSet, cfg: EvalConfig, spec: CandidateSpec) -> None:
    if cfg.tie_policy not in M.TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {M.TIE_POLICIES}, got {cfg.tie_policy!r}")
    if any(k < 1 for k in cfg.ks) or cfg.user_batch < 1 or cfg.item_chunk < 1:
        raise ValueError("ks, user_batch and item_chunk must be positive")
    for g in cfg.groups:
        if g not in data.rows.schema.names:
            raise DataError(
                f"{data.name}: group column '{g}' not found (columns: {', '.join(data.rows.schema.names)})"
            )
    if cfg.k_percents:
        if data.multi_positive:
            raise ValueError("Recall@K% and r-NDCG@K% are defined for one target per row")
        sizes = (
            {d: len(c) for d, c in data.catalogue.items()} if spec.mode == "full" else {"sampled": spec.n + 1}
        )
        for d, n in sizes.items():
            for pct in cfg.k_percents:
                try:
                    M.k_from_percent(n, pct)
                except ValueError as e:
                    raise ValueError(f"k_percents: domain '{d}': {e}") from None


def evaluate(
    score_fn: Scorer,
    data: EvalSet,
    cfg: EvalConfig,
    candidates: Candidates | None = None,
    shard: tuple[int, int] = (0, 1),
) -> EvalResult:
    """Evaluate `score_fn` on the eval rows (those of users in `shard` = (index, count))."""
    spec = cfg.spec()
    _check(data, cfg, spec)
    if candidates is None:
        candidates = prepare_candidates(data, spec, cfg.candidates_path)
    elif candidates.spec != spec:
        raise ValueError(f"candidates were drawn with {candidates.spec}, the config asks for {spec}")
    info = {
        "split": data.name,
        "candidates": cfg.candidates,
        "tie_policy": cfg.tie_policy,
        "config": asdict(cfg),
        "n_items": {d: int(len(c)) for d, c in data.catalogue.items()},
        "multi_positive": data.multi_positive,
    }
    result = EvalResult(info=info)
    cols = _Columns(data.rows)
    labels_all = {
        g: np.asarray([group_label(g, v) for v in data.rows.column(g).to_pylist()], dtype=object)
        for g in cfg.groups
    }
    uids = data.user_ids()
    with torch.no_grad():
        for d, rows in data.domain_rows().items():
            rows = rows[_in_shard(uids[rows], shard)]
            cat = torch.as_tensor(data.catalogue[d], device=cfg.device)
            for start in range(0, len(rows), cfg.user_batch):
                idx = rows[start : start + cfg.user_batch]
                users = cols.batch(idx, cfg.device)
                if spec.mode == "full":
                    counts = _count_full(score_fn, users, data, d, idx, cfg, cat)
                    n_items = len(cat)
                else:
                    counts = _count_sampled(score_fn, users, data, d, idx, cfg, candidates.negatives[idx])
                    n_items = spec.n + 1
                values = {
                    k: v.double().cpu().numpy()
                    for k, v in _row_metrics(counts, cfg, data.multi_positive, n_items).items()
                }
                kept = None
                if cfg.keep_rows:
                    kept = {
                        "row": idx.astype(np.int64),
                        "user_id": uids[idx],
                        "domain": np.full(len(idx), d, dtype=object),
                    }
                result.add(d, {g: lab[idx] for g, lab in labels_all.items()}, values, kept)
    return result


def _evaluate_shard(
    score_fn: Scorer, data: EvalSet, cfg: EvalConfig, candidates: Candidates, shard: tuple[int, int]
) -> EvalResult:
    torch.set_num_threads(1)
    return evaluate(score_fn, data, cfg, candidates, shard)


def evaluate_on_ray(
    score_fn: Scorer,
    data: EvalSet,
    cfg: EvalConfig,
    num_shards: int,
    candidates: Candidates | None = None,
    **options,
) -> EvalResult:
    """Split users over `num_shards` Ray tasks and merge their results; equals `evaluate`.
    Candidates are drawn (or loaded) once here so every shard ranks the same ones. `options`
    go to the Ray task (num_cpus, resources, ...)."""
    import ray

    if candidates is None:
        candidates = prepare_candidates(data, cfg.spec(), cfg.candidates_path)
    task = ray.remote(_evaluate_shard).options(**{"num_cpus": 1, **options})
    refs = [ray.put(x) for x in (score_fn, data, candidates)]
    parts = ray.get([task.remote(refs[0], refs[1], cfg, refs[2], (i, num_shards)) for i in range(num_shards)])
    return merge_results(parts)


# ---------------------------------------------------------------- reference scorers


def _lookup(keys: Tensor, query: Tensor, what: str) -> Tensor:
    pos = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
    found = keys[pos] == query
    if not found.all():
        raise EvalError(f"unknown {what} {int(query[~found].reshape(-1)[0])}")
    return pos


class EmbeddingScorer:
    """Dot-product scores from precomputed vectors (e.g. exported embeddings): the user vector is
    looked up by the user-batch column `key` (user_id, or row for one vector per eval row)."""

    def __init__(
        self,
        user_keys: Tensor,
        user_vectors: Tensor,
        item_ids: Tensor,
        item_vectors: Tensor,
        key: str = "user_id",
    ):
        uo, io = torch.argsort(user_keys), torch.argsort(item_ids)
        self.user_keys, self.user_vectors = user_keys[uo], user_vectors[uo]
        self.item_ids, self.item_vectors = item_ids[io], item_vectors[io]
        self.key = key

    def __call__(self, users: dict[str, Tensor], items: Tensor, *, domain: str) -> Tensor:
        u = self.user_vectors[_lookup(self.user_keys, users[self.key].cpu(), self.key)]
        v = self.item_vectors[_lookup(self.item_ids, items.cpu(), "item id")]
        if items.dim() == 1:
            return u @ v.T
        return torch.bmm(v, u.unsqueeze(-1)).squeeze(-1)


class RandomScorer:
    """The Random baseline: a uniform score in [0, 1) hashed from (seed, row, item), so a pair
    scores the same in every call (rows are keyed by the user-batch column `key`)."""

    def __init__(self, seed: int = 0, key: str = "row"):
        self.seed, self.key = seed, key

    def __call__(self, users: dict[str, Tensor], items: Tensor, *, domain: str) -> Tensor:
        r = users[self.key].cpu().numpy().astype(np.uint64)[:, None]
        it = items.cpu().numpy().astype(np.uint64)
        it = it[None, :] if it.ndim == 1 else it
        seed = np.asarray([self.seed], dtype=np.uint64)  # arrays wrap silently; scalars warn
        x = seed * np.uint64(0x9E3779B97F4A7C15) + r * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (it * np.uint64(0x94D049BB133111EB) + np.uint64(0x2545F4914F6CDD1D))
        # splitmix64 finaliser
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
        return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) / float(1 << 53))
