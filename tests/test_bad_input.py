"""The bad-input catalogue (README, "Reliability"): each bad input or config value stops the real job
entry point with one line naming the file (column, row) or key, exit code 2, before Ray starts;
string ids are hashed at ingestion; exact duplicate rows follow `data.duplicates`. All fast, no Ray."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_recipes import interactions_table

from jobs import pretrain
from xdtrain.data.schemas import DataError, hash_ids
from xdtrain.train.config import DataConfig
from xdtrain.train.datasets import prepare_data


def write(folder: Path, table: pa.Table, name: str = "part-0.parquet") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / name, row_group_size=100)
    return folder / name


def nulls_in_item_id(d: Path) -> str:
    t = interactions_table()
    items = t["item_id"].to_pylist()
    items[3] = None
    write(d, t.set_column(1, "item_id", pa.array(items, pa.int64())))
    return r"part-0\.parquet \(row group 0\): column 'item_id' has 1 null value\(s\) \(first at row 3\)"


def string_timestamps(d: Path) -> str:
    t = interactions_table()
    write(d, t.set_column(3, "timestamp", t["timestamp"].cast(pa.string())))
    return r"part-0\.parquet: column 'timestamp' has type string, expected int or float for interactions"


def zero_bytes(d: Path) -> str:
    write(d, interactions_table())
    (d / "part-1.parquet").write_bytes(b"")
    return r"part-1\.parquet: empty file \(0 bytes\), not a Parquet file"


def truncated_footer(d: Path) -> str:
    path = write(d, interactions_table())
    path.write_bytes(path.read_bytes()[:-20])
    return r"part-0\.parquet: unreadable Parquet file \("


def corrupted_page(d: Path) -> str:
    path = write(d, interactions_table())
    data = bytearray(path.read_bytes())
    page = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data[page + 20 : page + 50] = b"\xff" * 30  # the footer stays intact
    path.write_bytes(bytes(data))
    return r"part-0\.parquet \(row group 1\): unreadable row group \("


def readme_in_folder(d: Path) -> str:
    write(d, interactions_table())
    (d / "README.txt").write_text("where this log came from")
    return r"README\.txt: not a Parquet file"


def empty_file(d: Path) -> str:
    write(d, interactions_table().slice(0, 0))
    return r": empty dataset, 1 Parquet file\(s\) but zero rows"


def missing_column(d: Path) -> str:
    write(d, interactions_table().drop_columns(["domain"]))
    return r"part-0\.parquet: missing required column 'domain' for interactions"


def duplicates_refused(d: Path) -> str:
    t = interactions_table()
    write(d, pa.concat_tables([t, t.slice(5, 1)]))
    return rf"1 exact duplicate row\(s\), the first at .*part-0\.parquet row {t.num_rows} \(data\.duplicates=error"


BAD_DATA = [nulls_in_item_id, string_timestamps, zero_bytes, truncated_footer, corrupted_page, readme_in_folder,
            empty_file, missing_column, duplicates_refused]


def run_job(tmp_path: Path, *overrides: str) -> int:
    return pretrain.main([f"run_dir={tmp_path / 'run'}", "data.source=parquet",
                          f"data.interactions_url={tmp_path / 'log'}", *overrides])


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("make", BAD_DATA, ids=lambda f: f.__name__)
def test_each_bad_input_gets_one_line_and_exit_2(tmp_path, capsys, make):
    pattern = make(tmp_path / "log")
    rc = run_job(tmp_path, "data.duplicates=error")
    err = one_line(capsys)
    assert rc == 2 and err.startswith("xdtrain pretrain: DataError: "), err
    assert re.search(pattern, err), err
    assert not (tmp_path / "run" / "train").exists()  # stopped before any training


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=-5", "train.batch_size must be >= 1, got -5"),
    ("train.lr=-0.1", "train.lr must be >= 0, got -0.1"),
    ("train.epochs=-1", "train.epochs must be >= 0, got -1"),
    ("train.beta2=1.0", "train.beta2 must be in [0,1), got 1.0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1, got 0"),
    ("data.rows_per_group=0", "data.rows_per_group must be >= 1, got 0"),
    ("eval.ks=[10,0]", "eval.ks must be >= 1, got [10, 0]"),
    ("data.duplicates=merge", "key 'data.duplicates' must be one of ['drop', 'keep', 'error'], got 'merge'"),
    # Legal for a program whose phases run a number of iterations; the default one counts epochs.
    ("train.epochs=0", "model 'seqrec' cannot train with train.epochs=0"),
])
def test_out_of_range_config_values_name_the_key(tmp_path, capsys, override, message):
    write(tmp_path / "log", interactions_table())
    assert run_job(tmp_path, override) == 2
    err = one_line(capsys)
    assert re.match(r"xdtrain pretrain: (ConfigError|config error): ", err) and message in err, err


def test_string_ids_are_hashed_at_ingestion(tmp_path):
    t = interactions_table()
    users, items = (pa.array([f"u{v}" for v in t[c].to_pylist()]) for c in ("user_id", "item_id"))
    write(tmp_path / "log", t.set_column(0, "user_id", users).set_column(1, "item_id", items))
    data = prepare_data(DataConfig(source="parquet", interactions_url=str(tmp_path / "log")), tmp_path / "run")
    assert set(data.model_data.item_ids.tolist()) == set(hash_ids(items).tolist())
    assert set(data.test.rows["user_id"].to_pylist()) <= set(hash_ids(users).tolist())
    side = pq.read_table(data.model_data.tables["interactions"])  # models read the hashed rows too
    assert side.schema.field("user_id").type == pa.int64() and side.num_rows == t.num_rows


def eval_rows(data) -> list[tuple]:
    return sorted(zip(*(data.test.rows[c].to_pylist() for c in ("user_id", "item_id"))))


def test_duplicates_are_dropped_with_a_warning_by_default(tmp_path, capsys):
    t = interactions_table()
    write(tmp_path / "log", t)
    write(tmp_path / "doubled", pa.concat_tables([t, t]))
    once = prepare_data(DataConfig(source="parquet", interactions_url=str(tmp_path / "log")), tmp_path / "r1")
    assert once.stats["duplicates"] == 0 and "duplicate" not in capsys.readouterr().err
    twice = prepare_data(DataConfig(source="parquet", interactions_url=str(tmp_path / "doubled")), tmp_path / "r2")
    err = capsys.readouterr().err
    assert f"dropped {t.num_rows} exact duplicate interaction(s) of {2 * t.num_rows}" in err
    assert twice.stats["duplicates"] == t.num_rows and twice.stats["interactions"] == t.num_rows
    assert eval_rows(twice) == eval_rows(once)  # the doubled log no longer leaks test targets into valid
    assert pq.read_table(twice.model_data.tables["interactions"]).num_rows == t.num_rows


def test_duplicates_keep_counts_and_keeps_them(tmp_path, capsys):
    t = interactions_table()
    write(tmp_path / "doubled", pa.concat_tables([t, t]))
    kept = prepare_data(DataConfig(source="parquet", interactions_url=str(tmp_path / "doubled"), duplicates="keep"),
                        tmp_path / "r")
    assert kept.stats["duplicates"] == t.num_rows and kept.stats["interactions"] == 2 * t.num_rows
    assert "dropped" not in capsys.readouterr().err


def test_duplicates_error_names_file_and_row(tmp_path):
    t = interactions_table()
    write(tmp_path / "log", t, "part-0.parquet")
    write(tmp_path / "log", t.slice(7, 2), "part-1.parquet")  # repeats rows 7 and 8 of part-0
    with pytest.raises(DataError, match=r"2 exact duplicate row\(s\), the first at .*part-1\.parquet row 0 "):
        prepare_data(DataConfig(source="parquet", interactions_url=str(tmp_path / "log"), duplicates="error"),
                     tmp_path / "r")


def test_rows_differing_in_one_column_are_not_duplicates(tmp_path):
    t = interactions_table()
    later = t.set_column(3, "timestamp", pa.array(t["timestamp"].to_numpy() + 1))
    write(tmp_path / "log", pa.concat_tables([t, later]))
    data = prepare_data(DataConfig(source="parquet", interactions_url=str(tmp_path / "log"), duplicates="error"),
                        tmp_path / "r")
    assert data.stats["duplicates"] == 0 and data.stats["interactions"] == 2 * t.num_rows
