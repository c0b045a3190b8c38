"""HTTP/JSON gateway: the same RPCs for clients without gRPC (QuPath's Groovy scripts: Java HttpClient + Gson).

Served by uvicorn (a maintained ASGI server: TLS, HTTP/1.1 parsing, chunked bodies, keep-alive and connection
limits) on the same event loop as the gRPC server. Routes are derived from the service descriptor in the proto,
and every call goes to the same servicer the gRPC server uses, so there is no second API to keep in step:

- ``POST /v1/<Method>`` with the request message as proto3 canonical JSON; the reply is the response message
  as JSON. ``WatchJob`` answers newline-delimited JSON (one ``JobEvent`` per line) until the job ends.
  ``ClassifyTiles`` takes one ``TileBatch`` and answers one ``TilePredictions``.
- ``GET /healthz`` answers the gRPC health service's status, ``{"status": "SERVING"}`` (no token needed, for
  container health checks).
- Errors: the HTTP status matching the gRPC code, body ``{"code": "NOT_FOUND", "message": "..."}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import h11
from google.protobuf import json_format, message_factory
from hepatoquant_client.proto import pb
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from hepatoquant.errors import HepatoQuantError
from hepatoquant.service import logs
from hepatoquant.service.security import check_bearer_token
from hepatoquant.service.status import status_name_for

__all__ = ["HTTP_STATUS_FOR_CODE", "BodyBudget", "IdleClosingH11Protocol", "create_gateway"]

# gRPC status → HTTP status, as in Google's API design guide.
HTTP_STATUS_FOR_CODE = {
    "OK": 200, "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499, "UNKNOWN": 500, "INTERNAL": 500, "DATA_LOSS": 500, "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
_SERVICE = pb.DESCRIPTOR.services_by_name["HepatoQuant"]


class IdleClosingH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, which also closes a connection that sends nothing at all for the keep-alive
    timeout (uvicorn starts that timer only after a first response: a silent socket stayed open for ever), and
    one whose request head is not complete that long after its first byte (uvicorn stops every timer at the
    first byte: a client trickling a header held its connection for ever, the slowloris attack)."""

    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete (or the connection is over)
            self._cancel_head_deadline()
        elif self._head_deadline is None and self.conn.trailing_data[0]:  # part of a head: from its first byte
            self._head_deadline = self.loop.call_later(self.timeout_keep_alive, self._head_too_slow)

    def on_response_complete(self) -> None:
        self._cancel_head_deadline()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            peer = "{}:{}".format(*self.client) if self.client else "-"
            logs.connection_closed("http", peer, f"request head not complete within {self.timeout_keep_alive:g} s")
            self.transport.close()


