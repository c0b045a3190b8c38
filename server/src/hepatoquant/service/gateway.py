"""HTTP/JSON gateway: the same RPCs for clients without gRPC (QuPath's Groovy scripts: Java HttpClient + Gson).

Routes are derived from the service descriptor in the proto, and every call goes to the same servicer object
the gRPC server uses, so there is no second API to keep in step:

- ``POST /v1/<Method>`` with the request message as proto3 canonical JSON; the reply is the response message
  as JSON. ``WatchJob`` answers newline-delimited JSON (one ``JobEvent`` per line) until the job ends.
  ``ClassifyTiles`` takes one ``TileBatch`` and answers one ``TilePredictions``.
- ``GET /healthz`` answers the gRPC health service's status, ``{"status": "SERVING"}`` (no token needed, for
  container health checks).
- Errors: the HTTP status matching the gRPC code, body ``{"code": "NOT_FOUND", "message": "..."}``.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf import json_format, message_factory
from hepatoquant_client.proto import pb

from hepatoquant.errors import HepatoQuantError
from hepatoquant.service.security import check_bearer_token
from hepatoquant.service.status import status_name_for

__all__ = ["create_gateway", "serve_in_thread", "HTTP_STATUS_FOR_CODE"]

# gRPC status → HTTP status, as in Google's API design guide.
HTTP_STATUS_FOR_CODE = {
    "OK": 200, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499, "UNKNOWN": 500, "INTERNAL": 500, "DATA_LOSS": 500, "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
_SERVICE = pb.DESCRIPTOR.services_by_name["HepatoQuant"]


class _Abort(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Context:
    """The part of ``grpc.ServicerContext`` the servicer uses, for calls arriving over HTTP."""

    def __init__(self) -> None:
        self.active = True

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Abort(code.name, details)

    def is_active(self) -> bool:
        return self.active


def create_gateway(servicer, address: tuple[str, int], *, token: str | None, max_body_bytes: int,
                   tls: tuple[str, str] | None = None, health_status=lambda: "SERVING") -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) bound to ``address``; port 0 picks a free one.

    ``health_status()`` gives the gRPC health service's status name, which ``GET /healthz`` reports (200 when
    SERVING, 503 otherwise), so container health checks see what gRPC clients see.
    """
    methods = {m.name: m for m in _SERVICE.methods}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "HepatoQuant"

        def log_message(self, format: str, *args) -> None:  # quiet: the server logs requests itself
            return

        def _send_json(self, status: int, body: dict | str) -> None:
            data = (body if isinstance(body, str) else json.dumps(body)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _send_error(self, code: str, message: str) -> None:
            self._send_json(HTTP_STATUS_FOR_CODE.get(code, 500), {"code": code, "message": message})

        def do_GET(self) -> None:
            if self.path == "/healthz":
                status = health_status()
                self._send_json(200 if status == "SERVING" else 503, {"status": status})
            else:
                self._send_error("NOT_FOUND", f"no route GET {self.path}; use GET /healthz or POST /v1/<Method>")

        def do_POST(self) -> None:
            name = self.path.removeprefix("/v1/") if self.path.startswith("/v1/") else None
            method = methods.get(name or "")
            if method is None:
                self._send_error(
                    "NOT_FOUND", f"no route POST {self.path}; methods: {', '.join('/v1/' + m for m in methods)}"
                )
                return
            try:
                check_bearer_token(self.headers.get("Authorization"), token)
                length = int(self.headers.get("Content-Length") or 0)
                if length > max_body_bytes:
                    self.close_connection = True  # the unread body must not be taken for the next request
                    raise _Abort("RESOURCE_EXHAUSTED", f"request body of {length} bytes exceeds {max_body_bytes}")
                body = self.rfile.read(length).decode() if length else "{}"
                request = json_format.Parse(body or "{}", message_factory.GetMessageClass(method.input_type)())
            except HepatoQuantError as exc:
                self._send_error(status_name_for(exc), str(exc))
                return
            except json_format.ParseError as exc:
                self._send_error("INVALID_ARGUMENT", f"request body is not a valid {method.input_type.name} ({exc})")
                return
            except _Abort as exc:
                self._send_error(exc.code, exc.message)
                return
            self._call(method, request)

        def _call(self, method, request) -> None:
            context = _Context()
            handler = getattr(servicer, method.name)
            try:
                if method.client_streaming:
                    responses: Iterator = handler(iter([request]), context)
                    self._send_json(200, json_format.MessageToJson(next(iter(responses))))
                elif method.server_streaming:
                    self._stream(handler(request, context), context)
                else:
                    self._send_json(200, json_format.MessageToJson(handler(request, context)))
            except _Abort as exc:
                self._send_error(exc.code, exc.message)

        def _stream(self, responses: Iterator, context: _Context) -> None:
            first = next(responses)  # errors before the first message still get a proper status
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for message in _chain(first, responses):
                    line = (json_format.MessageToJson(message, indent=None) + "\n").encode()
                    self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                context.active = False
                return
            except _Abort as exc:  # the stream already started: report the error as its last line
                line = (json.dumps({"code": exc.code, "message": exc.message}) + "\n").encode()
                self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile=tls[0], keyfile=tls[1])
        server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def serve_in_thread(server: ThreadingHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="http-gateway", daemon=True)
    thread.start()
    return thread
