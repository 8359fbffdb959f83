"""``--backend ray``: workers as Ray actors on a private local Ray (2 CPUs, as CI has).

Each server here starts its own Ray and shuts it down; the ``isolated`` fixture then proves that
no Ray process, segment or socket file is left.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

import seqs
from dataserver import DataServer
from dataserver.client import RemoteSequence
from dataserver.config import ServerConfig
from dataserver.errors import ConfigError, DataServerError
from dataserver.protocol import Done, Made, WorkerReady, encode
from dataserver.server import Server
from dataserver.source import SequenceSource
from dataserver.status import fetch_status
from helpers import wait_for

pytestmark = pytest.mark.timeout(120)
ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")


def read_epochs(rs: RemoteSequence, epochs: int, check: Any = None) -> list[list[int]]:
    seen = []
    for _ in range(epochs):
        got = []
        for i, (x, y) in enumerate(rs):
            assert x.shape == (16, 16) and (x == i).all(), f"batch {i} has wrong content"
            got.append(int(y[0]))
            if check is not None:
                check(len(got))
        seen.append(got)
        rs.on_epoch_end()
    return seen


def test_ray_actors_serve_in_order_through_shared_memory(serve: Any) -> None:
    server = serve(spec="seqs:Indexed", args={"n": 24}, backend="ray")
    with RemoteSequence(server.endpoint) as rs:
        assert read_epochs(rs, 2) == [list(range(24))] * 2
        workers = fetch_status(server.endpoint)["workers"]
    assert [w["kind"] for w in workers] == ["ray", "ray"]
    assert {w["transport"] for w in workers} == {"shm"}  # same host: they write the ring
    assert all(w["host"] == os.uname().nodename for w in workers)
    # memory as the actors measure it themselves (psutil there), reported every second
    wait_for(lambda: all(w["uss"] for w in fetch_status(server.endpoint)["workers"]),
             "the Ray workers' memory reports")


def test_ray_frames_transport_survives_a_killed_actor(serve: Any) -> None:
    """Forced frames: batches travel over TCP as they would from another host. SIGKILL one
    actor mid-epoch: its batches are retried, a replacement starts, nothing is lost."""
    server = serve(spec="seqs:Indexed", args={"n": 40, "delay": 0.02}, backend="ray",
                   ray_transport="frames", max_retries=3)
    killed: list[int] = []

    def kill_one(n: int) -> None:
        if n == 8 and not killed:
            pid = fetch_status(server.endpoint)["workers"][0]["pid"]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with RemoteSequence(server.endpoint) as rs:
        assert read_epochs(rs, 2, kill_one) == [list(range(40))] * 2
        snap = wait_for(lambda: (s := fetch_status(server.endpoint))["counters"]["restarts"]
                        and all(w["state"] != "starting" for w in s["workers"]) and s,
                        "the replacement actor")
    assert killed and killed[0] not in [w["pid"] for w in snap["workers"]]
    assert {w["transport"] for w in snap["workers"]} == {"frames"}


def test_ray_needs_a_spec_not_an_object(serve: Any) -> None:
    with pytest.raises(DataServerError, match=r"--backend ray imports the Sequence in each "
                                              r"actor, so it needs a SPEC"):
        serve(seqs.Indexed(8), backend="ray")


def test_ray_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="drop --worker-type thread"):
        ServerConfig(backend="ray", worker_type="thread")
    with pytest.raises(ConfigError, match="apply to --backend ray"):
        ServerConfig(ray_transport="frames")
    with pytest.raises(ConfigError, match="--ray-transport must be"):
        DataServer(spec="seqs:Indexed", backend="ray", ray_transport="carrier-pigeon")


def test_worker_socket_drops_peers_without_the_secret(isolated: dict[str, Path]) -> None:
    """The worker endpoint is reachable over TCP with --backend ray: a peer that does not
    present the server's secret is ignored, whatever it sends; nothing is decoded as a batch."""
    server = Server(ServerConfig(), SequenceSource(obj=seqs.Indexed(4)))
    fakes = [
        [b"w0", encode(Done(0, "", 8, b"\x90", 0.0))],
        [b"w0", encode(Made(0, 3, b"\x90", 0.0)), b"abc"],
        [b"w0", encode(WorkerReady(0, 1, "not-the-secret", True, "evil"))],
        [b"x", b"\xc1"],
        [b"w", b"garbage"],
        [b"wnot-a-number", encode(WorkerReady(0, 1, "", True, ""))],
    ]
    for frames in fakes:
        server._on_worker_frames(frames)  # would raise on a sched it does not have if accepted
    assert not server._authed


