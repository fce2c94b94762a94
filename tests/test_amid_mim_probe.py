"""scripts/amid_mim_probe.py measures what it says: its oracle groups are exactly the planted interest
clusters, and its group statistics read a model's eq. 4 groups (docs/amid.md, "Where the MIM loses")."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from xdtrain.data.amid_rows import AmidDataConfig, domain_catalogues, rows_from_logs
from xdtrain.data.synthetic.open_world import OpenWorld, open_world
from xdtrain.models.amid import Amid, AmidConfig
from xdtrain.models.amid_local import MODEL_F
from xdtrain.train.local_program import local_ps

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "amid_mim_probe.py"


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("amid_mim_probe", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def world_rows():
    w = OpenWorld(users=600, overlap=0.3, seed=2)
    rows = rows_from_logs(open_world(w), AmidDataConfig(w.domains, k_u=0.25, seed=2))
    return w, rows, domain_catalogues([rows.D, rows.valid, rows.test], w.domains)


def test_oracle_groups_are_exactly_the_planted_clusters(probe, world_rows):
    w, rows, cat = world_rows
    cfg = AmidConfig(**{**MODEL_F, **probe.VARIANTS["mim oracle"]})
    model = probe.OracleGroups(w, cfg, list(w.domains), cat, 0)
    stats = probe.group_stats(model, local_ps(model), w, rows.test)
    assert stats["same | grouped"] == 1.0 and stats["same | not grouped"] == 0.0
    assert stats["grouped share"] == pytest.approx(stats["same, base rate"])
    assert 0.05 < stats["same, base rate"] < 0.5  # 8 clusters: mostly not shared


def test_group_stats_read_the_models_own_threshold(probe, world_rows):
    w, rows, cat = world_rows
    for k, share in ((-2.0, 1.0), (2.0, 0.0)):  # every cosine passes / none does
        model = Amid(AmidConfig(**{**MODEL_F, **probe.VARIANTS["mim"], "mim_k": k}), list(w.domains), cat, 0)
        assert probe.group_stats(model, local_ps(model), w, rows.test)["grouped share"] == share
