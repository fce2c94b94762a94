"""PS pieces of transfer: lr scale per table, partial restore (kept / new tables, fresh or kept
optimizer state), import from Parquet, and a shard recovery that replays all three."""

from __future__ import annotations

import os
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from xdtrain.data.schemas import DataError
from xdtrain.ps import CheckpointError, LocalPS, OptimizerSpec, TableSpec, read_export

N, D, STEPS, SCALE = 30, 5, 10, 0.37


def _stream(seed: int):
    """STEPS batches of (ids with repeats covering every row, grads)."""
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        ids = np.concatenate([rng.permutation(N), rng.integers(0, N, 8)]).astype(np.int64)
        yield ids, rng.standard_normal((len(ids), D)).astype(np.float32)


def _summed(ids: np.ndarray, g: np.ndarray) -> torch.Tensor:
    return torch.zeros(N, D).index_add_(0, torch.from_numpy(ids), torch.from_numpy(g))


def _rowwise_adagrad(lr: float, eps: float = 1e-8):
    """FBGEMM's exact row-wise Adagrad as a torch optimizer (torch has none), for the reference."""

    class RowwiseAdagrad(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    acc = self.state[p].setdefault("acc", torch.zeros(p.shape[0]))
                    acc += (p.grad * p.grad).mean(dim=1)
                    p -= group["lr"] * p.grad / (acc.sqrt() + eps)[:, None]

    return RowwiseAdagrad


TORCH = {  # name -> (reference optimizer class over the whole table, its kwargs, grads as sparse)
    "sgd": (torch.optim.SGD, {}, False),
    "adagrad": (torch.optim.Adagrad, {"initial_accumulator_value": 0.1}, False),
    "rowwise_adagrad": (None, {}, False),
    "adam": (torch.optim.SparseAdam, {}, True),
}


@pytest.mark.parametrize("name", list(TORCH))
def test_lr_scale_matches_torch_with_lr_times_scale(name):
    """Half the pushes at scale 1, then SCALE: torch with lr, then lr * SCALE, gives the same rows."""
    lr = 0.05
    extra = {"initial_accumulator_value": 0.1} if name == "adagrad" else {}
    ps = LocalPS(num_shards=2)
    ps.create_table(TableSpec("t", D, optimizer=OptimizerSpec(name, lr=lr, **extra)))
    init = ps.pull("t", np.arange(N)).clone()
    cls, kw, sparse = TORCH[name]
    w = torch.nn.Parameter(init.clone())
    opt = (cls or _rowwise_adagrad(lr))([w], **({"lr": lr} if cls else {}), **kw)
    for i, (ids, g) in enumerate(_stream(7)):
        if i == STEPS // 2:
            ps.set_lr_scale("t", SCALE)
            for group in opt.param_groups:
                group["lr"] = lr * SCALE
        ps.push("t", ids, g)
        grad = _summed(ids, g)
        w.grad = grad.to_sparse() if sparse else grad
        opt.step()
    assert ps.lr_scale("t") == SCALE
    torch.testing.assert_close(ps.pull("t", np.arange(N)), w.detach(), atol=1e-6, rtol=0)
    # and the scale mattered: the same pushes at scale 1 end elsewhere
    plain = LocalPS(num_shards=2)
    plain.create_table(TableSpec("t", D, optimizer=OptimizerSpec(name, lr=lr, **extra)))
    for ids, g in _stream(7):
        plain.push("t", ids, g)
    assert (plain.pull("t", np.arange(N)) - w.detach()).abs().max() > 1e-4


def test_lr_scale_is_checked_and_survives_checkpoint_restore_and_reshard(tmp_path):
    spec = TableSpec("t", D, optimizer=OptimizerSpec("adam", lr=0.05))
    ps = LocalPS(num_shards=2)
    ps.create_table(spec)
    with pytest.raises(ValueError, match="table 't': lr scale must be a finite number >= 0"):
        ps.set_lr_scale("t", -1.0)
    with pytest.raises(KeyError, match="no PS table 'nope'"):
        ps.set_lr_scale("nope", 1.0)
    ps.set_lr_scale("t", SCALE)
    batches = list(_stream(3))
    for ids, g in batches[:4]:
        ps.push("t", ids, g)
    url = str(tmp_path / "ck")
    ps.checkpoint(url)
    back = LocalPS.from_checkpoint(url, num_shards=3)
    assert back.lr_scale("t") == SCALE
    ps.reshard(3)  # the new shard gets the scale too
    for ids, g in batches[4:]:
        ps.push("t", ids, g)
        back.push("t", ids, g)
    assert torch.equal(back.pull("t", np.arange(N)), ps.pull("t", np.arange(N)))
    fresh = LocalPS(num_shards=1)
    fresh.restore(url, optimizer_state=False)  # a new optimizer: its scale starts at 1 too
    assert fresh.lr_scale("t") == 1.0


def _pretrained(tmp_path, shards: int = 2) -> tuple[LocalPS, str]:
    """A PS with tables a (adam), c (sgd) trained a little, checkpointed."""
    ps = LocalPS(num_shards=shards)
    ps.create_table(TableSpec("a", D, optimizer=OptimizerSpec("adam", lr=0.05)))
    ps.create_table(TableSpec("c", 3, optimizer=OptimizerSpec("sgd", lr=0.1)))
    for ids, g in _stream(11):
        ps.push("a", ids, g)
        ps.push("c", ids, g[:, :3])
    url = str(tmp_path / "pre")
    ps.checkpoint(url)
    return ps, url


def test_partial_restore_keeps_a_creates_b_drops_c_and_honours_the_optimizer_choice(tmp_path):
    pre, url = _pretrained(tmp_path)
    ids = np.arange(N)
    rows_a = pre.pull("a", ids).clone()
    new_b = TableSpec("b", 4, init="uniform", init_scale=0.1, seed=3)
    g = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    after: dict[bool, torch.Tensor] = {}
    for kept in (True, False):
        ps = LocalPS(num_shards=3)
        ps.create_table(TableSpec("a", D, optimizer=OptimizerSpec("adam", lr=0.05)))
        ps.create_table(new_b)
        ps.restore(url, tables=["a"], optimizer_state=kept)
        assert ps.tables() == ["a", "b"]  # c dropped
        assert torch.equal(ps.pull("a", ids), rows_a)
        assert ps.num_rows("b") == 0
        blank = LocalPS()
        blank.create_table(new_b)
        assert torch.equal(ps.pull("b", ids), blank.pull("b", ids))  # b: fresh from its spec
        ps.push("a", ids, g)
        after[kept] = ps.pull("a", ids)
    pre.push("a", ids, g)  # kept state: the step the pre-training PS itself would take
    torch.testing.assert_close(after[True], pre.pull("a", ids), atol=0, rtol=0)
    w = torch.nn.Parameter(rows_a.clone())  # fresh state: a first Adam step from these rows
    opt = torch.optim.SparseAdam([w], lr=0.05)
    w.grad = torch.from_numpy(g).to_sparse()
    opt.step()
    torch.testing.assert_close(after[False], w.detach(), atol=1e-6, rtol=0)
    assert (after[True] - after[False]).abs().max() > 1e-3  # the choice changes the first update


def test_restore_takes_the_declared_spec_and_refuses_what_cannot_carry_over(tmp_path):
    _, url = _pretrained(tmp_path)
    ps = LocalPS(num_shards=2)
    ps.create_table(TableSpec("a", D, optimizer=OptimizerSpec("adam", lr=0.001)))  # a new lr
    ps.restore(url, tables=["a"])
    assert ps.spec("a").optimizer.lr == 0.001
    with pytest.raises(CheckpointError, match=r"tables \['zz'\] are not in the checkpoint"):
        ps.restore(url, tables=["zz"])
    other = LocalPS()
    other.create_table(TableSpec("a", D + 1))
    with pytest.raises(CheckpointError, match="table 'a' has dim 5 in the checkpoint, 6 declared"):
        other.restore(url)
    switched = LocalPS()
    switched.create_table(TableSpec("a", D, optimizer=OptimizerSpec("rowwise_adagrad", lr=0.1)))
    with pytest.raises(CheckpointError, match="cannot keep the optimizer state of 'adam' for 'rowwise_adagrad'"):
        switched.restore(url, tables=["a"])
    switched.restore(url, tables=["a"], optimizer_state=False)  # a new optimizer starts fresh
    assert switched.spec("a").optimizer.name == "rowwise_adagrad" and switched.num_rows("a") == N


def test_import_round_trips_an_export_exactly_onto_another_shard_count(tmp_path):
    pre, _ = _pretrained(tmp_path)
    url = str(tmp_path / "exp")
    pre.export("a", url)
    ps = LocalPS(num_shards=3)
    ps.create_table(TableSpec("a", D, optimizer=OptimizerSpec("adam", lr=0.05)))
    assert ps.import_table("a", url) == N
    assert torch.equal(ps.pull("a", np.arange(N)), pre.pull("a", np.arange(N)))
    again = str(tmp_path / "exp2")
    ps.export("a", again)
    a, b = read_export(url).sort_by("id"), read_export(again).sort_by("id")
    assert a.equals(b)
    # imported rows start with fresh optimizer state: the next push is a first Adam step
    g = np.ones((N, D), dtype=np.float32)
    ps.push("a", np.arange(N), g)
    step = ps.shards[0].tables["a"].state["step"][: ps.shards[0].tables["a"].n]
    assert (step == 1).all()


def test_import_from_any_parquet_overwrites_rows_and_admits_new_ids(tmp_path):
    ps = LocalPS(num_shards=2)
    ps.create_table(TableSpec("t", 3, min_count=2))
    ps.pull("t", [5])  # pending admission: 1 of 2 sightings
    path = tmp_path / "v.parquet"
    vecs = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    pq.write_table(pa.table({"key": pa.array([5, 9], pa.int32()), "emb": pa.array(vecs, pa.list_(pa.float64()))}),
                   path)
    assert ps.import_table("t", str(path), id_column="key", vector_column="emb") == 2
    assert ps.pull("t", [9, 5]).tolist() == [vecs[1], vecs[0]]  # admitted by the import, not by sightings
    assert ps.num_rows("t") == 2


def _bad(tmp_path, name: str, table: pa.Table) -> str:
    path = tmp_path / f"{name}.parquet"
    pq.write_table(table, path)
    return str(path)


@pytest.mark.parametrize("case, match", [
    ("dim", r"bad\.parquet: column 'vector' row 1 has 2 values, the table has dim 3"),
    ("null_vector", r"column 'vector' row 1 is null"),
    ("null_value", r"column 'vector' row 1 has a null value"),
    ("nan", r"column 'vector' row 0 has a NaN or infinite value"),
    ("null_id", r"column 'id' row 1 is null"),
    ("dup", r"column 'id': id 4 appears more than once"),
    ("no_column", r"no column 'vector'"),
    ("float_id", r"column 'id' must hold integer ids"),
])
def test_import_names_file_column_and_row_of_bad_input(tmp_path, case, match):
    f = pa.list_(pa.float32())
    tables = {
        "dim": pa.table({"id": [1, 2], "vector": pa.array([[1, 2, 3], [1, 2]], f)}),
        "null_vector": pa.table({"id": [1, 2], "vector": pa.array([[1, 2, 3], None], f)}),
        "null_value": pa.table({"id": [1, 2], "vector": pa.array([[1, 2, 3], [1, None, 3]], f)}),
        "nan": pa.table({"id": [1, 2], "vector": pa.array([[1, float("nan"), 3], [1, 2, 3]], f)}),
        "null_id": pa.table({"id": pa.array([1, None], pa.int64()), "vector": pa.array([[1, 2, 3]] * 2, f)}),
        "dup": pa.table({"id": [4, 4], "vector": pa.array([[1, 2, 3]] * 2, f)}),
        "no_column": pa.table({"id": [1], "vec": pa.array([[1, 2, 3]], f)}),
        "float_id": pa.table({"id": [1.5], "vector": pa.array([[1, 2, 3]], f)}),
    }
    ps = LocalPS()
    ps.create_table(TableSpec("t", 3))
    with pytest.raises(DataError, match=match):
        ps.import_table("t", _bad(tmp_path, "bad", tables[case]))
    with pytest.raises(DataError, match="no such file or directory"):
        ps.import_table("t", str(tmp_path / "missing"))


@pytest.mark.ray
def test_ray_shard_recovery_replays_partial_restore_lr_scale_and_import(ray_cluster, tmp_path):
    """A shard killed after a fresh-state partial restore, an import and an lr-scale change comes
    back bit-identical to the in-process PS that saw the same calls."""
    from xdtrain.ps.client import PSClient

    pre, url = _pretrained(tmp_path)
    exp = str(tmp_path / "exp")
    pre.export("c", exp)
    specs = [TableSpec("a", D, optimizer=OptimizerSpec("adam", lr=0.05)),
             TableSpec("c", 3, optimizer=OptimizerSpec("rowwise_adagrad", lr=0.1))]
    ps, ref = PSClient(2, max_restarts=2), LocalPS(1)
    ids = np.arange(N)
    batches = list(_stream(5))
    for c in (ps, ref):
        for spec in specs:
            c.create_table(spec)
        c.restore(url, tables=["a"], optimizer_state=False)
        c.push("a", *batches[0])
        c.import_table("c", exp)
        c.set_lr_scale("a", SCALE)
        c.push("a", *batches[1])
    os.kill(ps.shard_pids()[1], signal.SIGKILL)
    for c in (ps, ref):
        for b in batches[2:]:
            c.push("a", *b)
            c.push("c", b[0], b[1][:, :3])
    for table in ("a", "c"):
        assert torch.equal(ps.pull(table, ids), ref.pull(table, ids)), table
    assert ps.stats(shards=False)["events"]["shard_recovered"] == 1
    ps.close()
