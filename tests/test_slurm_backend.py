"""`widep launch --backend slurm` against a real Slurm cluster run by the test (tests/slurm_cluster.py).

One cluster per module: munged, slurmctld and two slurmd (nodes n0 and n1 on 127.0.0.1 and 127.0.0.2).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from slurm_cluster import SlurmCluster, missing

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    why = missing()
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{why} (CI=true: .ci/run installs Slurm, so this fails instead of skipping)", pytrace=False)
        pytest.skip(why)
    cluster = SlurmCluster(nodes=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_two_nodes_on_one_host_run_one_task_each(slurm: SlurmCluster) -> None:
    """Debian's 22.05 build runs several slurmd on one host: a 2-node step lands one task on each node."""
    out = slurm.run("srun", "-N2", "--ntasks-per-node=1", "--label", "bash", "-c",
                    'echo "$SLURMD_NODENAME $SLURM_NODEID"', timeout=60).stdout
    assert sorted(out.split("\n")[:2]) == ["0: n0 0", "1: n1 1"], out
    hosts = slurm.run("scontrol", "show", "hostnames", "n[0-1]").stdout.split()
    assert hosts == ["n0", "n1"]
