"""Shared pieces of the AMID tests: the two-domain fixture (logs + the same rows in the released
CSV format) and a tiny in-process engine iteration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from xdtrain.data.amid_rows import AmidDataConfig, d_and_test, write_released

FIXTURE = Path(__file__).parent / "fixtures" / "amid"
PAIR = "cloth_sport"
DOMAINS = ("cloth", "sport")
K_U = 0.25


def fixture_config(**kw) -> AmidDataConfig:
    return AmidDataConfig(DOMAINS, **{"k_u": K_U, "valid_ratio": 0.15, **kw})


def make_logs(n_users: int = 300, seed: int = 0, overlap: float = 0.3) -> pa.Table:
    """Canonical interactions over two domains (cloth ids 0..79, sport ids 1000..1079): a share
    `overlap` of the users in both, the rest in one; 5-8 items per domain, distinct timestamps."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {"user_id": [], "item_id": [], "domain": [], "timestamp": []}
    for u in range(n_users):
        both = rng.random() < overlap
        doms = [0, 1] if both else [int(rng.integers(2))]
        t = 0
        for z in doms:
            for v in rng.choice(80, int(rng.integers(5, 9)), replace=False):
                t += int(rng.integers(1, 100))
                for k, x in zip(cols, (u + 1, int(v) + 1000 * z, DOMAINS[z], t)):
                    cols[k].append(x)
    return pa.table(cols)


def fixture_logs() -> pa.Table:
    return pcsv.read_csv(FIXTURE / "logs.csv")


def write_fixture() -> None:
    """(Re)write tests/fixtures/amid: logs.csv and the released-format CSVs built from it."""
    logs = make_logs()
    FIXTURE.mkdir(parents=True, exist_ok=True)
    pcsv.write_csv(logs, FIXTURE / "logs.csv")
    write_released(*d_and_test(fixture_logs(), fixture_config()), FIXTURE, PAIR, K_U)


if __name__ == "__main__":
    write_fixture()
