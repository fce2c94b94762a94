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
from xdtrain.models import ModelData
from xdtrain.nn.sparse import Pull
from xdtrain.text.cache import ItemVectors, TextEncodeConfig, side_table_vectors
from xdtrain.train.config import EvalSection


class RankingEval:
    """One eval split under every configured candidate mode."""

    def __init__(self, data: EvalSet, cfg: EvalSection, ks: list[int] | None = None, keep_rows: bool = False) -> None:
        self.data, self.cfg = data, cfg
        self.configs = [EvalConfig(candidates=c, ks=list(ks or cfg.ks), seed=cfg.seed, user_batch=cfg.batch_size,
                                   tie_policy=cfg.tie_policy, pop_exponent=cfg.pop_exponent,
                                   k_percents=list(cfg.k_percents), rndcg_a=cfg.rndcg_a, rndcg_b=cfg.rndcg_b,
                                   groups=list(cfg.groups), keep_rows=keep_rows)
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
                name: str = "model", model_data: ModelData | None = None, text_cache: str = "") -> dict:
    """Score the model and the configured baselines on `data`; write one report per (scorer, mode).
    The `sbert` baseline reads item texts from `model_data`'s `items` table, through the text cache
    `cfg.text_cache`, else `text_cache` (the model's, to share its vectors), else <cache_dir>/text.
    Returns {scorer: {mode: summary}}."""
    ev = RankingEval(data, cfg, ks=sorted(set(cfg.ks) | {10, 20}), keep_rows=cfg.keep_rows)
    model.eval()
    text = baseline_text(cfg, model_data, text_cache) if "sbert" in cfg.baselines else None
    scorers = {name: model.scorer(data.rows, pull)}
    scorers.update({b: baseline_scorer(b, data, cfg.seed, text) for b in cfg.baselines})
    out: dict = {}
    for sname, scorer in scorers.items():
        out[sname] = {}
        for mode, res in ev.results(scorer).items():
            write_report(res, str(Path(out_dir) / f"{sname}_{mode.replace(':', '')}"))
            out[sname][mode] = res.summary()
    return out


def baseline_text(cfg: EvalSection, model_data: ModelData | None, text_cache: str = "") -> ItemVectors:
    """Item text vectors for the text baselines (see `test_report`)."""
    if model_data is None:
        raise ValueError("eval.baselines: 'sbert' needs the job's data (ModelData with an 'items' table)")
    cache = cfg.text_cache or text_cache or f"{model_data.extras.get('cache_dir', 'runs/cache')}/text"
    return side_table_vectors(model_data.tables, TextEncodeConfig(model=cfg.text_model, cache_dir=cache),
                              who="eval.baselines 'sbert'")


def summarize_tests(tests: dict) -> dict:
    """metrics.json's view of a `test_report`: `test` {scorer: {mode: metrics over all rows}}, and
    `test_groups` {scorer: {mode: {group: metrics}}} when eval.groups breaks the rows down."""
    out = {"test": {s: {mode: r["overall"]["all"] for mode, r in modes.items()} for s, modes in tests.items()}}
    if any(len(r["overall"]) > 1 for modes in tests.values() for r in modes.values()):
        out["test_groups"] = {s: {mode: r["overall"] for mode, r in modes.items()} for s, modes in tests.items()}
    return out
