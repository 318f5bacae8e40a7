"""A real local HTTP server standing in for agent endpoints and an OpenAI-compatible LLM.

Every request is recorded (method, path, headers, JSON body). Responses are 200
``{"ok": true, "path": ...}`` unless a path was programmed with ``program(path, [...])``: a list
of responses consumed one per request (an int status, or a (status, body, headers) tuple).
``/v1/chat/completions`` answers like an OpenAI-compatible server.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.time)
    query: str = ""


class AgentServer:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.programs: dict[str, list[Any]] = {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.requests.append(
                        Recorded(
                            self.command, path, dict(self.headers.items()), body, query=self.path.partition("?")[2]
                        )
                    )
                    program = server.programs.get(path)
                    response = program.pop(0) if program else None
                status, payload, headers = 200, {"ok": True, "path": path, "method": self.command}, {}
                if path.endswith("/chat/completions"):
                    prompt = (body or {}).get("messages", [{}])[-1].get("content", "")
                    payload = {
                        "id": "cmpl-test",
                        "model": (body or {}).get("model", "test"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": f"echo: {prompt}"},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
                    }
                if isinstance(response, int):
                    status = response
                    payload = {"ok": 200 <= status < 300, "status": status}
                elif isinstance(response, tuple):
                    status, payload, headers = (list(response) + [{}])[:3]
                if path.startswith("/slow/"):
                    time.sleep(float(path.rsplit("/", 1)[1]))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, str(v))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> AgentServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.programs.clear()

    def program(self, path: str, responses: list[Any]) -> None:
        with self.lock:
            self.programs[path] = list(responses)

    def calls(self, prefix: str = "") -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(prefix)]
