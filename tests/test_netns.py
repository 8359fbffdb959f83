"""A consumer on "another host": a network namespace of the test's own, joined to this one by a
veth pair (private addresses that exist only inside this sandbox), with a /dev/shm of its own.
Needs root (ip netns, mount); skipped with the reason otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import seqs

pytestmark = pytest.mark.timeout(120)

CONSUMER = """
import json, sys
from dataserver.client import RemoteSequence
with RemoteSequence(sys.argv[1], curve_keys=sys.argv[2], timeout=20) as seq:
    out = {"transport": seq.transport, "epochs": []}
    for _ in range(2):
        out["epochs"].append([[int(y[0]), float(x[1, 1])] for x, y in seq])
        seq.on_epoch_end()
print(json.dumps(out))
"""


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """(namespace, host-side address, namespace-side address)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a network namespace (ip netns add)")
    tag = os.getpid() % 10000
    ns, host_if, ns_if = f"dstest{tag}", f"dsh{tag}", f"dsn{tag}"
    host_ip, ns_ip = f"10.213.{tag % 250}.1", f"10.213.{tag % 250}.2"
    made = run("ip", "netns", "add", ns)
    if made.returncode:
        pytest.skip(f"cannot make a network namespace here: {made.stderr.strip()}")
    try:
        for cmd in (["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
                    ["ip", "link", "set", ns_if, "netns", ns],
                    ["ip", "addr", "add", f"{host_ip}/30", "dev", host_if],
                    ["ip", "link", "set", host_if, "up"],
                    ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if],
                    ["ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up"],
                    ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]):
            done = run(*cmd)
            if done.returncode:
                pytest.skip(f"cannot wire the test namespace ({' '.join(cmd)}): "
                            f"{done.stderr.strip()}")
        yield ns, host_ip, ns_ip
    finally:
        run("ip", "link", "del", host_if)
        run("ip", "netns", "del", ns)


def test_consumer_in_another_network_namespace_reads_frames_over_tcp(
        netns: tuple[str, str, str], serve: Any, tmp_path: Path) -> None:
    ns, host_ip, _ns_ip = netns
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "dataserver", "keys", str(keys)], check=True,
                   capture_output=True, timeout=60)
    endpoint = f"tcp://{host_ip}:47123"
    server = serve(seqs.Indexed(30, delay=0.002), endpoint=endpoint, curve_keys=str(keys),
                   shuffle=True, seed=4)
    # a mount namespace with an empty /dev/shm of its own: the server's ring is not there
    inner = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs none /dev/shm && exec "$@"', "sh",
             sys.executable, "-c", CONSUMER, endpoint, str(keys)]
    out = subprocess.run(["ip", "netns", "exec", ns, *inner], capture_output=True, text=True,
                         timeout=90, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["transport"] == "frames"
    import numpy as np

    for epoch, seen in enumerate(got["epochs"]):
        order = np.random.default_rng([4, epoch]).permutation(30).tolist()
        assert seen == [[i, float(i)] for i in order]
    server.close()
