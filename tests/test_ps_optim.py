"""Server-side optimizers against torch's own, on the in-process backend and on real Ray shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xdtrain.ps.local import LocalPS
from xdtrain.ps.optim import OptimizerSpec
from xdtrain.ps.table import TableSpec

N, D, STEPS = 40, 6, 12


@pytest.fixture(scope="module")
def ray_ps(ray_cluster):
    from xdtrain.ps.client import PSClient

    ps = PSClient(2)
    yield ps
    ps.close()


@pytest.fixture(params=["local", "ray"])
def ps(request):
    if request.param == "local":
        return LocalPS(num_shards=2)
    return request.getfixturevalue("ray_ps")


def _stream(seed: int, all_rows: bool):
    """STEPS batches of (ids with repeats, grads); every id appears in every batch if all_rows."""
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        if all_rows:
            ids = np.concatenate([rng.permutation(N), rng.integers(0, N, 10)])
        else:
            ids = rng.integers(0, N, 25)
        yield ids.astype(np.int64), rng.standard_normal((len(ids), D)).astype(np.float32)


def _summed(ids: np.ndarray, g: np.ndarray) -> torch.Tensor:
    return torch.zeros(N, D).index_add_(0, torch.from_numpy(ids), torch.from_numpy(g))


def _run_ps(ps, spec: TableSpec, seed: int, all_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ps.create_table(spec)
    init = ps.pull(spec.name, np.arange(N)).clone()
    for ids, g in _stream(seed, all_rows):
        ps.push(spec.name, ids, g)
    return init, ps.pull(spec.name, np.arange(N))


def _torch_dense(opt_cls, init: torch.Tensor, seed: int, all_rows: bool, **kw) -> torch.Tensor:
    w = torch.nn.Parameter(init.clone())
    opt = opt_cls([w], **kw)
    for ids, g in _stream(seed, all_rows):
        w.grad = _summed(ids, g)
        opt.step()
    return w.detach()


def test_sgd_matches_torch(ps):
    spec = TableSpec("opt_sgd", D, optimizer=OptimizerSpec("sgd", lr=0.05))
    init, got = _run_ps(ps, spec, seed=1, all_rows=False)
    ref = _torch_dense(torch.optim.SGD, init, 1, False, lr=0.05)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert not torch.equal(got, init)


def test_adagrad_matches_torch(ps):
    # rows a batch misses get a zero gradient, which leaves dense Adagrad's row and state unchanged
    spec = TableSpec(
        "opt_adagrad", D, optimizer=OptimizerSpec("adagrad", lr=0.1, initial_accumulator_value=0.1)
    )
    init, got = _run_ps(ps, spec, seed=2, all_rows=False)
    ref = _torch_dense(torch.optim.Adagrad, init, 2, False, lr=0.1, initial_accumulator_value=0.1)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_rowwise_adagrad_matches_reference(ps):
    lr, eps = 0.1, 1e-8
    spec = TableSpec("opt_rowwise", D, optimizer=OptimizerSpec("rowwise_adagrad", lr=lr))
    init, got = _run_ps(ps, spec, seed=3, all_rows=False)
    w, acc = init.clone(), torch.zeros(N)
    for ids, g in _stream(3, False):  # FBGEMM exact row-wise Adagrad, written out per row
        gs = _summed(ids, g)
        for r in np.unique(ids):
            acc[r] += (gs[r] * gs[r]).mean()
            w[r] -= lr * gs[r] / (acc[r].sqrt() + eps)
    torch.testing.assert_close(got, w, atol=1e-6, rtol=0)


def test_adam_matches_sparse_adam_when_all_rows_touched(ps):
    spec = TableSpec("opt_adam_all", D, optimizer=OptimizerSpec("adam", lr=0.01))
    init, got = _run_ps(ps, spec, seed=4, all_rows=True)
    w = torch.nn.Parameter(init.clone())
    opt = torch.optim.SparseAdam([w], lr=0.01)
    for ids, g in _stream(4, True):
        w.grad = _summed(ids, g).to_sparse()
        opt.step()
    torch.testing.assert_close(got, w.detach(), atol=1e-6, rtol=0)


def test_lazy_adam_counts_steps_per_row(ps):
    # one torch SparseAdam per row, stepped only when its row is in the batch = per-row step counts
    spec = TableSpec("opt_adam_lazy", D, optimizer=OptimizerSpec("adam", lr=0.01))
    init, got = _run_ps(ps, spec, seed=5, all_rows=False)
    params = [torch.nn.Parameter(init[r : r + 1].clone()) for r in range(N)]
    opts = [torch.optim.SparseAdam([p], lr=0.01) for p in params]
    for ids, g in _stream(5, False):
        gs = _summed(ids, g)
        for r in np.unique(ids):
            params[r].grad = gs[r : r + 1].to_sparse()
            opts[r].step()
    ref = torch.cat([p.detach() for p in params])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    # and it differs from a global step counter (SparseAdam on the whole table)
    w = torch.nn.Parameter(init.clone())
    opt = torch.optim.SparseAdam([w], lr=0.01)
    for ids, g in _stream(5, False):
        w.grad = _summed(ids, g).to_sparse()
        opt.step()
    assert (got - w.detach()).abs().max() > 1e-4


def test_float16_rows_are_updated_in_float32():
    ps = LocalPS()
    ps.create_table(TableSpec("h", 4, dtype="float16", init="zeros", optimizer=OptimizerSpec("sgd", lr=1.0)))
    ps.push("h", [1, 1], torch.full((2, 4), 0.25))
    out = ps.pull("h", [1])
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.full((1, 4), -0.5))
