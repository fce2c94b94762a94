"""RecGURU's real-data tables (spec sec. 7, Tables 2 and 3) on MovieLens-1M genre domains, in one process.

Data: configs/recguru_ml1m.yaml (an item's first genre; Comedy is the target, Drama the source; the
per-(user, domain) leave-one-out split; streams `domain.<D>` and `overlap`; per-domain catalogues),
rebuilt per (overlap rate, seed): an optional seeded subsample of `--users` users, then
`resample_overlap` (overlap_rate x |Comedy users| stay in both domains, seeded by the seed), then the
recipe. Every method of one (overlap, seed) trains on that data and ranks the same candidates.

Methods, all evaluated on the target domain (Comedy) only:
  pop       the evaluator's POP baseline (training counts of the target domain)
  sasrec    the engine's `seqrec` model (backbone sasrec: BCE, 1 negative, dropout 0.2) trained on the
  bert4rec  target domain's sequences only (bert4rec: Cloze, sampled softmax, dropout 0.1); d, max_len,
            layers and heads are RecGURU's (spec sec. 3.6); `--ft-epochs` epochs, lr 1e-3
  autorec   RecGURU `model.variant=autorec`: phase 1 on the target domain, then CDSRec (phase 3)
  seqrec    RecGURU `model.variant=seqrec`: CDSRec without the GUR (phase 3 only)
  recguru   the full program (job `all`): phase 1 (both domains), phase 2 (WGAN-GP + the l2 tie of
            the overlapped users), phase 3 on the target
Each program runs through `run_iterations` / `run_epochs` (xdtrain/train/local_program.py: world 1,
in-process PS, each phase's `ps_lr_scale` applied as the engine's worker does). After each
epoch of the last phase (phase 3, or the baselines' one phase) the validation rows are ranked; the
reported test metrics are those of the epoch with the best validation HR@10 under the first
candidate mode (popularity-sampled; first epoch on ties); test is ranked only at a new best, never
used to choose. Early stop after `--patience` epochs without a new best (0 = never).

Ranking (cfg `eval`): 1 target + 199 negatives drawn by training count (`popularity:199`) and
uniformly (`uniform:199`), without replacement, history excluded, fixed per seed; and the full target
catalogue; pessimistic ties; HR/NDCG@{5,10,20}. When some eval row has fewer than 199 items left to
draw from, N falls back to the largest that every row allows, and the record says so
(`candidates`, `candidates_clamped`).

CPU-sized defaults (2 shared cores, one thread): d 32, max_len 50, 1 layer, 2 heads, FFN 128, dropout
0.2, batch 128 users per domain, 200 pre-training steps, 200 generator iterations (x6 engine
iterations with the 5 critic steps), 20 fine-tune epochs, patience 5, all users (at 10% overlap: 3,373
Comedy users, 3,232 of them with eval rows, 915 Comedy items); the rest is the config's (phase 2 at
the paper's adv_lr 1e-4, item rows x adv_item_scale 0.1). Measured at these sizes on one core of a
busy 2-core machine (load ~2.5): one RecGURU run at 10% overlap 280 s (phases 42 + 144 + 94 s, 20
epochs with validation); from 2-epoch runs, AutoRec ~110 s, SeqRec ~80 s, SAS and BERT4Rec ~60 s each:
~10 min per (overlap, seed), ~1.5 h for the grid. The paper's sizes are in the config (d 64, N 100,
2 layers, 400 + 1,000 iterations, 50 epochs): pass e.g. `--d 64 --max-len 100 --layers 2 --ffn 512
--dropout 0.5 ...` where there is time for them.

    python scripts/recguru_table.py --out runs/recguru_table                 # the grid (resumable)
    python scripts/recguru_table.py --out runs/recguru_table --overlaps 0.1 --seeds 0 --methods recguru
    python scripts/recguru_table.py --table runs/recguru_table               # -> runs/recguru_table/tables.md

Results are appended to <out>/results.jsonl, one line per (overlap, seed, method) as each run ends;
a rerun skips the runs already there (change --out when the sizes change).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch

from xdtrain.config import load_config
from xdtrain.data.recipes import InteractionsSource, LocalRecipe
from xdtrain.data.two_domain import resample_overlap
from xdtrain.eval.baselines import PopularityScorer
from xdtrain.eval.candidates import CandidateSpec, EvalSet, max_negatives
from xdtrain.models import model_config
from xdtrain.models.recguru import RecGuru
from xdtrain.models.seqrec import SeqRec, SeqRecConfig
from xdtrain.nn.program import resolve_program
from xdtrain.ps import LocalPS
from xdtrain.train.config import EngineConfig
from xdtrain.train.datasets import eval_subset, load_interactions, recipe_config
from xdtrain.train.evaluation import RankingEval
from xdtrain.train.local_program import local_ps, run_epochs, run_iterations
from xdtrain.train.optimizers import OptimizerSet

CONFIG = "configs/recguru_ml1m.yaml"
METHODS = ("pop", "sasrec", "bert4rec", "autorec", "seqrec", "recguru")
VARIANTS = {"autorec": "autorec", "seqrec": "seqrec", "recguru": "recguru"}
BACKBONES = {  # the baselines' own settings (spec sec. 3.6); size and lr come from the command line
    "sasrec": {"backbone": "sasrec", "dropout": 0.2, "loss": "bce", "negatives": 1},
    "bert4rec": {"backbone": "bert4rec", "dropout": 0.1, "mask_prob": 0.2, "last_only_prob": 0.1,
                 "loss": "sampled_softmax"},
}
TABLE2 = [("pop", "POP"), ("sasrec", "SAS"), ("bert4rec", "BERT4Rec"), ("autorec", "AutoRec"),
          ("recguru", "RecGURU")]
TABLE3 = [("seqrec", "SeqRec"), ("autorec", "+Auto"), ("recguru", "+GURU")]
METRICS = ["hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20"]
PROTOCOLS = {"popularity": "1 + N negatives drawn by training count (the paper's protocol; the monitor)",
             "uniform": "1 + N negatives drawn uniformly", "full": "the whole target catalogue"}


# ---------------------------------------------------------------- data


def interactions(cfg: EngineConfig) -> pa.Table:
    """The configured source's interactions (all domains), loaded once for the whole grid."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_interactions(cfg.data, Path(tmp)).table


