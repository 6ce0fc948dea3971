"""A hook receiver for the tests: records every hook request and answers what it is told.

    python hook_receiver.py PORT LOG

Every POST to any path but /_control is appended to LOG as one JSON line (path, headers,
body, arrival time) and answered from the rules: POST /_control with
`{"<hook type>": {"status": 200, "answer": {...}, "delay": 0}}` sets them (a missing type
gets 200 and `{}`). GET /_control answers 200 once the receiver is up.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RULES: dict[str, dict] = {}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(200, b"{}")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/_control":
            with LOCK:
                RULES.update(json.loads(body))
            self._answer(200, b"{}")
            return
        try:
            kind = json.loads(body).get("Type", "")
        except ValueError:
            kind = ""
        entry = {
            "path": self.path,
            "headers": dict(self.headers.items()),
            "body": body.decode(),
            "at": time.time(),
        }
        with LOCK:
            with open(sys.argv[2], "a") as log:
                log.write(json.dumps(entry) + "\n")
            rule = RULES.get(kind, {})
        time.sleep(rule.get("delay", 0))
        self._answer(rule.get("status", 200), json.dumps(rule.get("answer", {})).encode())


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
