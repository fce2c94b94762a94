"""Popularity factors (PreRec sec. 3.1 / App. C): brute force, invariances (T3), no leakage (T4)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xdtrain.data.popularity import PopFactorsConfig, PopularityIndex, WindowPopularityScorer, days_of
from xdtrain.data.schemas import DataError

DAY = 86400


def _log(rng: np.random.Generator, n: int = 3000, n_days: int = 50, gap: tuple[int, int] | None = (20, 36)):
    """Two domains; domain 'a' has a silent stretch of days (for the widening rule)."""
    dom = rng.choice(["a", "b"], n, p=[0.7, 0.3])
    items = np.where(dom == "a", rng.integers(0, 40, n), rng.integers(100, 110, n))
    days = rng.integers(0, n_days, n)
    if gap is not None:
        days = np.where((dom == "a") & (days >= gap[0]) & (days < gap[1]), gap[0] - 1, days)
    ts = days * DAY + rng.integers(0, DAY, n)
    return pa.table({"user_id": rng.integers(0, 50, n), "item_id": items, "domain": dom, "timestamp": ts})


def _brute(table: pa.Table, cfg: PopFactorsConfig, cat: dict[str, np.ndarray], domain: str,
           items: np.ndarray, day: int) -> np.ndarray:
    """F straight from the definition, by scanning every interaction."""
    dom = np.asarray(table["domain"].to_pylist())
    it = table["item_id"].to_numpy()[dom == domain]
    dy = table["timestamp"].to_numpy()[dom == domain] // DAY
    W = cfg.window_days
    d = (day // W) * W if cfg.alignment == "interval" else day
    lo, hi = d - W, d
    if cfg.widen_empty and not ((dy >= lo) & (dy < hi)).any() and (dy < hi).any():
        lo = dy[dy < hi].max()
    sel = (dy >= lo) & (dy < hi)
    counts = np.array([(it[sel] == j).sum() for j in cat[domain]], dtype=np.float64)
    if counts.sum() == 0:
        return np.zeros((len(items), cfg.orders))
    used = counts if cfg.normaliser == "catalogue" else counts[counts > 0]
    w = np.arange(1, cfg.orders + 1)
    s = (np.power(used[:, None], w).sum(0) / len(used)) ** (1.0 / w)
    c = np.array([counts[list(cat[domain]).index(j)] for j in items])
    return c[:, None] / s[None, :]


CONFIGS = [
    PopFactorsConfig(),  # paper: previous interval, whole-catalogue normaliser
    PopFactorsConfig(alignment="sliding", normaliser="nonzero", widen_empty=True),  # authors' code
    PopFactorsConfig(alignment="sliding", window_days=7),
    PopFactorsConfig(alignment="interval", window_days=4, normaliser="nonzero"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.alignment}-{c.normaliser}-w{c.window_days}")
def test_factors_match_brute_force(cfg):
    rng = np.random.default_rng(0)
    table = _log(rng)
    cat = {"a": np.arange(0, 45), "b": np.arange(100, 112)}  # some catalogue items never interacted
    pop = PopularityIndex.from_table(table, cfg, {d: len(c) for d, c in cat.items()}, batch_rows=700)
    for domain in ("a", "b"):
        for day in (-3, 0, 1, 5, 14, 15, 16, 22, 30, 35, 36, 37, 49, 50, 64, 70, 200):
            got = pop.factors(domain, cat[domain], np.full(len(cat[domain]), day))
            want = _brute(table, cfg, cat, domain, cat[domain], day)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{domain} day {day}")


def test_t3_invariances_and_identity():
    rng = np.random.default_rng(1)
    table = _log(rng, gap=None)
    cfg = PopFactorsConfig(alignment="sliding")
    cat = np.arange(0, 45)
    days = np.arange(0, 60)
    base = PopularityIndex.from_table(table, cfg, {"a": 45, "b": 12})
    F = base.factors("a", cat[:, None], days[None, :])  # [items, days, 4]

    # (a) traffic volume: every interaction three times -> counts x3, F unchanged.
    tripled = PopularityIndex.from_table(pa.concat_tables([table] * 3), cfg, {"a": 45, "b": 12})
    np.testing.assert_allclose(tripled.factors("a", cat[:, None], days[None, :]), F, rtol=1e-6)

    # (b) catalogue size: a copy of every item (same counts, new ids), catalogue doubled -> F unchanged.
    a = table.filter(pa.compute.equal(table["domain"], "a"))
    copy = a.set_column(1, "item_id", pa.compute.add(a["item_id"], 1000))
    doubled = PopularityIndex.from_table(pa.concat_tables([a, copy]), cfg, {"a": 90})
    np.testing.assert_allclose(doubled.factors("a", cat[:, None], days[None, :]), F, rtol=1e-6)
    np.testing.assert_allclose(doubled.factors("a", cat[:, None] + 1000, days[None, :]), F, rtol=1e-6)

    # (c) (1/|J|) sum_j F_jw^w = 1 for every w, on days whose window has interactions.
    live = F.sum(axis=(0, 2)) > 0
    assert live.sum() > 40
    for w in range(1, 5):
        np.testing.assert_allclose((F[:, live, w - 1] ** w).sum(0) / 45, 1.0, rtol=1e-5)
    nz = PopularityIndex.from_table(table, PopFactorsConfig(alignment="sliding", normaliser="nonzero"))
    Fn = nz.factors("a", cat[:, None], days[None, :])
    for dd in np.nonzero(live)[0]:
        used = Fn[:, dd, 0] > 0
        for w in range(1, 5):
            assert (Fn[used, dd, w - 1] ** w).mean() == pytest.approx(1.0, rel=1e-5)

    # (d) zero count -> F = 0 (items 40..44 never occur; nothing is known before the first day).
    assert (F[40:] == 0).all() and (F[:, 0] == 0).all()
    c = base.counts("a", cat[:, None], days[None, :])
    assert ((F[..., 0] > 0) == (c > 0)).all()


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=["paper", "code"])
def test_scale_count_and_share_as_defined(cfg):
    """E3's alternatives to the power mean: raw window counts (Method A) and traffic shares (Method B),
    both repeated over the orders; shares sum to 1 over the window's items. The power mean is the default."""
    from dataclasses import replace

    assert PopFactorsConfig().scale == "power_mean"
    table = _log(np.random.default_rng(3))
    cat, days = np.arange(0, 45), np.arange(-2, 60)
    make = lambda scale: PopularityIndex.from_table(table, replace(cfg, scale=scale), {"a": 45, "b": 12})  # noqa: E731
    count, share = make("count"), make("share")
    c = count.counts("a", cat[:, None], days[None, :])
    np.testing.assert_array_equal(count.factors("a", cat[:, None], days[None, :]), np.repeat(c[..., None], 4, -1))
    F = share.factors("a", cat[:, None], days[None, :])
    live = c.sum(0) > 0
    np.testing.assert_allclose(F[:, live], (c[:, live] / c[:, live].sum(0))[..., None].repeat(4, -1), rtol=1e-6)
    assert (F[:, ~live] == 0).all()
    # the scale changes F, not the counts: the power-mean index of the same log gives today's F
    np.testing.assert_array_equal(make("power_mean").factors("a", cat, 30),
                                  PopularityIndex.from_table(table, cfg, {"a": 45, "b": 12}).factors("a", cat, 30))
    with pytest.raises(ValueError, match="scale"):
        PopFactorsConfig(scale="log")


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=["paper", "code", "sliding7"])
def test_t4_no_temporal_leakage(cfg):
    """F on day d must not change whatever happens on day d and later."""
    rng = np.random.default_rng(2)
    table = _log(rng, gap=None)
    pop = PopularityIndex.from_table(table, cfg, {"a": 45, "b": 12})
    ts = table["timestamp"].to_numpy()
    for d in (10, 17, 30, 31):
        keep = table.filter(pa.array(ts < d * DAY))
        n = 500  # a burst of interactions on days d.. d + 5 on a few items, and everything else dropped
        future = pa.table({"user_id": np.zeros(n, np.int64), "item_id": rng.integers(0, 3, n),
                           "domain": ["a"] * n, "timestamp": (d + rng.integers(0, 5, n)) * DAY})
        mutated = PopularityIndex.from_table(pa.concat_tables([keep, future]), cfg, {"a": 45, "b": 12})
        for dom in ("a", "b"):
            items = np.arange(0, 45) if dom == "a" else np.arange(100, 112)
            np.testing.assert_array_equal(mutated.factors(dom, items, d), pop.factors(dom, items, d))
        # ... while the day after the burst does see it (the test can fail)
        assert not np.array_equal(mutated.factors("a", np.arange(3), d + 20), pop.factors("a", np.arange(3), d + 20))