def thin_target(inter: pa.Table, target: str, last: int) -> pa.Table:
    """Each user's `last` most recent interactions in `target` (a sparse target: short histories);
    the other domains untouched."""
    in_target = pc.equal(pc.cast(inter["domain"], pa.string()), target).to_numpy(zero_copy_only=False)
    t = inter.filter(pa.array(in_target))
    users, ts = t["user_id"].to_numpy(), t["timestamp"].to_numpy()
    order = np.lexsort((-ts, users))  # by user, newest first
    u = users[order]
    starts = np.r_[0, np.flatnonzero(u[1:] != u[:-1]) + 1]
    rank = np.arange(len(u)) - np.repeat(starts, np.diff(np.r_[starts, len(u)]))
    return pa.concat_tables([inter.filter(pa.array(~in_target)), t.take(order[rank < last])])


def build_data(inter: pa.Table, cfg: EngineConfig, overlap: float, seed: int, users: int,
               target_last: int = 0) -> dict:
    """The split of one (overlap, seed): train tables by dataset name, both domains' catalogues, the
    target's valid / test EvalSets, stats. `target_last` > 0 keeps each user's last that many
    target-domain interactions (`thin_target`)."""
    d = cfg.data
    dom = pc.cast(inter["domain"], pa.string())
    inter = inter.filter(pc.is_in(dom, pa.array(list(d.train_domains), pa.string())))
    if target_last:
        inter = thin_target(inter, cfg.model.get("target") or cfg.model["domains"][0], target_last)
    if users:
        ids = np.unique(inter["user_id"].to_numpy())
        keep = np.random.default_rng([seed, users]).choice(ids, min(users, len(ids)), replace=False)
        inter = inter.filter(pc.is_in(inter["user_id"], pa.array(keep)))
    inter = resample_overlap(inter, overlap, d.overlap_reference, seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = LocalRecipe().prepare(InteractionsSource(d.dataset, inter), recipe_config(d), tmp)
        train = {k: pads.dataset(v.url).to_table() for k, v in out.streams.items()}
    target = cfg.model.get("target") or cfg.model["domains"][0]
    valid, test = (eval_subset(s, [target]) for s in (out.valid, out.test))
    stats = {k: v for k, v in out.stats.items() if isinstance(v, (int, float, str))}
    stats.update(valid_rows=valid.num_rows, test_rows=test.num_rows, users_subsample=users, target_last=target_last,
                 target_items=int(len(valid.catalogue[target])))
    return {"train": train, "catalogue": dict(out.valid.catalogue), "valid": valid, "test": test,
            "target": target, "stats": stats}


def evaluators(cfg: EngineConfig, valid: EvalSet, test: EvalSet, seed: int) -> tuple[RankingEval, RankingEval, dict]:
    """Valid and test rankings of every `eval.candidates` mode (negatives fixed by `seed`), with N of a
    sampled mode lowered to what every row of both splits allows; {kind: {asked, used}} of the lowered."""
    modes, clamped = [], {}
    for text in cfg.eval.candidates:
        spec = CandidateSpec.parse(text)
        if spec.mode != "full":
            n = min(spec.n, *(max_negatives(s, spec) for s in (valid, test)))
            if n < 1:
                raise SystemExit(f"{text}: some eval row has no item left to draw a negative from")
            if n < spec.n:
                clamped[spec.mode] = {"asked": spec.n, "used": n}
                text = f"{spec.mode}:{n}"
        modes.append(text)
    sec = dataclasses.replace(cfg.eval, candidates=modes, ks=sorted(set(cfg.eval.ks) | {5, 10, 20}), seed=seed,
                              baselines=[], groups=[])
    return RankingEval(valid, sec), RankingEval(test, sec), clamped


def nested(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"popularity:199/hr@10": v} -> {"popularity": {"hr@10": v}} (N is in the record's `candidates`)."""
    out: dict[str, dict[str, float]] = {}
    for key, v in flat.items():
        mode, _, metric = key.partition("/")
        out.setdefault(mode.partition(":")[0], {})[metric] = round(float(v), 6)
    return out


# ---------------------------------------------------------------- training


class TargetSeqRec(SeqRec):
    """The `seqrec` model on one domain: eval rows read their own domain's history only (the
    catalogue is that domain's, as RecGURU's scorer reads its domain only)."""

    def scorer(self, rows: pa.Table, pull):
        dom, hdom = rows["domain"].to_pylist(), rows["history_domains"].to_pylist()
        own = [[i for i, x in zip(h, hd) if x == d] for h, hd, d in zip(rows["history"].to_pylist(), hdom, dom)]
        return super().scorer(rows.set_column(rows.schema.get_field_index("history"), "history",
                                              pa.array(own, pa.list_(pa.int64()))), pull)


class _Stop(Exception):
    """Early stop from an epoch callback."""


class Tracker:
    """Validation after each epoch; test only at a new best validation monitor (first epoch on ties)."""

    def __init__(self, model, ps: LocalPS, ev_valid: RankingEval, ev_test: RankingEval, patience: int) -> None:
        self.model, self.ps, self.ev_valid, self.ev_test, self.patience = model, ps, ev_valid, ev_test, patience
        self.history: list[float] = []
        self.best: dict = {}

    def __call__(self, _phase: str = "", epoch: int = 0) -> None:
        v = self.ev_valid.model_metrics(self.model, self.ps.pull)
        self.history.append(round(v[self.ev_valid.monitor], 6))
        if not self.best or self.history[-1] > self.history[self.best["epoch"]]:
            self.best = {"epoch": len(self.history) - 1, "valid": v,
                         "test": self.ev_test.model_metrics(self.model, self.ps.pull)}
        elif self.patience and len(self.history) - 1 - self.best["epoch"] >= self.patience:
            raise _Stop


def train_program(model, prog, tables: dict, tracker: Tracker, seed: int, log) -> dict:
    """Iteration-counted phases (RecGURU's 1 and 2) with random batches of each stream, then the
    epoch-counted last phase through `run_epochs` with `tracker` after each epoch. -> named losses
    at the end of each phase."""
    rng = np.random.default_rng(seed)
    ps, opts, losses = tracker.ps, OptimizerSet(model, prog.optimizers), {}
    model.train()

    for ph in prog.phases:
        t0 = time.time()
        if ph.iterations:
            named = run_iterations(model, ps, opts, prog, ph, tables, rng)
        else:
            try:
                named = run_epochs(model, ps, dataclasses.replace(prog, phases=[ph]), tables, rng, tracker)
            except _Stop:
                named = {}
        losses[ph.name] = {k: round(v, 4) for k, v in named.items()}
        log(f"phase {ph.name} {time.time() - t0:.0f} s {losses[ph.name]}")
    return losses


def run_method(method: str, data: dict, evs: tuple, args: argparse.Namespace, cfg: EngineConfig, seed: int,
               log) -> dict:
    ev_valid, ev_test = evs
    if method == "pop":
        v, t = (ev.flat(PopularityScorer(ev.data)) for ev in evs)
        return {"valid": nested(v), "test": nested(t), "best_epoch": 0,
                "valid_history": [round(v[ev_valid.monitor], 6)],
                "epochs_run": 0}
    torch.manual_seed(seed)
    target = data["target"]
    spec = {k: v for k, v in cfg.model.items() if k != "name"}
    if method in BACKBONES:
        scfg = SeqRecConfig(**{**BACKBONES[method], "d": spec["d"], "max_len": spec["max_len"],
                               "layers": spec["layers"], "heads": spec["heads"], "item_lr": args.lr,
                               **({"negatives": args.bert_negatives} if method == "bert4rec" else {})})
        model = TargetSeqRec(scfg, data["catalogue"][target], seed, {target: data["catalogue"][target]})
        tables = {"train": data["train"][f"domain.{target}"]}
        mcfg = dataclasses.asdict(scfg)
    else:
        mcfg = model_config({"name": "recguru", **spec, "variant": VARIANTS[method], "job": "all"})
        tables = data["train"]
        model = RecGuru(mcfg, data["catalogue"], {k: t.num_rows for k, t in tables.items()}, seed)
        mcfg = dataclasses.asdict(mcfg)
    prog = resolve_program(model, batch_size=spec["batch_size"], epochs=args.ft_epochs, patience=0, lr=args.lr,
                           betas=(0.9, 0.98), weight_decay=0.0)
    tracker = Tracker(model, local_ps(model), ev_valid, ev_test, args.patience)
    losses = train_program(model, prog, tables, tracker, seed, log)
    best = tracker.best
    return {"valid": nested(best["valid"]), "test": nested(best["test"]), "best_epoch": best["epoch"],
            "valid_history": tracker.history, "epochs_run": len(tracker.history), "losses_end": losses,
            "model": mcfg}


def run_key(r: dict) -> tuple:
    return float(r["overlap"]), int(r["seed"]), r["method"]


def load_results(path: Path, repair: bool = False) -> list[dict]:
    """The records of a results.jsonl; `repair`: drop a line a killed run left unfinished (rewriting the file)."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    good = []
    for i, line in enumerate(lines):
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            if not repair or i != len(lines) - 1:
                raise SystemExit(f"{path}: line {i + 1} is not JSON") from None
            print(f"[recguru_table] {path}: dropping an unfinished last line", flush=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in good))
            tmp.replace(path)
    return good


def overrides(args: argparse.Namespace) -> list[str]:
    size = {"d": args.d, "max_len": args.max_len, "layers": args.layers, "heads": args.heads, "ffn": args.ffn,
            "dropout": args.dropout, "batch_size": args.batch_size, "pretrain_steps": args.pretrain_steps,
            "adv_iterations": args.adv_iterations}
    return [f"model.{k}={v}" for k, v in size.items()] + list(args.set)


def run_grid(args: argparse.Namespace, out: Path) -> None:
    results = out / "results.jsonl"
    done = {run_key(r) for r in load_results(results, repair=True)}
    cfg = load_config(EngineConfig, args.config, overrides(args))
    inter = None
    for overlap in args.overlaps:
        for seed in args.seeds:
            todo = [m for m in args.methods if (float(overlap), seed, m) not in done]
            if not todo:
                continue
            t0 = time.time()
            inter = interactions(cfg) if inter is None else inter
            data = build_data(inter, cfg, overlap, seed, args.users, args.target_last)
            ev_valid, ev_test, clamped = evaluators(cfg, data["valid"], data["test"], seed)
            cands = {c.partition(":")[0]: c for c in ev_valid.cfg.candidates}
            print(f"[recguru_table] overlap {overlap} seed {seed}: data {time.time() - t0:.0f} s, "
                  f"{data['stats']['valid_rows']} target rows, {data['stats']['target_items']} items, "
                  f"candidates {list(cands.values())}", flush=True)
            for method in todo:
                t0 = time.time()

                def log(msg: str, method: str = method) -> None:
                    if args.verbose:
                        print(f"[recguru_table]   {method}: {msg}", flush=True)

                rec = {"overlap": overlap, "seed": seed, "method": method,
                       **run_method(method, data, (ev_valid, ev_test), args, cfg, seed, log),
                       "monitor": f"valid {ev_valid.monitor}", "candidates": cands, "candidates_clamped": clamped,
                       "seconds": round(time.time() - t0, 1), "data": data["stats"], "size": overrides(args),
                       "ft_epochs": args.ft_epochs, "patience": args.patience}
                with results.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                t = rec["test"]["popularity" if "popularity" in rec["test"] else next(iter(rec["test"]))]
                print(f"[recguru_table] overlap {overlap} seed {seed} {method}: test HR@10 {t['hr@10']:.4f} "
                      f"NDCG@10 {t['ndcg@10']:.4f} (epoch {rec['best_epoch']} of {rec['epochs_run']}) "
                      f"{rec['seconds']} s", flush=True)


# ---------------------------------------------------------------- the tables


def _values(res: list[dict], overlap: float, method: str, proto: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r["test"][proto][metric] for r in res
            if r["overlap"] == overlap and r["method"] == method and proto in r["test"]}


def _cell(v: dict[int, float]) -> tuple[str, float]:
    if not v:
        return "-", float("-inf")
    x = 100 * np.array(list(v.values()))
    return f"{x.mean():.2f} ± {x.std(ddof=1) if len(x) > 1 else 0:.2f}", float(x.mean())


def table2(res: list[dict], proto: str, overlaps: list[float]) -> list[str]:
    lines = []
    for o in overlaps:
        cols = [(m, name) for m, name in TABLE2 if _values(res, o, m, proto, "hr@10")]
        if not cols:
            continue
        seeds = max(len(_values(res, o, m, proto, "hr@10")) for m, _ in cols)
        lines += [f"Overlap {o:.0%} (seeds: {seeds})", "", "| Metric | " + " | ".join(n for _, n in cols) + " |",
                  "|---" * (len(cols) + 1) + "|"]
        for met in METRICS:
            cells = [_cell(_values(res, o, m, proto, met)) for m, _ in cols]
            top = max(c[1] for c in cells)
            lines.append(f"| {met.upper()} | "
                         + " | ".join(f"**{c[0]}**" if c[1] == top else c[0] for c in cells) + " |")
        epochs = [np.mean([r["best_epoch"] + 1 for r in res if r["overlap"] == o and r["method"] == m])
                  for m, _ in cols]
        lines += ["| selected epoch | " + " | ".join("-" if m == "pop" else f"{e:.1f}" for (m, _), e in
                                                     zip(cols, epochs)) + " |", ""]
    return lines


def table3(res: list[dict], proto: str, overlaps: list[float]) -> list[str]:
    cols = [(m, o, f"{name} {o:.0%}") for m, name in TABLE3 for o in overlaps if _values(res, o, m, proto, "hr@10")]
    if not cols:
        return []
    lines = ["| Metric | " + " | ".join(c[2] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for met in METRICS:
        lines.append(f"| {met.upper()} | " + " | ".join(_cell(_values(res, o, m, proto, met))[0]
                                                        for m, o, _ in cols) + " |")
    return lines + [""]


def ttests(res: list[dict], proto: str, overlaps: list[float]) -> list[str]:
    from scipy.stats import ttest_rel

    lines = ["| Overlap | metric | RecGURU | AutoRec | mean diff | t | p (two-sided) | pairs |", "|---" * 8 + "|"]
    for o in overlaps:
        for met in ("hr@10", "ndcg@10"):
            a, b = _values(res, o, "recguru", proto, met), _values(res, o, "autorec", proto, met)
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            x, y = 100 * np.array([a[s] for s in seeds]), 100 * np.array([b[s] for s in seeds])
            t, p = ttest_rel(x, y) if len(seeds) > 1 else (float("nan"), float("nan"))
            lines.append(f"| {o:.0%} | {met.upper()} | {x.mean():.2f} | {y.mean():.2f} | {(x - y).mean():+.2f} | "
                         f"{t:.2f} | {p:.3f} | {len(seeds)} |")
    return lines + [""]


def report(path: Path) -> str:
    res = load_results(path)
    if not res:
        raise SystemExit(f"{path}: no results yet")
    overlaps = sorted({r["overlap"] for r in res})
    protos = [p for p in PROTOCOLS if any(p in r["test"] for r in res)]
    first = res[0]
    cmd = path.with_name("command.txt")
    lines = ["# RecGURU on MovieLens-1M (target Comedy, source Drama)", "",
             f"Generated by `scripts/recguru_table.py --table` from `{path}`"
             + (f"; grid command: `{cmd.read_text().strip()}`" if cmd.exists() else "") + ".", "",
             f"Test metrics in % (mean ± std over seeds, ddof 1) at the epoch of the best validation "
             f"{first['monitor'].split('/')[-1].upper()} on the popularity-sampled candidates; pessimistic ties. "
             f"Sizes: `{' '.join(first.get('size', []))}`, {first.get('ft_epochs')} epochs (patience "
             f"{first.get('patience')}); users subsample {first['data'].get('users_subsample') or 'none'}.", ""]
    for p in protos:
        used = sorted({r["candidates"].get(p, p) for r in res})
        lines += [f"## Protocol `{', '.join(used)}`: {PROTOCOLS[p]}", "",
                  "### Table 2 shape (single-domain baselines vs RecGURU)", "", *table2(res, p, overlaps),
                  "### Table 3 shape (ablation: SeqRec, +Auto = AutoRec, +GURU = RecGURU)", "",
                  *table3(res, p, overlaps),
                  "### Paired t-test over seeds, RecGURU vs AutoRec (scipy.stats.ttest_rel)", "",
                  *ttests(res, p, overlaps)]
    clamped = {json.dumps(r["candidates_clamped"]) for r in res if r.get("candidates_clamped")}
    if clamped:
        lines += ["Candidate counts lowered (too few items left for some row): " + "; ".join(sorted(clamped)), ""]
    secs = {m: [r["seconds"] for r in res if r["method"] == m] for m in METHODS}
    lines += ["Runs: " + ", ".join(f"{m} {len(s)} (median {np.median(s):.0f} s)" for m, s in secs.items() if s)
              + f"; {sum(sum(s) for s in secs.values()) / 60:.0f} min in all.", ""]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/recguru_table")
    ap.add_argument("--table", default="", help="render the tables of this --out folder (or results.jsonl)")
    ap.add_argument("--doc", default="", help="--table: write the Markdown here (default <folder>/tables.md)")
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--overlaps", type=float, nargs="+", default=[0.0, 0.1, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--users", type=int, default=0, help="seeded subsample of this many users (0 = all)")
    ap.add_argument("--target-last", type=int, default=0,
                    help="keep each user's last N target-domain interactions: a sparse target (0 = all)")
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--batch-size", type=int, default=128, help="users per domain stream per iteration")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--adv-iterations", type=int, default=200, help="generator iterations (x6 with the critic's)")
    ap.add_argument("--ft-epochs", type=int, default=20, help="epochs of phase 3 and of SAS / BERT4Rec")
    ap.add_argument("--patience", type=int, default=5, help="epochs without a new best validation (0 = none)")
    ap.add_argument("--lr", type=float, default=1e-3, help="SAS / BERT4Rec Adam (dense and item rows)")
    ap.add_argument("--bert-negatives", type=int, default=100, help="BERT4Rec sampled-softmax negatives")
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides, e.g. model.adv_lr=1e-3")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="print each phase's time and end losses")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.table:
        path = Path(args.table)
        path = path / "results.jsonl" if path.is_dir() else path
        text = report(path)
        doc = Path(args.doc) if args.doc else path.with_name("tables.md")
        doc.write_text(text)
        print(text + f"\n[recguru_table] wrote {doc}")
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    given = argv if argv is not None else sys.argv[1:]
    (out / "command.txt").write_text("python scripts/recguru_table.py " + shlex.join(given) + "\n")
    run_grid(args, out)


if __name__ == "__main__":
    main()
