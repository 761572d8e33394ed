"""A local HTTP server standing in for the Hugging Face Hub, with just what an upload through
huggingface_hub's create_repo / create_branch / create_commit needs (regular, non-LFS files)."""

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.files: dict[str, dict[str, bytes]] = {}  # repo@revision -> path -> content
        self.authorization: list[str] = []
        self.branches: list[str] = []
        self.fail_commit = False
        self.validated_yaml: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                hub.authorization.append(self.headers.get("authorization", ""))
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    data = json.loads(body)
                    repo = f"{data['organization']}/{data['name']}"
                    return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":  # the model card's front matter
                    hub.validated_yaml.append(json.loads(body).get("content", ""))
                    return self._reply(200, {"errors": [], "warnings": []})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
                if not m:
                    return self._reply(404, {"error": f"fake hub: no route {path}"})
                repo, action, revision = m.groups()
                if action == "branch":
                    hub.branches.append(revision)
                    return self._reply(200, {})
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                if hub.fail_commit:
                    return self._reply(500, {"error": "fake hub: commit refused"})
                store = hub.files.setdefault(f"{repo}@{revision}", {})
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        store[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
