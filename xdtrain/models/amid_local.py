"""AMID and its baselines trained in one process (xdtrain/train/local_program.py: world 1, in-process
PS), evaluated on valid and test after every phase epoch: the CPU-sized experiments (spec test F,
scripts/amid_table.py). The engine runs the same program (jobs.pretrain); this adds per-epoch test
metrics, which the released code's protocol (best epoch on test) needs.

    hist = fit_and_track(AmidConfig(...), rows, valid, test, candidates="uniform:100", seed=0, epochs=10)
    pick(hist, "valid")   # test metrics at the best validation NDCG@10 (honest)
    pick(hist, "test")    # each test metric's best epoch (the released code's protocol)
"""

from __future__ import annotations

import numpy as np
import torch

from xdtrain.data.amid_rows import AmidDataConfig, AmidRows, domain_catalogues, eval_set, rows_from_logs
from xdtrain.data.synthetic.open_world import OpenWorld, open_world, period_of
from xdtrain.eval.candidates import EvalSet
from xdtrain.models.amid import Amid, AmidConfig
from xdtrain.nn.program import resolve_program
from xdtrain.ps import LocalPS
from xdtrain.train.config import EvalSection
from xdtrain.train.evaluation import RankingEval
from xdtrain.train.local_program import local_ps, run_epochs

# Spec test F's open world and model (tests/test_amid_world.py, scripts/amid_mim_probe.py). Sized so that
# the backbone learns: at 1,500 users and 5 epochs every model stayed at a random ranking (docs/amid.md).
WORLD_F = dict(users=5000, overlap=0.15, noise=0.1)
MODEL_F = dict(backbone="sasrec", d=16, max_len=10, layers=1, heads=2, dropout=0.0, lr=1e-2, lr2=3e-5, item_lr=3e-2)
EPOCHS_F = 40
# Test F's world with trends (docs/amid.md "F1 with trends"): 10 periods, each list's last 3 items from the
# period's trending cluster with probability 0.8; eval MIM groups of 32 rows, so that a group is one period.
TREND_F = dict(periods=10, trend=0.8, trend_items=3)
MIM_N_TREND = 32

METHODS = {  # the headline comparison (spec §10.1-7): model flags of each baseline
    "backbone": {"mim": False, "estimator": "none"},
    "mim": {"mim": True, "estimator": "none"},
    "ips": {"mim": False, "estimator": "ips"},
    "amid": {"mim": True, "estimator": "dr"},
}


def world_data(world: OpenWorld, k_u: float, seed: int, mnar: float = 0.0
               ) -> tuple[AmidRows, dict[str, np.ndarray], EvalSet, EvalSet]:
    """(rows, catalogue, valid, test) of a synthetic open world at K_u (and the MNAR factor `mnar`)."""
    rows = rows_from_logs(open_world(world), AmidDataConfig(world.domains, k_u=k_u, mnar=mnar, seed=seed))
    cat = domain_catalogues([rows.D, rows.valid, rows.test], world.domains)
    return rows, cat, *(eval_set(getattr(rows, s), world.domains, cat, s) for s in ("valid", "test"))


def period_groups(world: OpenWorld, rows: AmidRows) -> dict[str, np.ndarray]:
    """"O" / "D" -> each row's period: `fit_and_track(groups=...)` then batches in time order."""
    return {k: period_of(world, getattr(rows, k)["user_id"].to_numpy()) for k in ("O", "D")}


def evaluator(data: EvalSet, candidates: str, seed: int) -> RankingEval:
    """Ranking on `data` with fixed negatives per `seed` (shared by every method), pessimistic ties,
    broken down by overlap."""
    return RankingEval(data, EvalSection(candidates=[candidates], ks=[10], seed=seed, tie_policy="pessimistic",
                                         groups=["overlap"], baselines=[]))


def metrics(model: Amid, ps: LocalPS, ev: RankingEval) -> dict[str, dict[str, float]]:
    """{group: {hr@10, ndcg@10, count}} for groups all, overlap=true, overlap=false, each target
    domain's rows (group = the domain's name) and each domain's overlap groups ("<domain>|overlap=false")."""
    res = next(iter(ev.results(model.scorer(ev.data.rows, ps.pull)).values())).summary()
    groups = {**res["overall"], **{d: g["all"] for d, g in res["domains"].items()},
              **{f"{d}|{k}": m for d, g in res["domains"].items() for k, m in g.items() if k != "all"}}
    return {g: {k: float(v) for k, v in m.items()} for g, m in groups.items()}


def fit_and_track(cfg: AmidConfig, rows: AmidRows, valid: EvalSet, test: EvalSet, domains: list[str],
                  item_domains: dict, candidates: str, seed: int, epochs: int, batch_size: int = 256,
                  evals: tuple[RankingEval, RankingEval] | None = None, model: Amid | None = None,
                  ps: LocalPS | None = None, groups: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Train one AMID variant for `epochs` phase epochs; [{"epoch", "valid", "test"}] per epoch.
    `model` / `ps`: built by the caller (a diagnostic subclass, or to inspect them after training);
    `groups`: "O" / "D" -> a key per row whose rows are batched together (e.g. a time period)."""
    torch.manual_seed(seed)
    model = model if model is not None else Amid(cfg, domains, item_domains, seed)
    ps = ps if ps is not None else local_ps(model)
    prog = resolve_program(model, batch_size=batch_size, epochs=epochs, patience=0, lr=cfg.lr,
                           betas=(0.9, 0.98), weight_decay=0.0)
    ev_valid, ev_test = evals or (evaluator(valid, candidates, seed), evaluator(test, candidates, seed))
    hist: list[dict] = []

    def after(_phase: str, epoch: int) -> None:
        hist.append({"epoch": epoch, "valid": metrics(model, ps, ev_valid), "test": metrics(model, ps, ev_test)})

    run_epochs(model, ps, prog, {"O": rows.O, "D": rows.D}, np.random.default_rng(seed), after, groups=groups)
    return hist


def pick(hist: list[dict], by: str, monitor: str = "ndcg@10") -> dict[str, dict[str, float]]:
    """Test metrics per group: `by="valid"` at the epoch of the best validation `monitor` (first on
    ties); `by="test"` each (group, metric) at its own best test epoch (released train_sr_dr.py)."""
    if by == "valid":
        best = max(range(len(hist)), key=lambda i: (hist[i]["valid"]["all"][monitor], -i))
        return hist[best]["test"]
    groups = hist[0]["test"]
    return {g: {m: max(h["test"][g][m] for h in hist) for m in groups[g]} for g in groups}


def valid_ndcg_by_overlap(hist: list[dict]) -> dict[str, float]:
    """Test NDCG@10 (4 decimals) at the best validation epoch, for all rows and each overlap group."""
    best = pick(hist, "valid")
    return {g: round(best[g]["ndcg@10"], 4) for g in ("all", "overlap=true", "overlap=false")}
