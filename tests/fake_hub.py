"""A Hugging Face hub on localhost, for push tests: the endpoints `HfApi.create_repo` and
`HfApi.upload_folder` call, answered in the hub's formats, with repos held in memory.

Every file is answered as a "regular" (git) file, so huggingface_hub sends contents inside the
commit and no LFS or Xet transfer is needed; everything else — which files to add and delete,
skipping files the repo already holds, the token in each request — is huggingface_hub's own
code talking HTTP. Requests without the right bearer token get the hub's 401.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import yaml

_REPO_CALL = re.compile(r"/api/datasets/(?P<repo>[^/]+/[^/]+)/(?P<call>preupload|commit|tree|revision)/(?P<rev>[^/]+)")


def git_oid(content: bytes) -> str:
    """The git blob id of `content`, which the hub reports as a regular file's `oid`."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    visibility: str | None
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)  # {"summary", "added": [paths], "deleted": [paths]}

    @property
    def head(self) -> str:
        return hashlib.sha1(json.dumps(self.commits).encode()).hexdigest()


class FakeHub:
    """`with FakeHub(token) as hub:` serves at `hub.url`; `hub.repos[repo_id]` is what a push left."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.unauthorized = 0  # requests refused for their token
        self.refused: list[str] = []  # their methods and paths
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {hub.token}":
                    return True
                hub.unauthorized += 1
                hub.refused.append(f"{self.command} {self.path}")
                self._send(401, {"error": "Invalid credentials in Authorization header"})
                return False

            def _repo(self, repo_id: str) -> Repo | None:
                if repo_id not in hub.repos:
                    self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return hub.repos.get(repo_id)

            def _repo_call(self, path: str) -> tuple[re.Match, Repo] | None:
                """(the call, its repo) of a /api/datasets/{repo}/{call}/{revision} path; None once answered 404."""
                match = _REPO_CALL.fullmatch(path)
                if match is None:
                    self._send(404, {"error": "not found"})
                    return None
                repo = self._repo(match["repo"])
                return (match, repo) if repo is not None else None

            def do_GET(self) -> None:
                if urlparse(self.path).path == "/api/agent-harnesses":  # huggingface_hub's best-effort lookup, public
                    return self._send(404, {"error": "not served here"})
                if not self._authorized() or (found := self._repo_call(urlparse(self.path).path)) is None:
                    return
                match, repo = found
                if match["call"] == "tree":
                    return self._send(200, [{"type": "file", "path": path, "size": len(content), "oid": git_oid(content)}
                                            for path, content in sorted(repo.files.items())])
                if match["call"] == "revision":
                    return self._send(200, {"id": match["repo"], "sha": repo.head, "private": repo.visibility == "private",
                                            "siblings": [{"rfilename": path} for path in sorted(repo.files)]})
                self._send(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = self._body()
                if not self._authorized():
                    return
                path = urlparse(self.path).path
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
                    url = f"{hub.url}/datasets/{repo_id}"
                    if repo_id in hub.repos:
                        return self._send(409, {"error": "You already created this dataset repo", "url": url})
                    hub.repos[repo_id] = Repo(request.get("visibility"))
                    return self._send(200, {"url": url})
                if path == "/api/validate-yaml":
                    content = json.loads(body)["content"]
                    try:
                        yaml.safe_load(content.split("---")[1])
                    except (IndexError, yaml.YAMLError) as exc:
                        return self._send(400, {"errors": [{"message": str(exc)}]})
                    return self._send(200, {})
                if (found := self._repo_call(path)) is None:
                    return
                match, repo = found
                if match["call"] == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                         "oid": git_oid(repo.files[f["path"]]) if f["path"] in repo.files else None} for f in files]})
                if match["call"] == "commit":
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    commit = {"summary": lines[0]["value"]["summary"], "added": [], "deleted": []}
                    for line in lines[1:]:
                        value = line["value"]
                        if line["key"] == "file":
                            repo.files[value["path"]] = base64.b64decode(value["content"])
                            commit["added"].append(value["path"])
                        elif line["key"] == "deletedFile":
                            repo.files.pop(value["path"], None)
                            commit["deleted"].append(value["path"])
                        else:
                            return self._send(400, {"error": f"this fake hub takes regular files only, not {line['key']}"})
                    repo.commits.append(commit)
                    return self._send(200, {"commitOid": repo.head, "commitUrl": f"{hub.url}/datasets/{match['repo']}/commit/{repo.head}"})
                self._send(404, {"error": "not found"})

        return Handler
