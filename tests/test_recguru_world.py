"""RecGURU's learning test (spec sec. 9 item 15) on the synthetic two-domain world, slow: the runs of
scripts/recguru_synthetic.py at the settings recorded in docs/results/recguru.md (3 seeds, 1,000
generator iterations at the paper's adv lr; about 85 min on one core for 10% and 50% overlap).

What holds there is asserted; the spec's criteria that did not hold are expected failures (not
strict) carrying the measured numbers. The fast checks of every mechanism are in tests/test_recguru.py.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from scripts import recguru_synthetic

SEEDS = (0, 1, 2)
SETTINGS = ["--users-a", "600", "--users-b", "3000", "--pretrain-steps", "200", "--adv-iterations", "1000",
            "--ft-epochs", "15", "--candidates", "uniform:99", "--set", "adv_lr=1e-4"]

pytestmark = pytest.mark.slow


@functools.cache
def results(overlap: float, runs: tuple[str, ...]) -> dict[tuple[str, int], dict]:
    """{(run, seed): record} of one overlap rate (cached across the tests of a session)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "out.json")
        recguru_synthetic.main(["--overlaps", str(overlap), "--seeds", *map(str, SEEDS), "--runs", *runs,
                                *SETTINGS, "--out", str(out)])
        recs = json.loads(out.read_text())
    return {(r["run"], r["seed"]): r for r in recs}


def gain(overlap: float, metric: str, other: str) -> float:
    """Mean over seeds of RecGURU minus `other` on the test `metric`, in points."""
    res = results(overlap, ("recguru", "autorec", "no_adv_no_l2", "seqrec"))
    return float(np.mean([100 * (res["recguru", s]["test"][metric] - res[other, s]["test"][metric]) for s in SEEDS]))


@pytest.mark.parametrize("overlap", [0.1, 0.5])
def test_recguru_beats_seqrec_by_far(overlap):
    for m in ("hr@10", "ndcg@10"):
        assert gain(overlap, m, "seqrec") >= 1.0  # measured +27..+30 HR@10, +38..+43 NDCG@10


def test_recguru_beats_autorec_on_hr10_at_10pct_overlap():
    assert gain(0.1, "hr@10", "autorec") >= 1.0  # measured +1.89 (3 of 3 seeds, paired p 0.016)


@pytest.mark.xfail(strict=False, reason="measured NDCG@10 +0.93 at 10%, HR@10 +2.44 / NDCG@10 +0.59 at 50% "
                                        "(p 0.20 / 0.56): under the 1-point margin or not significant")
def test_recguru_beats_autorec_by_a_point_on_both_metrics_at_both_overlaps():
    for overlap in (0.1, 0.5):
        for m in ("hr@10", "ndcg@10"):
            assert gain(overlap, m, "autorec") >= 1.0, (overlap, m)


def test_the_domain_probe_falls_after_phase_2():
    res = results(0.1, ("recguru", "autorec", "no_adv_no_l2", "seqrec"))
    probes = [res["recguru", s]["probe_after_adversarial"] for s in SEEDS]
    ablation = [res["no_adv_no_l2", s]["probe_after_adversarial"] for s in SEEDS]
    assert max(probes) < 0.8 <= min(ablation)  # measured 0.70 / 0.69 / 0.73 vs 0.99-1.00 without the adversary


@pytest.mark.xfail(strict=False, reason="measured probe 0.71 (10%) and 0.69 (50%) after 1,000 generator iterations")
def test_the_domain_probe_reaches_the_specs_bound():
    for overlap in (0.1, 0.5):
        res = results(overlap, ("recguru", "autorec", "no_adv_no_l2", "seqrec"))
        assert np.mean([res["recguru", s]["probe_after_adversarial"] for s in SEEDS]) <= 0.60


@pytest.mark.xfail(strict=False, reason="measured: the ablation (w_adv 0, l2 off) is 2.2 (10%) and 3.0 (50%) "
                                        "NDCG@10 points ABOVE RecGURU (p 0.07 / 0.09), HR@10 even")
def test_the_adversary_and_the_l2_tie_are_what_helps():
    for overlap in (0.1, 0.5):
        assert gain(overlap, "ndcg@10", "no_adv_no_l2") > 0, overlap