class _Abort(Exception):
    def __init__(self, code: str, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = http_status  # when not the code's usual one (413 for a body over the limit)


class _Context:
    """The part of ``grpc.aio.ServicerContext`` the servicer uses, for calls arriving over HTTP."""

    async def abort(self, code: grpc.StatusCode, details: str):
        raise _Abort(code.name, details)


def _json_response(body: dict | str, status: int = 200) -> Response:
    """JSON as the gateway has always written it: ``json.dumps`` text, or a message's ``MessageToJson``."""
    return Response(body if isinstance(body, str) else json.dumps(body), status_code=status,
                    media_type="application/json")


def _error(code: str, message: str, status: int | None = None) -> Response:
    return _json_response({"code": code, "message": message}, status or HTTP_STATUS_FOR_CODE.get(code, 500))


def _json(message) -> str:
    return json_format.MessageToJson(message, indent=None)


class BodyBudget:
    """Bytes of request bodies being read at once, over all connections: a body that would take the total past
    ``total`` is refused (RESOURCE_EXHAUSTED, 429), so many large uploads at once cannot take the server's
    memory (eight 60 MiB bodies once cost 0.8 GB)."""

    def __init__(self, total: int) -> None:
        self.total, self.in_use = total, 0

    @contextlib.contextmanager
    def reading(self) -> Iterator[Callable[[int], None]]:
        taken = 0

        def take(size: int) -> None:
            nonlocal taken
            if self.in_use + size > self.total:
                raise _Abort("RESOURCE_EXHAUSTED", "the server is reading too many large requests at once; send "
                             "this one again in a moment")
            self.in_use += size
            taken += size

        try:
            yield take
        finally:
            self.in_use -= taken


async def _body(request: Request, limit: int, take: Callable[[int], None]) -> bytearray:
    """The request body (Content-Length or chunked), refused once it passes ``limit`` bytes or the budget of
    bodies in flight (``take``): never read further than those allow."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Abort("RESOURCE_EXHAUSTED", f"request body of {declared} bytes exceeds this server's {limit}", 413)
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise _Abort("RESOURCE_EXHAUSTED", f"request body exceeds this server's {limit} bytes", 413)
        take(len(chunk))
        body += chunk
    return body


def create_gateway(servicer, *, token: str | None, max_body_bytes: int, body_budget_bytes: int | None = None,
                   health_status: Callable[[], str] = lambda: "SERVING") -> Starlette:
    """The ASGI app. ``health_status()`` gives the gRPC health service's status name, which ``GET /healthz``
    reports (200 when SERVING, 503 otherwise), so container health checks see what gRPC clients see."""
    methods = {m.name: m for m in _SERVICE.methods}
    budget = BodyBudget(body_budget_bytes or max_body_bytes)

    async def healthz(request: Request) -> Response:
        status = health_status()
        return _json_response({"status": status}, 200 if status == "SERVING" else 503)

    async def call(request: Request) -> Response:
        started = time.perf_counter()
        name = request.path_params["method"]
        response, code, job_id = await _answer(request, methods.get(name))
        logs.request_line("http", name, _peer(request), code, time.perf_counter() - started, job_id)
        return response

    async def _answer(request: Request, method) -> tuple[Response, str, str]:
        """The response, its status name and the job it concerns (for the request log line)."""
        if method is None:
            return _error("NOT_FOUND", f"no route POST {request.url.path}; methods: "
                          f"{', '.join('/v1/' + m for m in methods)}"), "NOT_FOUND", ""
        try:
            check_bearer_token(request.headers.get("authorization"), token)
            with budget.reading() as take:  # held while the body and what is parsed from it are in memory
                body = await _body(request, max_body_bytes, take)
                try:
                    text = body.decode("utf-8")
                except UnicodeDecodeError:
                    raise _Abort("INVALID_ARGUMENT", "the request body is not UTF-8 JSON") from None
                del body
                message = json_format.Parse(text or "{}", message_factory.GetMessageClass(method.input_type)())
                del text
                response, reply = await _dispatch(method, message)
            return response, "OK", getattr(reply, "job_id", "") or getattr(message, "job_id", "")
        except HepatoQuantError as exc:
            code = status_name_for(exc)
            if code == "UNAUTHENTICATED":
                logs.auth_denied("http", _peer(request), method.name)
            return _error(code, str(exc)), code, ""
        except json_format.ParseError as exc:
            return (_error("INVALID_ARGUMENT", f"request body is not a valid {method.input_type.name} ({exc})"),
                    "INVALID_ARGUMENT", "")
        except _Abort as exc:
            return _error(exc.code, exc.message, exc.http_status), exc.code, ""
        except ClientDisconnect:
            return Response(status_code=499), "CANCELLED", ""

    async def _dispatch(method, message) -> tuple[Response, object]:
        """The response, and the reply message for a unary answer (None for a stream)."""
        handler = getattr(servicer, method.name)
        context = _Context()
        if method.client_streaming:
            async def one() -> AsyncIterator:
                yield message

            replies = handler(one(), context)
            try:
                reply = await replies.__anext__()
            finally:
                await replies.aclose()
            return _json_response(json_format.MessageToJson(reply)), reply
        if method.server_streaming:
            events = handler(message, context)
            try:
                first = await events.__anext__()  # errors before the first message still get a proper status
            except BaseException:
                await events.aclose()
                raise
            return StreamingResponse(_lines(first, events), media_type="application/x-ndjson"), None
        reply = await handler(message, context)
        return _json_response(json_format.MessageToJson(reply)), reply

    return Starlette(routes=[Route("/healthz", healthz, methods=["GET"]),
                             Route("/v1/{method}", call, methods=["POST"])])


async def _lines(first, events: AsyncIterator) -> AsyncIterator[bytes]:
    """NDJSON lines; an error once the stream has started is its last line. A client that goes away cancels
    this generator (Starlette watches for the disconnect), which closes the servicer's stream."""
    try:
        yield (_json(first) + "\n").encode()
        async for message in events:
            yield (_json(message) + "\n").encode()
    except _Abort as exc:
        yield (json.dumps({"code": exc.code, "message": exc.message}) + "\n").encode()
    finally:
        await events.aclose()


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "-"