def test_widening_reaches_back_to_the_last_active_day():
    t = pa.table({"user_id": [0, 0, 0, 0], "item_id": [1, 1, 2, 3], "domain": ["x"] * 4,
                  "timestamp": np.array([0, 0, 0, 3], np.int64) * DAY})
    code = PopularityIndex.from_table(t, PopFactorsConfig(alignment="sliding", window_days=2, widen_empty=True,
                                                          normaliser="nonzero"))
    plain = PopularityIndex.from_table(t, PopFactorsConfig(alignment="sliding", window_days=2))
    # day 3: window [1, 3) is empty -> widened to [0, 3): counts 2, 1 for items 1, 2
    np.testing.assert_array_equal(code.counts("x", [1, 2, 3], 3), [2, 1, 0])
    np.testing.assert_array_equal(plain.counts("x", [1, 2, 3], 3), [0, 0, 0])
    # day 10: long after the data -> the last active day (3): only item 3
    np.testing.assert_array_equal(code.counts("x", [1, 2, 3], 10), [0, 0, 1])
    assert code.factors("x", [3], 10)[0].tolist() == [1.0, 1.0, 1.0, 1.0]
    # the first day of data has no earlier day: F = 0
    assert (code.factors("x", [1, 2], 0) == 0).all()


def test_labels_strings_and_persistence(tmp_path):
    t = pa.table({"user_id": ["u1", "u2", "u3", "u4"], "item_id": ["i1", "i1", "i2", "i1"],
                  "domain": ["x"] * 4, "timestamp": [0.5, 10.0, 20.0, 30.0], "label": [1, 1, 1, 0]})
    pop = PopularityIndex.from_table(t, PopFactorsConfig(alignment="sliding"))
    from xdtrain.data.schemas import hash_ids

    ids = hash_ids(["i1", "i2"])
    np.testing.assert_array_equal(pop.counts("x", ids, 1), [2, 1])  # the label-0 row is not counted
    pop.save(tmp_path / "pop.parquet")
    back = PopularityIndex.load(tmp_path / "pop.parquet")
    np.testing.assert_array_equal(back.factors("x", ids, 1), pop.factors("x", ids, 1))
    assert back.catalogue_sizes == {"x": 2}
    # parquet streaming gives the same index
    pq.write_table(t, tmp_path / "inter.parquet", row_group_size=2)
    again = PopularityIndex.from_parquet(str(tmp_path / "inter.parquet"), PopFactorsConfig(alignment="sliding"))
    np.testing.assert_array_equal(again.factors("x", ids, 1), pop.factors("x", ids, 1))
    assert days_of(np.array([-1, 0, 86399, 86400])).tolist() == [-1, 0, 0, 1]


