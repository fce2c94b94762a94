"""Ranking evaluation of an engine model: validation during training and the final test report.

Sampled candidates are drawn once per split (seeded), so every validation ranks the same
negatives. A model is reached only through its `scorer(rows, pull)` (the model contract).
"""

from __future__ import annotations

from pathlib import Path

import torch

from xdtrain.eval.baselines import baseline_scorer
from xdtrain.eval.candidates import EvalSet, prepare_candidates
from xdtrain.eval.evaluator import EvalConfig, evaluate
from xdtrain.eval.report import EvalResult, write_report
from xdtrain.nn.sparse import Pull
from xdtrain.train.config import EvalSection


class RankingEval:
    """One eval split under every configured candidate mode."""

    def __init__(self, data: EvalSet, cfg: EvalSection, ks: list[int] | None = None) -> None:
        self.data, self.cfg = data, cfg
        self.configs = [EvalConfig(candidates=c, ks=list(ks or cfg.ks), seed=cfg.seed, user_batch=cfg.batch_size)
                        for c in cfg.candidates]
        self.candidates = [prepare_candidates(data, c.spec()) for c in self.configs]

    @property
    def monitor(self) -> str:
        return f"{self.cfg.candidates[0]}/{self.cfg.monitor}"

    def results(self, scorer) -> dict[str, EvalResult]:
        with torch.no_grad():
            return {c.candidates: evaluate(scorer, self.data, c, cand)
                    for c, cand in zip(self.configs, self.candidates)}

    def flat(self, scorer) -> dict[str, float]:
        """{"full/ndcg@10": ..., ...} over all rows."""
        out = {}
        for mode, res in self.results(scorer).items():
            overall = res.summary()["overall"]["all"]
            out.update({f"{mode}/{k}": float(v) for k, v in overall.items() if k != "count"})
        return out

    def model_metrics(self, model: torch.nn.Module, pull: Pull) -> dict[str, float]:
        was = model.training
        model.eval()
        try:
            return self.flat(model.scorer(self.data.rows, pull))
        finally:
            model.train(was)


def test_report(model: torch.nn.Module, pull: Pull, data: EvalSet, cfg: EvalSection, out_dir: str | Path,
                name: str = "model") -> dict:
    """Score the model and the configured baselines on `data`; write one report per (scorer, mode).
    Returns {scorer: {mode: summary}}."""
    ev = RankingEval(data, cfg, ks=sorted(set(cfg.ks) | {10, 20}))
    model.eval()
    scorers = {name: model.scorer(data.rows, pull)}
    scorers.update({b: baseline_scorer(b, data, cfg.seed) for b in cfg.baselines})
    out: dict = {}
    for sname, scorer in scorers.items():
        out[sname] = {}
        for mode, res in ev.results(scorer).items():
            write_report(res, str(Path(out_dir) / f"{sname}_{mode.replace(':', '')}"))
            out[sname][mode] = res.summary()
    return out
