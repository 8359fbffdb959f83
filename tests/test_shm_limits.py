"""/dev/shm too small: a ring that cannot fit fails at start, an oversize batch that cannot
get a segment fails at its index; never SIGBUS. Uses a small tmpfs the test mounts (root)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import seqs
from dataserver.client import RemoteError, RemoteSequence
from dataserver.errors import SharedMemoryError

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def tiny_shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 4 MiB tmpfs as the shared-memory directory."""
    where = tmp_path / "tiny"
    where.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M,mode=0700", "tmpfs",
                          str(where)], capture_output=True, text=True)
    if out.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {out.stderr.strip()}")
    monkeypatch.setenv("DATASERVER_SHM_DIR", str(where))
    try:
        yield where
        assert not os.listdir(where), f"left in the small tmpfs: {os.listdir(where)}"
    finally:
        # lazily if something still holds it open: a mount must never outlive the test
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_ring_that_cannot_fit_fails_at_start_with_the_fix(tiny_shm: Path, serve: Any) -> None:
    with pytest.raises(SharedMemoryError) as info:
        serve(seqs.Indexed(10), slot_bytes="1MiB", slots=8)
    msg = str(info.value)
    assert "cannot reserve 8.0 MiB of shared memory" in msg
    assert "free of 4.0 MiB" in msg and "--shm-size" in msg and "emptyDir" in msg


def test_an_oversize_batch_without_room_is_an_error_at_its_index(tiny_shm: Path,
                                                                 serve: Any) -> None:
    server = serve(seqs.Sized(8, small=4096, big=16 << 20, big_at=(3,)), slot_bytes="64KiB",
                   slots=8, workers=1, max_retries=0)
    with RemoteSequence(server.endpoint) as seq:
        it = iter(seq)
        got: list[Any] = []
        for _ in range(8):
            try:
                got.append(int(next(it)[1][0]))
            except RemoteError as exc:
                got.append(exc)
    assert [g for g in got if isinstance(g, int)] == [0, 1, 2, 4, 5, 6, 7]
    err = got[3]
    assert isinstance(err, RemoteError) and err.index == 3
    assert err.type_name == "dataserver.errors.SharedMemoryError"
    assert "cannot reserve 16.0 MiB" in err.message
