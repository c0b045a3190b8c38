"""`hepatoquant serve`: the gRPC server (with health and reflection) and the HTTP/JSON gateway in one process.

Both run on one asyncio event loop in a thread of their own: gRPC on ``grpc.aio``, the gateway on uvicorn. A call
that waits (a job's next change, a slow or silent client, a TLS handshake) holds no thread; the engine's blocking
work runs in a bounded pool. Limits answer instead of hanging: at most ``max_concurrent_rpcs`` calls at once and
``max_streams_per_client`` open streams per connection (RESOURCE_EXHAUSTED), messages up to
``max_message_bytes``, HTTP connections up to ``http_max_connections`` (503), idle HTTP connections closed after
``http_idle_seconds``. Health is NOT_SERVING on both ports while the engine reports a problem.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from hepatoquant_client.proto import SERVICE_NAME, pb_grpc

from hepatoquant.errors import HepatoQuantError
from hepatoquant.heap import freeze_long_lived
from hepatoquant.service import logs
from hepatoquant.service.engine import ServerConfig, ServerEngine
from hepatoquant.service.gateway import IdleClosingH11Protocol, create_gateway
from hepatoquant.service.security import check_bearer_token
from hepatoquant.service.servicer import HepatoQuantServicer, JobEvents

__all__ = ["RunningServer", "serve_until_signalled", "start_server"]

log = logging.getLogger("hepatoquant.server")
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_START_SECONDS = 60
_POOL_ANSWER_SECONDS = 5.0  # health is NOT_SERVING when the request pool takes longer than this to run a check


class _Gatekeeper(grpc.aio.ServerInterceptor):
    """Around every RPC: the bearer token (all but health checks), the per-connection stream limit, and one
    log line when the call ends (method, peer, status, duration, job id)."""

    def __init__(self, token: str | None, max_streams_per_client: int) -> None:
        self._token = token
        self._max_streams = max_streams_per_client
        self._streams: collections.Counter[str] = collections.Counter()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        denied = None
        if self._token is not None and not method.startswith(_HEALTH_PREFIX):
            metadata = dict(details.invocation_metadata or ())
            try:
                check_bearer_token(metadata.get("authorization"), self._token)
            except HepatoQuantError as exc:
                denied = str(exc)
        name = method.rsplit("/", 1)[-1]
        streaming = handler.response_streaming or handler.request_streaming
        if handler.response_streaming:
            wrap, make = self._stream_behavior, (grpc.stream_stream_rpc_method_handler if handler.request_streaming
                                                 else grpc.unary_stream_rpc_method_handler)
            behavior = handler.stream_stream or handler.unary_stream
        else:
            wrap, make = self._unary_behavior, (grpc.stream_unary_rpc_method_handler if handler.request_streaming
                                                else grpc.unary_unary_rpc_method_handler)
            behavior = handler.stream_unary or handler.unary_unary
        return make(wrap(behavior, name, denied, streaming), request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    async def _admit(self, context, name: str, denied: str | None, streaming: bool) -> None:
        if denied is not None:
            logs.auth_denied("grpc", context.peer(), name)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, denied)
        if streaming and self._streams[context.peer()] >= self._max_streams:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this connection already has {self._max_streams} open streams; close some before "
                                "opening another")

    def _unary_behavior(self, behavior, name: str, denied: str | None, streaming: bool):
        async def call(request, context):
            started, status, reply = time.perf_counter(), "OK", None
            try:
                await self._admit(context, name, denied, streaming)
                reply = await behavior(request, context)
                return reply
            except BaseException as exc:
                status = _status_of(exc, context)
                raise
            finally:
                job = getattr(reply, "job_id", "") or getattr(request, "job_id", "")
                logs.request_line("grpc", name, context.peer(), status, time.perf_counter() - started, job)

        return call

    def _stream_behavior(self, behavior, name: str, denied: str | None, streaming: bool):
        async def call(request, context):
            started, status, peer, counted = time.perf_counter(), "OK", context.peer(), False
            try:
                await self._admit(context, name, denied, streaming)
                self._streams[peer] += 1
                counted = True
                async for reply in behavior(request, context):
                    yield reply
            except BaseException as exc:
                status = _status_of(exc, context)
                raise
            finally:
                if counted:
                    self._streams[peer] -= 1
                    if self._streams[peer] <= 0:
                        del self._streams[peer]
                logs.request_line("grpc", name, peer, status, time.perf_counter() - started,
                                  getattr(request, "job_id", ""))

        return call


def _status_of(exc: BaseException, context) -> str:
    """The status a call ended with: an abort's code; CANCELLED when the client went away; INTERNAL (logged
    with its traceback, once) for anything else."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # the client went away mid-call
        return "CANCELLED"
    code = context.code() if callable(getattr(context, "code", None)) else None
    if code is not None and code != grpc.StatusCode.OK:
        return code.name
    log.error("internal error in an RPC", exc_info=exc)
    return "INTERNAL"