def test_bad_input_is_named():
    t = pa.table({"item_id": [1], "domain": ["x"], "timestamp": [None]}, schema=pa.schema(
        [("item_id", pa.int64()), ("domain", pa.string()), ("timestamp", pa.int64())]))
    with pytest.raises(DataError, match="my_log.*'timestamp' has 1 null"):
        PopularityIndex.from_table(t, where="my_log")
    with pytest.raises(DataError, match="missing column 'domain'"):
        PopularityIndex.from_table(pa.table({"item_id": [1], "timestamp": [0]}))
    with pytest.raises(DataError, match="catalogue size 1"):
        PopularityIndex.from_table(pa.table({"item_id": [1, 2], "domain": ["x", "x"], "timestamp": [0, 0]}),
                                   catalogue_sizes={"x": 1})


def test_pop_scorer_ranks_by_window_count():
    import torch

    t = pa.table({"item_id": [1, 1, 2, 3, 3, 3], "domain": ["x"] * 6, "timestamp": np.array([0, 1, 1, 5, 5, 5]) * DAY})
    pop = PopularityIndex.from_table(t, PopFactorsConfig(alignment="sliding", window_days=3))
    s = WindowPopularityScorer(pop)({"timestamp": torch.tensor([2 * DAY, 6 * DAY])}, torch.tensor([1, 2, 3]),
                                    domain="x")
    assert s.tolist() == [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
