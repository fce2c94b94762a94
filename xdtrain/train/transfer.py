"""Transfer between jobs: start from a checkpoint with new modules and new PS tables (`init_from`),
and export the vectors a finished run serves with.

A finetune job prepares its PS on the driver (`transfer_ps`) and writes it as the run's starting
checkpoint, which every worker restores as in a fresh run; each worker loads the dense part itself
(`transfer_dense`). What is kept, new or imported, and whether optimizer state is kept (fresh by
default, dense and PS), is the config's `transfer:` section (`TransferConfig`).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch

from xdtrain.config import ConfigError
from xdtrain.nn.sparse import Exports
from xdtrain.ps import CheckpointError, TableSpec
from xdtrain.ps.checkpoint import read_manifest, restore_plan
from xdtrain.ps.export import EXPORT_MANIFEST, write_vector_table
from xdtrain.train.checkpointing import TransferReport, load_dense_partial, load_optimizer_partial
from xdtrain.train.config import TransferConfig


def table_modes(cfg: TransferConfig, tables: list[str], saved: list[str]) -> dict[str, str]:
    """keep / new / import for each of the model's `tables`, given the checkpoint's `saved` tables."""
    unknown = sorted(t for t in {*cfg.tables, *cfg.import_tables} if t not in tables)
    if unknown:
        raise ConfigError(f"transfer.tables: {unknown} are not tables of the model (it has {sorted(tables)})")
    modes = {}
    for t in tables:
        mode = cfg.mode(t) or ("keep" if t in saved else "new")
        if mode == "keep" and t not in saved:
            raise ConfigError(f"transfer.tables.{t} is 'keep', but the checkpoint has no table {t!r} "
                              f"(it has {sorted(saved)})")
        modes[t] = mode
    return modes


def transfer_ps(ps, url: str, specs: list[TableSpec], cfg: TransferConfig) -> TransferReport:
    """Make `ps` hold the model's tables (`specs`): kept ones from the PS checkpoint at `url` (with
    their optimizer state only if cfg.ps_optimizer is kept), new ones empty, imported ones read from
    Parquet. Tables of the checkpoint the model lacks are dropped."""
    manifest = read_manifest(url)
    saved = list(manifest["tables"])
    modes = table_modes(cfg, [s.name for s in specs], saved)
    keep = [t for t, m in modes.items() if m == "keep"]
    kept_state = cfg.ps_optimizer == "kept"
    try:  # the config's mistakes (a changed dim, kept state of another optimizer) before any work
        restore_plan(manifest, {s.name: s for s in specs}, keep, kept_state, url)
    except CheckpointError as e:
        raise ConfigError(f"transfer: {e}") from None
    for spec in specs:
        ps.create_table(spec)
    ps.restore(url, tables=keep, optimizer_state=kept_state)
    imported = [t for t, m in modes.items() if m == "import"]
    for t in imported:
        ps.import_table(t, cfg.import_tables[t])
    return TransferReport(loaded=keep, new=[t for t, m in modes.items() if m == "new"],
                          dropped=[t for t in saved if t not in modes], imported=imported)


def transfer_dense(directory: str | Path, model: torch.nn.Module, optimizers, cfg: TransferConfig
                   ) -> dict[str, TransferReport]:
    """Load the dense weights the model shares with the checkpoint (new modules keep their init)
    and, when cfg.dense_optimizer is kept, the state of every named optimizer (`OptimizerSet`)
    matched by optimizer and parameter name. Returns a report per part ("dense", "optimizer")."""
    out = {"dense": load_dense_partial(directory, model)}
    if cfg.dense_optimizer == "kept":
        out["optimizer"] = load_optimizer_partial(directory, optimizers)
    return out


def export_embeddings(model: torch.nn.Module, ps, root: str | Path, step: int,
                      users: pa.Table | None = None) -> dict[str, str]:
    """{name: URL} of the vectors under root/<name>-step<step>/: the tables of the model's `export`
    hook (given the `users` rows) when it has one, else the raw PS tables. Each is written whole
    (its manifest last); one already there is kept."""
    out = {}
    if isinstance(model, Exports):
        for name, table in model.export(ps.pull, users).items():
            out[name] = str(Path(root) / f"{name}-step{step}")
            if not Path(out[name], EXPORT_MANIFEST).exists():
                write_vector_table(out[name], name, table)
        return out
    for spec in model.sparse_tables():
        out[spec.name] = str(Path(root) / f"{spec.name}-step{step}")
        if not Path(out[spec.name], EXPORT_MANIFEST).exists():
            ps.export(spec.name, out[spec.name])
    return out
