"""The HTTP side, on the standard library alone (http.server), with every bound a caller could push on held
here. Nothing here knows a model: it reads JSON, calls api.py, and writes JSON, server-sent events, a zip or
the page's files.

    socket ─► a slot (≤ --max-connections; more: 503 and closed) ─► a worker thread from a pool
           ─► the request line, headers and body within --timeout seconds, however slowly they trickle (a reaper
              closes a connection past its deadline)
           ─► access.py: Host, Origin, API key, admin ─► the body: JSON, Content-Length digits only, ≤ --max-body,
              or chunked, read to the same bound ─► route (method, path) ─► Api ─► dict: JSON │ Reply: SSE │ a file
    a mistake ─► 4xx {"error": {"message", "type", "param", "code"}}; a bug ─► 500 with the same shape, the
    traceback on the server's stderr only. A body left unread closes the connection: it is never parsed as the
    next request. A client that hangs up stops its streams: the engine drops them next step.
"""

import json
import queue
import re
import select
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from ..errors import BadInput
from .access import Access, Refused
from .api import Api
from .shapes import ApiError, Download, Reply
from .limits import Limits

PAGE = Path(__file__).parent / "page"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
ROUTES = [  # (method, path pattern, Api method name); a pattern's group is the method's first argument
    ("GET", r"/v1/models", "models"), ("POST", r"/v1/completions", "completions"),
    ("POST", r"/v1/chat/completions", "chat_completions"), ("GET", r"/api/status", "status"),
    ("GET", r"/api/methods", "methods"), ("POST", r"/api/adapters", "add_adapter"),
    ("DELETE", r"/api/adapters/([^/]+)", "delete_adapter"), ("GET", r"/api/adapters/([^/]+)/download", "download"),
    ("POST", r"/api/tune", "tune"), ("GET", r"/api/tune/([^/]+)", "tune_job"),
    ("DELETE", r"/api/tune/([^/]+)", "cancel_tune"), ("GET", r"/health", "health"), ("GET", r"/metrics", "metrics")]
BUSY_BODY = json.dumps({"error": {"message": "too many connections (--max-connections); try again shortly",
                                   "type": "server_busy", "param": None, "code": None}}).encode()
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BUSY_BODY), BUSY_BODY))


def client_gone(connection) -> bool:
    """True once the client has closed its side: the socket reads as ready, with nothing to read. (poll, not
    select: select fails for descriptors from 1024 on.)"""
    try:
        poller = select.poll()
        poller.register(connection, select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(0)) and connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


