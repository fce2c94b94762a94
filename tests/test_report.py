"""Run reports: curves.jsonl + metrics.json -> PNG plots, curves.csv and an HTML page.

The hand-written run below restarted once (attempt 1 re-logs steps 5 and 6 with other values,
and continues on one worker), so every check also proves the last record per step wins.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from xdtrain.report import (
    ReportError,
    load_curves,
    main,
    phase_spans,
    plot_loss,
    plot_throughput,
    plot_valid,
    render_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train(step, loss, attempt=0, workers=2, epoch=None):
    return {
        "kind": "train",
        "step": step,
        "epoch": (step - 1) // 4 if epoch is None else epoch,
        "loss": loss,
        "samples_per_s": 100.0 * workers,
        "ps_rows_per_s": 1000.0 * workers,
        "time_s": step * 0.5,
        "workers": workers,
        "attempt": attempt,
    }


RECORDS = (
    [train(s, 1.0 / s) for s in range(1, 7)]
    + [{"kind": "valid", "step": 4, "epoch": 0, "full/ndcg@10": 0.10, "full/hit@10": 0.20}]
    + [train(5, 0.55, attempt=1, workers=1), train(6, 0.45, attempt=1, workers=1)]  # after the restart
    + [train(s, 1.0 / s, attempt=1, workers=1) for s in (7, 8)]
    + [{"kind": "valid", "step": 8, "epoch": 1, "full/ndcg@10": 0.30, "full/hit@10": 0.50}]
)
SUMMARY = {
    "job": "pretrain",
    "wall_seconds": 12.5,
    "best": {"full": {"ndcg@10": 0.3, "hit@10": 0.5}},
    "config": {"train": {"lr": 0.001, "workers": [1, 2]}, "note": "<b>not bold</b>"},
    "history": [{"epoch": 0, "ndcg@10": 0.1}, {"epoch": 1, "ndcg@10": 0.3}],
}


def make_run(tmp_path: Path, records=RECORDS, summary=SUMMARY) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(summary))
    (run / "curves.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_last_record_per_step_wins_and_order_is_kind_then_step(tmp_path):
    records = load_curves(make_run(tmp_path) / "curves.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("train", s) for s in range(1, 9)] + [
        ("valid", 4),
        ("valid", 8),
    ]
    by_step = {r["step"]: r for r in records if r["kind"] == "train"}
    assert (by_step[5]["loss"], by_step[5]["attempt"], by_step[4]["attempt"]) == (0.55, 1, 0)


def test_render_writes_plots_csv_and_html(tmp_path):
    run = make_run(tmp_path)
    written = render_report(str(run))
    assert written == {
        "loss": str(run / "loss.png"),
        "valid": str(run / "valid.png"),
        "throughput": str(run / "throughput.png"),
        "csv": str(run / "curves.csv"),
        "html": str(run / "report.html"),
    }
    for name in ("loss", "valid", "throughput"):
        data = Path(written[name]).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert not [p for p in os.listdir(run) if ".tmp-" in p]  # atomic writes leave no temporaries

    rows = list(csv.DictReader(open(run / "curves.csv")))
    assert list(rows[0])[:3] == ["kind", "step", "epoch"]
    assert [(r["kind"], int(r["step"])) for r in rows] == [("train", s) for s in range(1, 9)] + [
        ("valid", 4),
        ("valid", 8),
    ]
    assert float(rows[5]["loss"]) == 0.45 and rows[5]["workers"] == "1"  # step 6 after the restart
    assert rows[9]["full/ndcg@10"] == "0.3" and rows[9]["loss"] == ""

    page = (run / "report.html").read_text()
    for src in ("loss.png", "valid.png", "throughput.png"):
        assert f"<img src='{src}'" in page  # relative: the run directory can be moved or served as is
    best = "<h3>best</h3><table><thead><tr><th>key</th><th>value</th></tr></thead><tbody>"
    assert best + "<tr><td>full.ndcg@10</td><td>0.3</td>" in page  # a section per nested dict, flattened
    assert "<td>wall_seconds</td><td>12.5</td>" in page
    assert "<th>epoch</th><th>ndcg@10</th>" in page and "<td>1</td><td>0.3</td>" in page  # list of dicts
    assert "<td>train.workers</td><td>[1, 2]</td>" in page
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page and "<b>not bold</b>" not in page
    assert "<td>attempts</td><td>2</td>" in page


def test_plots_show_the_deduplicated_curves(tmp_path):
    records = load_curves(make_run(tmp_path) / "curves.jsonl")
    tr = [r for r in records if r["kind"] == "train"]
    va = [r for r in records if r["kind"] == "valid"]
    fig = plot_loss(tr, tmp_path / "l.png")
    assert len(fig.axes) == 1 and not fig.axes[0].patches  # no named losses, no phases: as before
    loss_ax = fig.axes[0]
    x, y = loss_ax.lines[0].get_data()
    assert list(x) == list(range(1, 9)) and list(y) == [1.0, 0.5, 1 / 3, 0.25, 0.55, 0.45, 1 / 7, 0.125]
    assert [line.get_xdata()[0] for line in loss_ax.lines[1:]] == [5]  # one restart marker, at step 5
    valid_ax = plot_valid(va, tmp_path / "v.png").axes[0]
    assert [line.get_label() for line in valid_ax.lines] == ["full/ndcg@10", "full/hit@10"]
    assert list(valid_ax.lines[1].get_ydata()) == [0.2, 0.5]
    top, bottom = plot_throughput(tr, tmp_path / "t.png").axes[:2]
    assert list(top.lines[0].get_ydata()) == [200.0] * 4 + [100.0] * 4
    assert list(bottom.lines[0].get_ydata()) == [2000.0] * 4 + [1000.0] * 4


def gan(step, phase, attempt=0):
    """A train record of a model with named losses and phases (a WGAN: critic, generator, penalty)."""
    losses = {"critic": -step / 10, "gen": 1.0 / step, "gp": 0.01 * step}
    return {**train(step, sum(losses.values()), attempt=attempt), "losses": losses, "phase": phase}


GAN = [gan(s, "critic") for s in (1, 2, 3)] + [gan(4, "gen"), gan(5, "critic"), gan(6, "critic", attempt=1)]


def test_named_losses_get_a_curve_each_and_phases_are_shaded(tmp_path):
    run = make_run(tmp_path, records=GAN + [gan(6, "gen", attempt=1)], summary={"job": "pretrain"})
    written = render_report(str(run))
    assert Path(written["loss"]).read_bytes().startswith(PNG_MAGIC)
    train_records = [r for r in load_curves(run / "curves.jsonl") if r["kind"] == "train"]
    assert train_records[-1]["losses"] == {"critic": -0.6, "gen": 1 / 6, "gp": 0.06}  # the last step 6 wins
    fig = plot_loss(train_records, tmp_path / "l.png")
    total, named = fig.axes
    assert list(total.lines[0].get_ydata()) == [r["loss"] for r in train_records]
    assert [line.get_label() for line in named.lines[:3]] == ["critic", "gen", "gp"]
    assert list(named.lines[1].get_ydata()) == [1 / s for s in range(1, 7)]
    assert [line.get_xdata()[0] for line in named.lines[3:]] == [6]  # the restart, on both panels
    # critic for steps 0-3, gen 3-4, critic 4-5, gen 5-6: a span starts where the record before ended
    assert phase_spans(train_records) == [("critic", 0, 3), ("gen", 3, 4), ("critic", 4, 5), ("gen", 5, 6)]
    assert len(total.patches) == len(named.patches) == 4
    assert [t.get_text() for t in total.get_legend().get_texts()] == ["phase critic", "phase gen"]
    assert "shaded: phases" in total.get_title()

    rows = list(csv.DictReader(open(run / "curves.csv")))
    assert [c for c in rows[0] if c.startswith("losses.")] == ["losses.critic", "losses.gen", "losses.gp"]
    assert float(rows[3]["losses.gen"]) == 0.25 and rows[3]["phase"] == "gen"
    page = (run / "report.html").read_text()
    assert "<td>named losses</td><td>critic, gen, gp</td>" in page and "<td>phases</td><td>critic, gen</td>" in page


def test_losses_without_phases_and_records_without_losses_mix(tmp_path):
    records = [train(1, 0.9), {k: v for k, v in gan(2, "x").items() if k != "phase"}]
    fig = plot_loss(load_curves(make_run(tmp_path, records=records) / "curves.jsonl"), tmp_path / "l.png")
    assert [line.get_label() for line in fig.axes[1].lines] == ["critic", "gen", "gp"]
    assert list(fig.axes[1].lines[0].get_xdata()) == [2]  # the record without losses adds no point
    assert not fig.axes[0].patches and fig.axes[0].get_legend() is None


def test_train_only_run_has_no_validation_plot(tmp_path):
    run = make_run(tmp_path, records=[train(1, 0.9), train(2, 0.8)], summary={"job": "pretrain"})
    written = render_report(str(run))
    assert "valid" not in written and not (run / "valid.png").exists()
    page = (run / "report.html").read_text()
    assert "<h3>Validation metrics</h3><p>No records to plot.</p>" in page


@pytest.mark.parametrize(
    "lines,message",
    [
        ([], r"curves.jsonl: no train or valid records"),
        (["", "  "], r"curves.jsonl: no train or valid records"),
        (
            [json.dumps(train(1, 0.5)), '{"kind": "train", "step": 2,'],
            r"curves.jsonl: line 2: not valid JSON",
        ),
        (["[1, 2]"], r"curves.jsonl: line 1: expected a JSON object, got list"),
        (
            [json.dumps(train(1, 0.5)), "", json.dumps({**train(3, 0.5), "loss": "nan?"})],
            r"curves.jsonl: line 3: 'loss' must be a number, got 'nan\?'",
        ),
        ([json.dumps({**train(1, 0.5), "step": 1.5})], r"line 1: 'step' must be an integer >= 0, got 1.5"),
        (
            [json.dumps({**train(1, 0.5), "kind": None})],
            r"line 1: 'kind' must be one of \['train', 'valid'\]",
        ),
        ([json.dumps({"kind": "train", "step": 1, "epoch": 0})], r"line 1: train record without 'loss'"),
        ([json.dumps({"kind": "valid", "step": 1, "epoch": 0})], r"line 1: valid record without any metric"),
        ([json.dumps({**gan(1, "a"), "losses": {"gp": "x"}})], r"line 1: 'losses' must map names to numbers"),
        ([json.dumps({**gan(1, "a"), "losses": [0.5]})], r"line 1: 'losses' must map names to numbers"),
        ([json.dumps({**gan(1, "a"), "phase": 3})], r"line 1: 'phase' must be a string, got 3"),
    ],
)
def test_bad_curves_name_the_file_and_line(tmp_path, lines, message):
    run = make_run(tmp_path)
    (run / "curves.jsonl").write_text("\n".join(lines))
    with pytest.raises(ReportError, match=message):
        render_report(str(run))
    assert not (run / "report.html").exists()  # nothing is written from bad input


def test_unknown_record_kinds_are_skipped(tmp_path):
    run = make_run(tmp_path, records=[train(1, 0.5), {"kind": "checkpoint", "step": 1, "path": "x"}])
    assert [r["kind"] for r in load_curves(run / "curves.jsonl")] == ["train"]


def test_bad_run_directory_or_summary(tmp_path):
    with pytest.raises(ReportError, match=r"nope: no such run directory"):
        render_report(str(tmp_path / "nope"))
    run = make_run(tmp_path)
    (run / "curves.jsonl").unlink()
    with pytest.raises(ReportError, match=r"curves.jsonl: no such file"):
        render_report(str(run))
    (run / "metrics.json").write_text('{"job": "pretrain",\n "x": }')
    with pytest.raises(ReportError, match=r"metrics.json: line 2: not valid JSON"):
        render_report(str(run))
    (run / "metrics.json").write_text("[]")
    with pytest.raises(ReportError, match=r"metrics.json: expected a JSON object, got list"):
        render_report(str(run))
    (run / "metrics.json").unlink()
    with pytest.raises(ReportError, match=r"metrics.json: no such file"):
        render_report(str(run))


def test_main_prints_paths_or_one_error_line(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert f"report: {run / 'report.html'}" in out and str(run / "loss.png") in out
    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"xdtrain report: {tmp_path / 'missing'}: no such run directory"
    assert main([]) == 2 and "usage: xdtrain report <run_dir>" in capsys.readouterr().err
    assert main(["--help"]) == 0
