"""The HTTP side, on the standard library alone (http.server: a thread a connection). Nothing here knows a
model: it reads JSON, calls api.py, and writes JSON, server-sent events, a zip or the page's files.

    request ─► route (method, path) ─► Api ─► dict: JSON  │ Reply: SSE chunks, or one JSON when not streamed
                                                          │ Download: a file
    a mistake ─► 4xx {"error": {"message", "type", "param"}}; a bug ─► 500 with the same shape, the traceback
    on the server's stderr only. A client that hangs up stops its streams: the engine drops them next step.
"""

import json
import queue
import re
import select
import socket
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import BadInput
from .api import Api, ApiError, Download, Reply

PAGE = Path(__file__).parent / "page"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
MAX_BODY = 4 * 2 ** 20
ROUTES = [  # (method, path pattern, Api method name); a pattern's group is the method's first argument
    ("GET", r"/v1/models", "models"), ("POST", r"/v1/completions", "completions"),
    ("POST", r"/v1/chat/completions", "chat_completions"), ("GET", r"/api/status", "status"),
    ("GET", r"/api/methods", "methods"), ("POST", r"/api/adapters", "add_adapter"),
    ("DELETE", r"/api/adapters/([^/]+)", "delete_adapter"), ("GET", r"/api/adapters/([^/]+)/download", "download"),
    ("POST", r"/api/tune", "tune"), ("GET", r"/api/tune/([^/]+)", "tune_job"),
    ("DELETE", r"/api/tune/([^/]+)", "cancel_tune")]


def client_gone(connection) -> bool:
    """True once the client has closed its side: the socket reads as ready, with nothing to read."""
    try:
        ready, _, _ = select.select([connection], [], [], 0)
        return bool(ready) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: Api = None  # set by make_server

    def do_GET(self):
        self.handle_request("GET")

    def do_POST(self):
        self.handle_request("POST")

    def do_DELETE(self):
        self.handle_request("DELETE")

    def log_message(self, format, *args):  # one line a request on stderr, as http.server does, but quieter
        if not self.server.quiet:
            super().log_message(format, *args)

    def handle_request(self, method: str):
        path = self.path.split("?")[0]
        try:
            if method == "GET" and path in STATIC:
                name, kind = STATIC[path]
                return self.send(200, (PAGE / name).read_bytes(), kind)
            body = self.read_json() if method == "POST" else None  # read first: the connection may go on
            for route_method, pattern, name in ROUTES:
                match = re.fullmatch(pattern, path)
                if match and route_method == method:
                    return self.answer(getattr(self.api, name)(*match.groups(), body))
            known = any(re.fullmatch(pattern, path) for _, pattern, _ in ROUTES)
            raise ApiError(405 if known else 404, f"{method} {path}: {'method not allowed' if known else 'not found'}",
                           kind="not_found_error" if not known else "invalid_request_error")
        except ApiError as e:
            self.send_json(e.status, e.body())
        except BadInput as e:
            self.send_json(400, ApiError(400, str(e)).body())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # a bug in minipeft: the traceback stays here
            traceback.print_exc(file=sys.stderr)
            self.send_json(500, ApiError(500, f"internal error: {type(e).__name__}", "server_error").body())

    def read_json(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True  # the body stays unread
            raise ApiError(413, f"the body is {length} bytes; at most {MAX_BODY}")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body should be a JSON object")
        return body

    def answer(self, result):
        if isinstance(result, Download):
            return self.send(200, result.content, result.content_type,
                             {"Content-Disposition": f'attachment; filename="{result.file_name}"'})
        if not isinstance(result, Reply):
            return self.send_json(200, result)
        try:
            if not result.stream:
                return self.send_json(200, result.whole(lambda: self.next_event(result)))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the stream ends with the connection
            self.end_headers()
            self.close_connection = True
            try:
                for chunk in result.chunks(lambda: self.next_event(result)):
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
            except ApiError as e:  # the headers are gone: the error goes as an event
                self.wfile.write(f"data: {json.dumps(e.body())}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        finally:
            result.cancel()  # ended streams ignore it; the others leave the batch

    def next_event(self, reply: Reply):
        """The next event of a reply's streams; while waiting, check the client is still there."""
        while True:
            try:
                return reply.events.get(timeout=0.25)
            except queue.Empty:
                if client_gone(self.connection):
                    raise ConnectionResetError("the client went away")

    def send_json(self, status: int, body: dict):
        self.send(status, json.dumps(body).encode(), "application/json")

    def send(self, status: int, content: bytes, kind: str, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(content)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(content)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    quiet = False


def make_server(api: Api, host: str, port: int, quiet=False) -> Server:
    handler = type("BoundHandler", (Handler,), {"api": api})
    server = Server((host, port), handler)
    server.quiet = quiet
    return server
