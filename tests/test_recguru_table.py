"""scripts/recguru_table.py on the shipped MovieLens-1M files at a tiny size: every method writes its
line, the epoch is selected on validation, a rerun resumes, the tables render, and the sampled
candidates fall back to the largest feasible N."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from scripts import recguru_table as rt
from xdtrain.data.schemas import DataError
from xdtrain.eval.candidates import CandidateSpec, sample_candidates

TINY = ["--overlaps", "0.1", "--seeds", "0", "--users", "300", "--d", "16", "--max-len", "20", "--ffn", "32",
        "--batch-size", "64", "--pretrain-steps", "3", "--adv-iterations", "2", "--ft-epochs", "2",
        "--bert-negatives", "20"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("recguru_table")
    rt.main(["--out", str(out), *TINY])
    return out


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_every_method_writes_its_metrics_at_the_validation_selected_epoch(grid):
    recs = records(grid)
    assert sorted(r["method"] for r in recs) == sorted(rt.METHODS)
    for r in recs:
        assert (r["overlap"], r["seed"]) == (0.1, 0), r["method"]
        assert r["candidates"] == {"popularity": "popularity:199", "uniform": "uniform:199", "full": "full"}
        assert r["candidates_clamped"] == {}
        for split in ("valid", "test"):
            assert set(r[split]) == {"popularity", "uniform", "full"}, r["method"]
            for proto in r[split].values():
                assert set(rt.METRICS) <= set(proto), r["method"]
                assert all(0.0 <= proto[m] <= 1.0 for m in rt.METRICS), r["method"]
        hist = r["valid_history"]
        # the first epoch with the best validation HR@10 (popularity-sampled) is the one reported
        assert r["best_epoch"] == int(np.argmax(hist)), r["method"]
        assert r["valid"]["popularity"]["hr@10"] == pytest.approx(hist[r["best_epoch"]], abs=1e-6)
        assert r["monitor"] == "valid popularity:199/hr@10"
        if r["method"] != "pop":
            assert len(hist) == r["epochs_run"] == 2, r["method"]
        assert r["data"]["valid_rows"] == r["data"]["test_rows"] > 100
    by = {r["method"]: r for r in recs}
    assert set(by["recguru"]["losses_end"]) == {"pretrain", "adversarial", "finetune"}
    assert "l2" in by["recguru"]["losses_end"]["adversarial"]  # 10% overlap: the overlapped users' tie ran
    assert set(by["autorec"]["losses_end"]) == {"pretrain", "finetune"}
    assert set(by["seqrec"]["losses_end"]) == {"finetune"}
    assert by["sasrec"]["model"]["backbone"] == "sasrec" and by["bert4rec"]["model"]["backbone"] == "bert4rec"
    # one split, one set of candidates: POP scores the same whichever run it is next to
    assert by["pop"]["test"]["full"]["hr@10"] > 0


def test_a_rerun_skips_finished_runs_and_drops_an_unfinished_line(grid, capsys):
    path = grid / "results.jsonl"
    before = path.read_text()
    with path.open("a") as f:
        f.write('{"overlap": 0.1, "seed": 0, "meth')  # a run killed while writing its line
    rt.main(["--out", str(grid), *TINY])
    assert path.read_text() == before
    assert capsys.readouterr().out.splitlines() == [f"[recguru_table] {path}: dropping an unfinished last line"]


def test_table_mode_renders_tables_2_and_3_and_the_t_test(grid, capsys):
    rt.main(["--table", str(grid)])
    out = capsys.readouterr().out
    md = (grid / "tables.md").read_text()
    assert md in out
    for proto in ("popularity:199", "uniform:199", "full"):
        assert f"## Protocol `{proto}`" in md
    assert md.count("| Metric | POP | SAS | BERT4Rec | AutoRec | RecGURU |") == 3
    assert md.count("| Metric | SeqRec 10% | +Auto 10% | +GURU 10% |") == 3
    assert md.count("Overlap 10% (seeds: 1)") == 3
    for metric in ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20"):
        assert sum(line.startswith(f"| {metric} |") for line in md.splitlines()) == 6  # tables 2 and 3, x3
    assert md.count("| 10% | HR@10 |") == 3 and md.count("| 10% | NDCG@10 |") == 3
    pop = next(r for r in records(grid) if r["method"] == "pop")["test"]["popularity"]["ndcg@10"]
    assert f"{100 * pop:.2f} ± 0.00" in md


def test_sampled_candidates_fall_back_to_the_largest_feasible_count(tmp_path):
    rt.main(["--out", str(tmp_path), *TINY, "--methods", "pop",
             "--set", "eval.candidates=[popularity:5000,uniform:150,full]"])
    (rec,) = records(tmp_path)
    used = int(rec["candidates"]["popularity"].split(":")[1])
    assert rec["candidates_clamped"] == {"popularity": {"asked": 5000, "used": used}}
    assert rec["candidates"]["uniform"] == "uniform:150" and 150 < used < rec["data"]["target_items"]
    # `used` is exactly the largest N every row of both splits can draw
    cfg = rt.load_config(rt.EngineConfig, rt.CONFIG, rt.overrides(rt.parser().parse_args(TINY)))
    data = rt.build_data(rt.interactions(cfg), cfg, 0.1, 0, 300)
    fails = 0
    for split in ("valid", "test"):
        sample_candidates(data[split], CandidateSpec("popularity", used))
        try:
            sample_candidates(data[split], CandidateSpec("popularity", used + 1))
        except DataError as e:
            assert "left to sample" in str(e)
            fails += 1
    assert fails >= 1


def test_thin_target_keeps_each_users_latest_target_items_only():
    inter = pa.table({"user_id": [1, 1, 1, 1, 2, 2, 1], "item_id": [10, 11, 12, 13, 10, 14, 90],
                      "domain": ["T", "T", "T", "T", "T", "T", "S"], "timestamp": [5, 1, 9, 3, 2, 8, 0]})
    out = rt.thin_target(inter, "T", 2)
    got = sorted(zip(out["user_id"].to_pylist(), out["item_id"].to_pylist()))
    assert got == [(1, 10), (1, 12), (1, 90), (2, 10), (2, 14)]  # user 1's two latest (t 9, 5), the source kept
