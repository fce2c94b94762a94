"""Shared fixtures. One local Ray cluster serves every integration test in the session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance shared by all tests that ask for it (started once, stopped at the end)."""
    import ray

    from xdtrain.localray import init_local

    if not ray.is_initialized():
        init_local(
            num_cpus=4,
            resources={"ps": 8, "trainer": 4},
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=512 * 1024**2,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}},
        )
    yield ray
    ray.shutdown()