@dataclass
class RunningServer:
    engine: ServerEngine
    grpc_port: int
    http_port: int
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _serving: _Serving

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop taking requests, interrupt the running job cleanly, close the ports."""
        future = asyncio.run_coroutine_threadsafe(self._serving.stop(grace_seconds), self._loop)
        future.result(grace_seconds + 60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class _Serving:
    """Everything that lives on the event loop: the gRPC server, the gateway, health and its monitor."""

    def __init__(self, engine: ServerEngine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.pool = ThreadPoolExecutor(max_workers=config.rpc_threads, thread_name_prefix="hepatoquant-rpc")
        self.health = health.aio.HealthServicer()
        self.health_status = "NOT_SERVING"  # what /healthz says; set with the gRPC status by _set_health

    async def start(self, host: str, grpc_port: int, http_host: str, http_port: int,
                    tls: tuple[str, str] | None) -> tuple[int, int]:
        config = self.config
        self.events = JobEvents(self.engine)
        self.events.start()
        servicer = HepatoQuantServicer(self.engine, self.pool, self.events)
        self.grpc = grpc.aio.server(
            interceptors=[_Gatekeeper(config.token, config.max_streams_per_client)],
            options=[("grpc.max_receive_message_length", config.max_message_bytes),
                     ("grpc.max_send_message_length", config.max_message_bytes),
                     # a connection has this long for its TLS and HTTP/2 handshake (gRPC's default: 120 s)
                     ("grpc.server_handshake_timeout_ms", int(1000 * config.handshake_seconds))],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        )
        pb_grpc.add_HepatoQuantServicer_to_server(servicer, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc,
        )
        address = f"{host}:{grpc_port}"
        if tls is not None:
            credentials = grpc.ssl_server_credentials([(Path(tls[1]).read_bytes(), Path(tls[0]).read_bytes())])
            bound_grpc = self.grpc.add_secure_port(address, credentials)
        else:
            bound_grpc = self.grpc.add_insecure_port(address)
        await self.grpc.start()
        await self._check_health()
        self.monitor = asyncio.get_running_loop().create_task(self._monitor())

        app = create_gateway(servicer, token=config.token, max_body_bytes=config.max_message_bytes,
                             health_status=lambda: self.health_status)
        family = socket.AF_INET6 if ":" in http_host.strip("[]") else socket.AF_INET
        sock = socket.create_server((http_host.strip("[]"), http_port), family=family, backlog=1024)
        self.http = uvicorn.Server(uvicorn.Config(
            app, http=IdleClosingH11Protocol, ws="none", lifespan="off", log_config=None, access_log=False,
            timeout_keep_alive=config.http_idle_seconds, limit_concurrency=config.http_max_connections,
            ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None,
            timeout_graceful_shutdown=5,
        ))
        self.http_task = asyncio.get_running_loop().create_task(self.http.serve(sockets=[sock]))
        while not self.http.started:
            if self.http_task.done():
                self.http_task.result()  # raises what stopped it
            await asyncio.sleep(0.01)
        return bound_grpc, sock.getsockname()[1]

    async def _check_health(self) -> None:
        check = asyncio.get_running_loop().run_in_executor(self.pool, self.engine.serving_problem)
        try:
            problem = await asyncio.wait_for(check, timeout=_POOL_ANSWER_SECONDS)
        except asyncio.TimeoutError:  # every thread of the pool is busy: calls would queue, not be answered
            problem = f"the server's {self.config.rpc_threads} request threads did not answer within " \
                      f"{_POOL_ANSWER_SECONDS:g} s"
        status = "NOT_SERVING" if problem else "SERVING"
        if status != self.health_status:
            if problem:
                log.warning("health=NOT_SERVING reason=%s", problem)
            elif self.health_status == "NOT_SERVING" and hasattr(self, "monitor"):
                log.info("health=SERVING (recovered)")
            for name in ("", SERVICE_NAME):
                await self.health.set(name, health_pb2.HealthCheckResponse.ServingStatus.Value(status))
            self.health_status = status

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._check_health()
            except Exception:  # noqa: BLE001 - a failing check must not end the monitor
                log.exception("health check failed")

    async def stop(self, grace_seconds: float) -> None:
        self.monitor.cancel()
        await self.health.enter_graceful_shutdown()
        self.health_status = "NOT_SERVING"
        self.http.should_exit = True
        await self.http_task
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)  # interrupts the running job
        await self.grpc.stop(grace_seconds)
        await self.events.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


class _ServingLoop(asyncio.SelectorEventLoop):
    """The serving thread's event loop. Servers it starts with TLS give a client ``handshake_seconds`` to finish
    the TLS handshake: asyncio's default, which uvicorn keeps (it has no option for it), is 60 s, and until the
    handshake ends a connection is outside uvicorn's connection limit, so silent clients could pile up."""

    def __init__(self, handshake_seconds: float) -> None:
        super().__init__()
        self._handshake_seconds = handshake_seconds

    async def create_server(self, *args, **kwargs):
        if kwargs.get("ssl") is not None:
            kwargs.setdefault("ssl_handshake_timeout", self._handshake_seconds)
        return await super().create_server(*args, **kwargs)


