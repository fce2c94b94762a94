"""RecGURU's learning test on the synthetic two-domain world (spec sec. 9, item 15), in one process.

For each overlap rate and seed: a world (sparse target `a`, dense source `b`), the leave-one-out-per-
domain split, then RecGURU, AutoRec, SeqRec and the ablation (w_adv = 0, l2 off), each trained with
its program (xdtrain/models/recguru.py) through `local_iteration` and evaluated on domain `a` with
199 sampled negatives (uniform by default), pessimistic ties; the test metrics of the best validation HR@10
epoch are reported. RecGURU also reports the domain probe (logistic regression on h_a vs h_b, 70/30)
after phase 1 and after phase 2.

    python scripts/recguru_synthetic.py --overlaps 0.1 0.5 --seeds 0 1 2 --out runs/recguru_synthetic.json
    python scripts/recguru_synthetic.py --table runs/recguru_synthetic.json   # mean ± std, paired t-tests
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import pyarrow.dataset as pads
import torch

from xdtrain.data.recipes import InteractionsSource, LocalRecipe, RecipeConfig
from xdtrain.data.synthetic.two_domain import TwoDomainWorld, two_domain_world
from xdtrain.eval.candidates import prepare_candidates
from xdtrain.eval.evaluator import EvalConfig, evaluate
from xdtrain.models.recguru import RecGuru, RecGuruConfig
from xdtrain.nn.program import resolve_program
from xdtrain.nn.sparse import Rows
from xdtrain.ps import LocalPS
from xdtrain.train.datasets import eval_subset
from xdtrain.train.local_program import local_iteration, local_ps, random_batch, run_iterations, set_phase_lr_scales
from xdtrain.train.optimizers import OptimizerSet

RUNS = {"recguru": {}, "autorec": {"variant": "autorec"}, "seqrec": {"variant": "seqrec"},
        "no_adv_no_l2": {"w_adv": 0.0, "l2_form": "off"}}
DEFAULTS = dict(batch_size=128, epochs=1, patience=0, lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0)


def probe(model: RecGuru, ps: LocalPS, tables: dict, n: int, seed: int) -> float:
    """Test accuracy of a logistic regression telling h_a from h_b (balanced, 70/30 split)."""
    model.eval()
    hs = []
    with torch.no_grad():
        for k in (0, 1):
            b = model.make_batch(tables[f"domain.{model.domains[k]}"].slice(0, n), np.random.default_rng(0),
                                 stream=f"d{k}")
            ids = np.unique(b["enc"][b["enc"] >= 0].numpy())
            hs.append(model.encode(k, b["enc"], Rows(ids, ps.pull(model.table(k), ids))))
    model.train()
    x = torch.cat(hs)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.cat([torch.ones(len(hs[0])), torch.zeros(len(hs[1]))])
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
    cut = int(0.7 * len(x))
    tr, te = perm[:cut], perm[cut:]
    lin = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(lin(x[tr]).squeeze(-1), y[tr]).backward()
        opt.step()
    return float(((lin(x[te]).squeeze(-1) > 0).float() == y[te]).float().mean())


def run(world: tuple, seed: int, kw: dict, ft_epochs: int, report: dict, candidates: str) -> dict:
    out, tables = world
    torch.manual_seed(seed)
    model = RecGuru(RecGuruConfig(**kw), dict(out.valid.catalogue), {k: t.num_rows for k, t in tables.items()}, seed)
    ps = local_ps(model)
    prog = resolve_program(model, **DEFAULTS)
    opts = OptimizerSet(model, prog.optimizers)
    rng = np.random.default_rng(seed)
    valid, test = (eval_subset(s, [model.target]) for s in (out.valid, out.test))
    ec = EvalConfig(candidates=candidates, tie_policy="pessimistic", ks=[5, 10, 20])
    cands = {n: prepare_candidates(s, ec.spec()) for n, s in (("valid", valid), ("test", test))}

    def metrics(split: str) -> dict:
        s = valid if split == "valid" else test
        res = evaluate(model.scorer(s.rows, ps.pull), s, ec, cands[split]).summary()
        return res["overall"]["all"]

    best, losses = None, {}
    for ph in prog.phases:
        if ph.name == "finetune":
            set_phase_lr_scales(ps, ph)
            per_epoch = max(1, tables[prog.streams["target"].dataset].num_rows // prog.streams["target"].batch_size)
            for epoch in range(ft_epochs):
                for _ in range(per_epoch):
                    local_iteration(model, ps, opts, ph.steps[0], random_batch(model, prog, tables, rng, "target"))
                v = metrics("valid")
                if best is None or v["hr@10"] > best[0]["hr@10"]:
                    best = (v, metrics("test"), epoch)
            continue
        losses = run_iterations(model, ps, opts, prog, ph, tables, rng)
        if kw.get("variant", "recguru") == "recguru":
            report[f"probe_after_{ph.name}"] = probe(model, ps, tables, 300, seed)
            report[f"losses_end_{ph.name}"] = losses
    report.update(valid=best[0], test=best[1], best_epoch=best[2])
    return report


def table(results: list[dict]) -> str:
    """Markdown: test metrics (%) per overlap and run, mean ± std over seeds, the probe after phase 2;
    then RecGURU minus AutoRec and minus the ablation, paired over seeds (scipy.stats.ttest_rel)."""
    from scipy.stats import ttest_rel

    metrics = [f"{m}@{k}" for m in ("hr", "ndcg") for k in (5, 10, 20)]
    by = {}
    for r in results:
        by.setdefault((r["overlap"], r["run"]), {})[r["seed"]] = r
    lines = ["| overlap | run | seeds | " + " | ".join(m.upper() for m in metrics) + " | probe after ph. 2 |",
             "|---" * (len(metrics) + 4) + "|"]
    for (ov, run), rs in sorted(by.items()):
        cells = []
        for m in metrics:
            v = 100 * np.array([r["test"][m] for r in rs.values()])
            cells.append(f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f}")
        probes = [r["probe_after_adversarial"] for r in rs.values() if "probe_after_adversarial" in r]
        probe = f"{np.mean(probes):.2f}" if probes else "-"
        lines.append(f"| {ov:.0%} | {run} | {len(rs)} | " + " | ".join(cells) + f" | {probe} |")
    lines += ["", "| overlap | RecGURU minus | metric | per seed | mean | p (paired t) |", "|---|---|---|---|---|---|"]
    for ov in sorted({k[0] for k in by}):
        for other in ("autorec", "no_adv_no_l2"):
            a, b = by.get((ov, "recguru"), {}), by.get((ov, other), {})
            seeds = sorted(set(a) & set(b))
            for m in ("hr@10", "ndcg@10"):
                d = [100 * (a[s]["test"][m] - b[s]["test"][m]) for s in seeds]
                p = ttest_rel([a[s]["test"][m] for s in seeds], [b[s]["test"][m] for s in seeds]).pvalue \
                    if len(seeds) > 1 else float("nan")
                if seeds:
                    lines.append(f"| {ov:.0%} | {other} | {m.upper()} | {' / '.join(f'{x:+.2f}' for x in d)} | "
                                 f"{np.mean(d):+.2f} | {p:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overlaps", type=float, nargs="+", default=[0.0, 0.1, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", nargs="+", default=list(RUNS))
    ap.add_argument("--users-a", type=int, default=600)
    ap.add_argument("--users-b", type=int, default=6000)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--adv-iterations", type=int, default=200)
    ap.add_argument("--ft-epochs", type=int, default=20)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--candidates", default="uniform:199")  # popularity:199 needs 199+ items with train counts
    ap.add_argument("--out", default="")
    ap.add_argument("--set", nargs="*", default=[], help="model config overrides, e.g. adv_lr=1e-4 l2_form=mse")
    ap.add_argument("--threads", type=int, default=1)  # more intra-op threads are slower at these sizes
    ap.add_argument("--table", default="", help="print the Markdown tables of an --out file and stop")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return
    torch.set_num_threads(args.threads)
    base = dict(d=args.d, max_len=40, layers=1, heads=2, ffn=64, dropout=0.2, batch_size=128, job="all",
                pretrain_steps=args.pretrain_steps, adv_iterations=args.adv_iterations, domains=["a", "b"],
                target="a", adv_lr=1e-3, adv_item_scale=1.0)
    for kv in args.set:
        key, _, value = kv.partition("=")
        base[key] = type(getattr(RecGuruConfig, key))(value)
    results = []
    for overlap in args.overlaps:
        for seed in args.seeds:
            inter, _ = two_domain_world(TwoDomainWorld(users_a=args.users_a, users_b=args.users_b, overlap=overlap,
                                                       seed=seed))
            with tempfile.TemporaryDirectory() as tmp:
                out = LocalRecipe().prepare(InteractionsSource("world", inter), RecipeConfig(
                    name="leave_one_out_domain", streams=["by_domain", "overlap"]), tmp)
                tables = {k: pads.dataset(v.url).to_table() for k, v in out.streams.items()}
            for name in args.runs:
                t0 = time.time()
                r = run((out, tables), seed, {**base, **RUNS[name]}, args.ft_epochs,
                        {"overlap": overlap, "seed": seed, "run": name}, args.candidates)
                r["seconds"] = round(time.time() - t0, 1)
                print(json.dumps({k: v for k, v in r.items() if not k.startswith("losses")}), flush=True)
                results.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