def route_of(method: str, path: str):
    """(Api method name, the path's arguments), or an ApiError 404/405."""
    for route_method, pattern, name in ROUTES:
        match = re.fullmatch(pattern, path)
        if match and route_method == method:
            return name, match.groups()
    known = any(re.fullmatch(pattern, path) for _, pattern, _ in ROUTES)
    raise ApiError(405 if known else 404, f"{method} {path[:200]}: {'method not allowed' if known else 'not found'}",
                   kind="invalid_request_error" if known else "not_found_error")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: Api = None  # set by make_server
    access: Access = None
    limits: Limits = None

    def handle_one_request(self):
        self.server.reading(self, True)  # the reaper closes this connection if the request is not in on time
        self.body_read = self.body_tried = False
        self.status = 0  # the status sent, for /metrics
        try:
            super().handle_one_request()
        finally:
            self.server.reading(self, False)

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
        path, name, started = self.path.split("?")[0], "other", time.perf_counter()
        try:
            self.access.check_site(self.headers)
            if method == "GET" and path in STATIC:
                self.drain()
                file_name, kind = STATIC[path]
                return self.send(200, (PAGE / file_name).read_bytes(), kind)
            name, arguments = route_of(method, path)
            self.access.check(method, name, self.headers)
            body = self.read_json() if method == "POST" else self.drain()
            self.server.reading(self, False)  # the request is in: the reply may take as long as it takes
            return self.answer(getattr(self.api, name)(*arguments, body))
        except Refused as e:
            self.send_json(e.status, ApiError(e.status, str(e), "invalid_request_error", code=e.code).body())
        except ApiError as e:
            self.send_json(e.status, e.body())
        except BadInput as e:
            self.send_json(400, ApiError(400, str(e)).body())
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a bug in minipeft: the traceback stays here
            traceback.print_exc(file=sys.stderr)
            self.send_json(500, ApiError(500, f"internal error: {type(e).__name__}", "server_error").body())
        finally:
            self.api.observe(name, self.status, time.perf_counter() - started)

    def send_response(self, code, message=None):
        self.status = code
        super().send_response(code, message)

    def body_bytes(self) -> bytes:
        """The body as sent: by Content-Length (digits only) or chunked, at most --max-body bytes."""
        limit, self.body_tried = self.limits.max_body, True
        coding = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        lengths = self.headers.get_all("Content-Length") or []
        if coding and (coding != "chunked" or lengths):
            raise ApiError(400 if lengths else 501, f"Transfer-Encoding {coding[:40]!r}: only 'chunked', and "
                                                    f"never with Content-Length")
        if coding:
            return self.chunked(limit)
        if len(lengths) > 1 or lengths and not (lengths[0].isascii() and lengths[0].strip().isdigit()):
            raise ApiError(400, f"Content-Length {', '.join(lengths)[:40]!r}: expected one number of bytes")
        length = int(lengths[0]) if lengths else 0
        if length > limit:
            raise ApiError(413, f"the body is {length} bytes; at most {limit} (--max-body)")
        content = self.rfile.read(length)
        if len(content) < length:
            raise ConnectionResetError("the body ended early")
        self.body_read = True
        return content

    def chunked(self, limit: int) -> bytes:
        content = b""
        while True:
            size = self.rfile.readline(66).split(b";")[0].strip()
            if not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size):
                raise ApiError(400, "a chunked body with a malformed chunk size")
            size = int(size, 16)
            if len(content) + size > limit:
                raise ApiError(413, f"the body is over {limit} bytes (--max-body)")
            content += self.rfile.read(size)
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise ApiError(400, "a chunked body whose chunk does not end where its size says")
            if size == 0:
                self.body_read = True
                return content

    def drain(self):
        """A GET or DELETE: a body would be a mistake, and is read (within bounds) so it is not the next request."""
        self.body_bytes()

    def read_json(self) -> dict:
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"Content-Type {kind[:60]!r}: expected application/json")
        content = self.body_bytes()
        try:
            body = json.loads(content or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(400, f"the body is not JSON: {str(e)[:200]}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body should be a JSON object")
        return body

    def answer(self, result):
        if isinstance(result, Download):
            return self.send(200, result.content, result.content_type,
                             {"Content-Disposition": f'attachment; filename="{result.file_name}"'})
        if isinstance(result, str):  # Prometheus text
            return self.send(200, result.encode(), "text/plain; version=0.0.4; charset=utf-8")
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
        if not self.body_tried:  # refused before its body was read: read it now, within bounds, so the
            try:                 # connection can go on
                self.body_bytes()
            except (ApiError, OSError):
                pass
        if not self.body_read:  # what is left of its body must never be read as the next request
            self.close_connection = True
        self.send(status, json.dumps(body).encode(), "application/json")

    def send(self, status: int, content: bytes, kind: str, headers=None):
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(content)))
            if self.close_connection:
                self.send_header("Connection", "close")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(content)
        except (ConnectionError, TimeoutError):  # the client has gone: nothing to tell it
            self.close_connection = True


class Server(HTTPServer):
    """http.server with a bounded pool: at most max_connections sockets at once, each served by one of as many
    worker threads (started as needed, then reused); a reaper closes connections whose request is late."""
    quiet = False

    def __init__(self, address, handler, limits: Limits):
        super().__init__(address, handler)
        self.limits, self.slots = limits, threading.BoundedSemaphore(limits.max_connections)
        self.queue, self.lock, self.idle, self.workers, self.late = queue.SimpleQueue(), threading.Lock(), 0, 0, {}
        threading.Thread(target=self.reap, name="reaper", daemon=True).start()

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(BUSY)
            except OSError:
                pass
            return self.shutdown_request(request)
        with self.lock:
            if self.idle == 0:
                self.workers += 1
                threading.Thread(target=self.work, name=f"http-{self.workers}", daemon=True).start()
            else:
                self.idle -= 1
        self.queue.put((request, client_address))

    def work(self):
        while True:
            request, client_address = self.queue.get()
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)
                with self.lock:
                    self.idle += 1
                self.slots.release()

    def reading(self, handler, started: bool):
        with self.lock:
            if started:
                self.late[handler] = time.monotonic() + self.limits.timeout
            else:
                self.late.pop(handler, None)

    def reap(self):
        while True:
            time.sleep(min(1.0, self.limits.timeout / 4))
            now = time.monotonic()
            with self.lock:
                late = [h for h, deadline in self.late.items() if deadline < now]
            for handler in late:
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def make_server(api: Api, host: str, port: int, access: Access, limits: Limits, quiet=False) -> Server:
    handler = type("BoundHandler", (Handler,), {"api": api, "access": access, "limits": limits,
                                                "timeout": limits.timeout})
    server = Server((host, port), handler, limits)
    server.quiet = quiet
    return server
