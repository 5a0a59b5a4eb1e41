"""A real S3 API on loopback for tests: moto's server in a child process (`moto_s3_server()`),
and the `s3_bucket` fixture: an `s3://` URL of a fresh bucket on it, with the endpoint set for
this process (fsspec's config) and for worker processes (`S3_ENV`).

moto (>= 5) honours `If-None-Match: *` and `If-Match: <ETag>` on PutObject, but it checks the
condition and then stores the object, in two steps: two requests handled at once could both pass
the check, which AWS S3 and MinIO do not allow (not seen in 200 four-way races here, but
possible). Served one request at a time (the default), moto's conditional writes are atomic as
S3's are, so the race tests test the claims, not moto; `--no-serialise` serves moto as it comes.

    python tests/s3_server.py PORT_FILE [--no-serialise]    # writes the port, serves until killed
"""

from __future__ import annotations

import contextlib
import os
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
    """moto's server could not be started here (not installed, or it did not come up)."""


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
    with open(f"{port_file}.tmp", "w") as handle:
        handle.write(str(server.server_address[1]))
    os.replace(f"{port_file}.tmp", port_file)
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
                    raise NoServer(f"moto's server did not start within {timeout_s:.0f} s (exit status {child.poll()}): "
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


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[str]:
    """`s3://BUCKET` on a moto server started for the session; the tests skip (saying why) only if
    the server cannot start. Sets fsspec's s3 endpoint and test credentials for this process;
    `S3_ENV` holds them for worker processes."""
    import fsspec.config

    pytest.importorskip("s3fs", reason="s3:// stores need s3fs (pip install 'lol-pipeline[s3]')")
    with contextlib.ExitStack() as stack:
        try:
            endpoint = stack.enter_context(moto_s3_server())
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


if __name__ == "__main__":
    serve(sys.argv[1], serialise="--no-serialise" not in sys.argv[2:])
