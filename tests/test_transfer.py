"""Transfer (issue 17, item 3): fine-tuning from a checkpoint with an added head and an added PS
table, the fresh / kept optimizer-state choice (dense and PS), the `transfer:` config, and the
`export` hook with scoring from exported vectors. In-process PS, hand-written steps."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from xdtrain.config import ConfigError, load_config
from xdtrain.eval.candidates import EvalSet
from xdtrain.eval.evaluator import EvalConfig, evaluate, user_batch
from xdtrain.eval.exported import export_scorer
from xdtrain.models.seqrec import SeqRec, SeqRecConfig
from xdtrain.nn.program import OptimSpec
from xdtrain.nn.sparse import pull_rows, push_grads
from xdtrain.ps import LocalPS, OptimizerSpec, TableSpec, read_export
from xdtrain.train import checkpointing as ck
from xdtrain.train.config import EngineConfig, TransferConfig
from xdtrain.train.optimizers import OptimizerSet
from xdtrain.train.transfer import export_embeddings, table_modes, transfer_dense, transfer_ps

CFG = SeqRecConfig(d=8, max_len=10, layers=1, dropout=0.0, item_lr=0.01)
LR = 1e-2


def _data():
    rng = np.random.default_rng(0)
    catalogue = np.sort(rng.choice(10_000, 40, replace=False)).astype(np.int64)
    seqs = [list(rng.choice(catalogue, n)) for n in (12, 5, 9, 3, 8, 6)]
    return catalogue, pa.table({"user_id": np.arange(6), "items": pa.array(seqs, pa.list_(pa.int64()))})


class TaggedSeqRec(SeqRec):
    """SeqRec plus what a fine-tuning task adds: a new dense head and a new PS table ("tag")."""

    def __init__(self, cfg: SeqRecConfig, item_ids: np.ndarray) -> None:
        super().__init__(cfg, item_ids)
        self.head = nn.Linear(cfg.d, cfg.d)

    def sparse_tables(self) -> list[TableSpec]:
        return [*super().sparse_tables(), TableSpec("tag", self.cfg.d, optimizer=OptimizerSpec("adam", lr=0.01))]

    def make_batch(self, rows: pa.Table, rng: np.random.Generator) -> dict:
        batch = super().make_batch(rows, rng)
        batch["tag"] = torch.from_numpy(rows["user_id"].to_numpy() % 3)
        return batch

    def sparse_ids(self, batch: dict) -> dict:
        return {**super().sparse_ids(batch), "tag": batch["tag"]}

    def forward(self, batch: dict, emb: dict) -> torch.Tensor:
        return super().forward(batch, emb) + self.head(emb["tag"](batch["tag"])).pow(2).mean()


def _ps(model) -> LocalPS:
    ps = LocalPS(2)
    for spec in model.sparse_tables():
        ps.create_table(spec)
    return ps


def _step(model, ps, opt, rows, seed: int) -> float:
    batch = model.make_batch(rows, np.random.default_rng(seed))
    emb = pull_rows(ps, model.sparse_ids(batch))
    loss = model(batch, emb)
    opt.zero_grad()
    loss.backward()
    push_grads(ps, emb)
    opt.step()
    return float(loss)


def _optimizers(model, lr: float = LR) -> OptimizerSet:
    """The engine's optimizers of a model without a program: one Adam over every parameter."""
    return OptimizerSet(model, {"main": OptimSpec(lr=lr, betas=(0.9, 0.999), weight_decay=0.0)})


@pytest.fixture()
def pretrained(tmp_path):
    """A SeqRec trained 3 steps (dense Adam and PS Adam with state), checkpointed as the engine does."""
    catalogue, rows = _data()
    torch.manual_seed(0)
    model = SeqRec(CFG, catalogue)
    ps = _ps(model)
    opts = _optimizers(model)
    opt = opts["main"].opt
    for seed in range(3):
        _step(model, ps, opt, rows, seed)
    d = tmp_path / "checkpoint_000000003_a000"
    ck.save_rank0(d, ck.EngineState(step=3), model, opts)
    ps.checkpoint(ck.ps_url(d))
    return d, model, opt, ps


def test_fine_tuning_with_an_added_head_and_an_added_table(pretrained):
    d, pre, _, pre_ps = pretrained
    catalogue, rows = _data()
    torch.manual_seed(1)
    model = TaggedSeqRec(CFG, catalogue)
    head0 = copy.deepcopy(model.head.state_dict())
    opts = _optimizers(model)
    opt = opts["main"].opt
    ps = LocalPS(3)
    report = transfer_ps(ps, ck.ps_url(d), model.sparse_tables(), TransferConfig())
    assert (report.loaded, report.new, report.dropped) == (["item"], ["tag"], [])
    dense = transfer_dense(d, model, opts, TransferConfig())
    assert dense["dense"].new == ["head.weight", "head.bias"] and not dense["dense"].dropped
    assert set(dense) == {"dense"}  # fresh optimizer: no state loaded
    assert all(torch.equal(model.state_dict()[k], v) for k, v in pre.state_dict().items())
    assert all(torch.equal(model.head.state_dict()[k], v) for k, v in head0.items())  # the new head keeps its init
    ids = np.asarray(catalogue)
    assert torch.equal(ps.pull("item", ids), pre_ps.pull("item", ids))
    losses = [_step(model, ps, opt, rows, seed) for seed in range(3)]
    assert all(np.isfinite(losses))
    assert ps.num_rows("tag") == 3 and not torch.equal(ps.pull("item", ids), pre_ps.pull("item", ids))
    assert not torch.equal(model.head.weight, head0["weight"])