def start_server(
    config: ServerConfig,
    *,
    host: str = "[::]",
    grpc_port: int = 50051,
    http_host: str = "0.0.0.0",
    http_port: int = 8080,
    tls: tuple[str, str] | None = None,
) -> RunningServer:
    """Start both servers (port 0 picks free ports) and the job workers; returns once they accept calls."""
    engine = ServerEngine(config)
    recovered = engine.start()
    if recovered:
        log.info("re-queued %d job(s) that had not started before the last stop", len(recovered))
    freeze_long_lived()  # what is loaded now lives as long as the server: out of every full collection's way
    loop = _ServingLoop(config.handshake_seconds)
    thread = threading.Thread(target=loop.run_forever, name="hepatoquant-serving", daemon=True)
    thread.start()
    serving = _Serving(engine, config)
    try:
        ports = asyncio.run_coroutine_threadsafe(serving.start(host, grpc_port, http_host, http_port, tls), loop)
        bound_grpc, bound_http = ports.result(_START_SECONDS)
    except BaseException:
        engine.stop()
        loop.call_soon_threadsafe(loop.stop)
        raise
    running = RunningServer(engine, bound_grpc, bound_http, loop, thread, serving)
    log.info("serving gRPC on port %d and HTTP/JSON on port %d; slide roots: %s", bound_grpc, bound_http,
             ", ".join(str(r) for r in config.slide_roots))
    return running


def serve_until_signalled(running: RunningServer) -> None:
    """Block until SIGTERM or SIGINT, then stop gracefully (a running job ends as interrupted, not corrupt)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    running.stop()
    log.info("stopped")