def test_a_made_batch_must_add_up_to_what_it_says() -> None:
    """A batch over FRAMES_SPLIT comes from a frames worker in several frames: the server
    refuses frames that do not add up to the size announced, before placing anything."""
    from dataserver.errors import ProtocolError
    from dataserver.protocol import FRAME_CHUNK, FRAMES_SPLIT

    server = Server(ServerConfig(), SequenceSource(obj=seqs.Indexed(4)))
    big = FRAMES_SPLIT + 1
    for frames, has in (([bytes(FRAME_CHUNK)] * 7, 7 * FRAME_CHUNK),
                        ([bytes(FRAME_CHUNK)] * 8, 8 * FRAME_CHUNK)):
        with pytest.raises(ProtocolError, match=f"Made says {big} bytes, its frames have {has}"):
            server._on_made(0, Made(0, big, b"\x90", 0.0), frames)


def test_ray_frames_carry_batches_bigger_than_a_frame(serve: Any) -> None:
    """An actor sends a batch over FRAMES_SPLIT in several frames, from a buffer it reuses
    once ZeroMQ let go of it; the server puts them together in the slot (or a one-off
    segment) byte for byte."""
    import psutil

    from dataserver.protocol import FRAMES_SPLIT

    big = FRAMES_SPLIT + (4 << 20) + 8
    bigs = (1, 2, 3, 4, 6)
    server = serve(spec="seqs:Sized", args={"n": 8, "big": big, "big_at": list(bigs)},
                   backend="ray", ray_transport="frames", workers=1)
    actor = psutil.Process(fetch_status(server.endpoint)["workers"][0]["pid"])
    before = actor.memory_full_info().uss
    with RemoteSequence(server.endpoint) as rs:
        for _epoch in range(2):
            got = [(x.nbytes, bool((x == i).all()), int(y[0])) for i, (x, y) in enumerate(rs)]
            assert got == [(big if i in bigs else 4096, True, i) for i in range(8)]
            rs.on_epoch_end()
    # idle, the actor keeps none of those buffers (each is bigger than this margin)
    wait_for(lambda: actor.memory_full_info().uss < before + (16 << 20),
             "the idle actor to let go of its big batches' buffers")


def test_ray_worker_memory_cap_uses_what_the_actors_report(serve: Any) -> None:
    """An actor measures itself (it may be on another host); over --max-worker-memory it
    finishes its batches and is replaced, and nothing is lost. Ray workers carry Ray's runtime
    (~50 MiB USS), so a 20 MiB cap retires each one at its first report."""
    server = serve(spec="seqs:Indexed", args={"n": 30, "delay": 0.02}, backend="ray",
                   max_worker_memory="20MiB")
    with RemoteSequence(server.endpoint) as rs:
        assert read_epochs(rs, 1) == [list(range(30))]
        wait_for(lambda: fetch_status(server.endpoint)["counters"].get("memory_cap_restarts"),
                 "a Ray worker retired for its reported memory")
        assert read_epochs(rs, 2) == [list(range(30))] * 2  # read by the replacements
        assert max(w["incarnation"] for w in fetch_status(server.endpoint)["workers"]) >= 2


def test_an_actor_that_cannot_see_the_ring_picks_frames_or_says_why(tmp_path: Path) -> None:
    """The choice each actor makes from the server's lock file: shared memory only where the
    lock is visible; ``--ray-transport shm`` elsewhere is an error that names the host."""
    from dataclasses import replace

    from dataserver import shm
    from dataserver._proc import pid_namespace
    from dataserver.worker import WorkerSpec, ray_transport

    spec = WorkerSpec(worker=0, incarnation=0, count=1, kind="ray", address="", sources=[],
                      server_id="abc", shm_dir=str(tmp_path), on_epoch_end=True,
                      pidns=pid_namespace())
    assert ray_transport(spec) == "frames"  # no lock file here: another host, as it were
    with pytest.raises(ConfigError, match=r"--ray-transport shm: this Ray actor \(host .*\) "
                                          r"cannot see the server's shared memory"):
        ray_transport(replace(spec, transport="shm"))
    (tmp_path / f"{shm.PREFIX}abc.lock").touch()
    assert ray_transport(spec) == "shm"
    assert ray_transport(replace(spec, transport="frames")) == "frames"