def test_dense_optimizer_choice_changes_the_first_update(pretrained):
    """kept: the first fine-tuning step is the step the pre-training optimizer would take; fresh: a
    first Adam step. They differ, so a transfer that ignored the choice fails one of the two."""
    d, pre, pre_opt, _ = pretrained
    catalogue, _ = _data()
    params = dict(pre.named_parameters())
    grads = {n: torch.full_like(p, 0.3) for n, p in params.items()}
    cont = copy.deepcopy(pre)  # the pre-training run, continued one step
    cont_opt = torch.optim.Adam(cont.parameters(), lr=LR)
    cont_opt.load_state_dict(pre_opt.state_dict())
    for n, p in cont.named_parameters():
        p.grad = grads[n]
    cont_opt.step()
    after = {}
    for choice in ("kept", "fresh"):
        model = TaggedSeqRec(CFG, catalogue)
        opts = _optimizers(model)
        opt = opts["main"].opt
        reports = transfer_dense(d, model, opts, TransferConfig(dense_optimizer=choice))
        if choice == "kept":
            rep = reports["optimizer"]
            assert rep.new == ["head.weight", "head.bias"] and len(rep.loaded) == len(params) and not rep.dropped
        for n, p in model.named_parameters():
            p.grad = grads.get(n, torch.full_like(p, 0.3))
        opt.step()
        after[choice] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in cont.named_parameters():
        torch.testing.assert_close(after["kept"][n], p.detach(), atol=1e-7, rtol=0)
        fresh_step = LR * 0.3 / (0.3 + 1e-8)  # Adam's first step: lr * g / (|g| + eps)
        torch.testing.assert_close(after["fresh"][n], params[n].detach() - fresh_step, atol=1e-6, rtol=0)
    assert max(float((after["kept"][n] - after["fresh"][n]).abs().max()) for n in params) > 1e-4


def test_kept_dense_state_takes_the_new_lr_and_refuses_an_unmatched_checkpoint(pretrained, tmp_path):
    d, *_ = pretrained
    catalogue, _ = _data()
    model = TaggedSeqRec(CFG, catalogue)
    opts = _optimizers(model, lr=3e-4)
    opt = opts["main"].opt
    ck.load_optimizer_partial(d, opts)
    assert opt.param_groups[0]["lr"] == 3e-4 and len(opt.state) == len(list(model.parameters())) - 2
    old = tmp_path / "old"  # a checkpoint of the single-optimizer engine: one unnamed Adam state
    old.mkdir()
    torch.save(torch.optim.Adam(model.parameters()).state_dict(), old / ck.OPTIM_FILE)
    with pytest.raises(ConfigError, match="names no parameters"):
        ck.load_optimizer_partial(old, opts)


def test_dense_shape_change_names_the_key_and_both_shapes(pretrained):
    d, *_ = pretrained
    catalogue, _ = _data()
    wider = SeqRec(SeqRecConfig(d=12, max_len=10, layers=1, heads=1, dropout=0.0), catalogue)
    shapes = r"dense key '.+' has shape \(.*8.*\) in the checkpoint, \(.*12.*\) in the model"
    with pytest.raises(ConfigError, match=shapes):
        ck.load_dense_partial(d, wider)


def test_ps_optimizer_choice_changes_the_first_update(pretrained):
    d, _, _, pre_ps = pretrained
    catalogue, _ = _data()
    ids = np.asarray(catalogue)
    g = np.full((len(ids), CFG.d), 0.2, dtype=np.float32)
    rows0 = pre_ps.pull("item", ids).clone()
    after = {}
    for choice in ("kept", "fresh"):
        ps = LocalPS(2)
        transfer_ps(ps, ck.ps_url(d), SeqRec(CFG, catalogue).sparse_tables(), TransferConfig(ps_optimizer=choice))
        ps.push("item", ids, g)
        after[choice] = ps.pull("item", ids)
    pre_ps.push("item", ids, g)  # kept: the pre-training PS's own next step
    assert torch.equal(after["kept"], pre_ps.pull("item", ids))
    torch.testing.assert_close(after["fresh"], rows0 - 0.01 * 0.2 / (0.2 + 1e-8), atol=1e-6, rtol=0)
    assert (after["kept"] - after["fresh"]).abs().max() > 1e-4


def test_transfer_config_defaults_and_errors_name_the_key(pretrained, tmp_path):
    cfg = load_config(EngineConfig, "configs/demo.yaml", [])
    assert (cfg.transfer.dense_optimizer, cfg.transfer.ps_optimizer) == ("fresh", "fresh")  # the documented default
    bad = {
        "transfer.ps_optimizer=keep": "transfer.ps_optimizer",
        "transfer.tables.item=copy": "transfer.tables.item",
        "transfer.tables.tag=import": "set transfer.import_tables.tag",
    }
    for override, key in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(EngineConfig, "configs/demo.yaml", [override])
    with pytest.raises(ConfigError, match=r"transfer\.import_tables\.tag is set, but transfer\.tables\.tag is 'new'"):
        TransferConfig(tables={"tag": "new"}, import_tables={"tag": "x.parquet"})
    with pytest.raises(ConfigError, match=r"\['nope'\] are not tables of the model"):
        table_modes(TransferConfig(tables={"nope": "new"}), ["item"], ["item"])
    with pytest.raises(ConfigError, match="transfer.tables.tag is 'keep', but the checkpoint has no table 'tag'"):
        table_modes(TransferConfig(tables={"tag": "keep"}), ["item", "tag"], ["item"])
    d, *_ = pretrained
    wide = [TableSpec("item", 9)]
    with pytest.raises(ConfigError, match="table 'item' has dim 8 in the checkpoint, 9 declared"):
        transfer_ps(LocalPS(), ck.ps_url(d), wide, TransferConfig())


def test_transfer_imports_a_table_and_drops_one_the_model_lacks(pretrained, tmp_path):
    d, _, _, pre_ps = pretrained
    catalogue, _ = _data()
    src = LocalPS()
    src.create_table(TableSpec("tag", CFG.d, init="uniform", init_scale=1.0))
    src.pull("tag", np.arange(5))
    src.export("tag", str(tmp_path / "tags"))
    model = TaggedSeqRec(CFG, catalogue)
    cfg = TransferConfig(tables={"item": "new"}, import_tables={"tag": str(tmp_path / "tags")})
    ps = LocalPS(2)
    report = transfer_ps(ps, ck.ps_url(d), model.sparse_tables(), cfg)
    assert (report.loaded, report.new, report.imported) == ([], ["item"], ["tag"])
    assert ps.num_rows("item") == 0 and torch.equal(ps.pull("tag", np.arange(5)), src.pull("tag", np.arange(5)))
    only_tag = transfer_ps(LocalPS(), ck.ps_url(d), [TableSpec("tag", CFG.d)], TransferConfig())
    assert only_tag.dropped == ["item"] and only_tag.new == ["tag"]


def _eval_set(catalogue: np.ndarray, rows: pa.Table) -> EvalSet:
    items = rows["items"].to_pylist()
    table = pa.table({"user_id": rows["user_id"], "item_id": pa.array([s[-1] for s in items], pa.int64()),
                      "domain": ["books"] * rows.num_rows,
                      "history": pa.array([s[:-1] for s in items], pa.list_(pa.int64()))})
    return EvalSet(table, {"books": catalogue})


def test_scores_from_exported_vectors_match_the_model_scorer(pretrained, tmp_path):
    _, model, _, ps = pretrained
    catalogue, rows = _data()
    data = _eval_set(catalogue, rows)
    urls = export_embeddings(model, ps, tmp_path / "embeddings", 3, users=data.rows)
    assert urls == {n: str(tmp_path / "embeddings" / f"{n}-step3") for n in ("item", "user")}
    tables = {n: read_export(u) for n, u in urls.items()}
    assert torch.equal(torch.tensor(tables["item"]["vector"].to_pylist()), ps.pull("item", catalogue))
    assert tables["user"]["id"].to_pylist() == rows["user_id"].to_pylist()
    mine, theirs = export_scorer(tables["user"], tables["item"]), model.scorer(data.rows, ps.pull)
    users = user_batch(data, np.arange(data.num_rows))
    cat = torch.from_numpy(catalogue)
    torch.testing.assert_close(mine(users, cat, domain="books"), theirs(users, cat, domain="books"), atol=1e-6, rtol=0)
    cfg = EvalConfig(candidates="full", ks=[5, 10])
    assert evaluate(mine, data, cfg).summary() == evaluate(theirs, data, cfg).summary()
    # the written tables import back into a PS as they are
    back = LocalPS(3)
    back.create_table(TableSpec("item", CFG.d))
    back.import_table("item", urls["item"])
    assert torch.equal(back.pull("item", catalogue), ps.pull("item", catalogue))
    assert export_embeddings(model, ps, tmp_path / "embeddings", 3, users=data.rows) == urls  # kept, not rewritten


class _TablesOnly(nn.Module):
    """A model without an `export` hook."""

    def sparse_tables(self) -> list[TableSpec]:
        return [TableSpec("emb", 4)]


def test_a_model_without_export_gets_its_raw_ps_tables(tmp_path):
    model = _TablesOnly()
    ps = _ps(model)
    ps.pull("emb", np.arange(7))
    urls = export_embeddings(model, ps, tmp_path, 0)
    assert list(urls) == ["emb"] and Path(urls["emb"], "_MANIFEST.json").exists()
    assert sorted(read_export(urls["emb"])["id"].to_pylist()) == list(range(7))
