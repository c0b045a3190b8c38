"""`hepatoquant serve`: the gRPC server (with health and reflection) and the HTTP/JSON gateway in one process."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from hepatoquant_client.proto import SERVICE_NAME, pb_grpc

from hepatoquant.errors import HepatoQuantError
from hepatoquant.service.engine import ServerConfig, ServerEngine
from hepatoquant.service.gateway import create_gateway, serve_in_thread
from hepatoquant.service.security import check_bearer_token
from hepatoquant.service.servicer import HepatoQuantServicer

__all__ = ["RunningServer", "start_server"]

log = logging.getLogger("hepatoquant.server")
_HEALTH_PREFIX = "/grpc.health.v1.Health/"


class _TokenInterceptor(grpc.ServerInterceptor):
    """Every RPC but the health check needs ``authorization: Bearer <token>`` when a token is configured."""

    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_HEALTH_PREFIX):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        try:
            check_bearer_token(metadata.get("authorization"), self._token)
        except HepatoQuantError as exc:
            message = str(exc)

            def deny(request_or_iterator, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            handler = continuation(handler_call_details)
            if handler is None:
                return None
            if handler.request_streaming and handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(deny)
            if handler.response_streaming:
                return grpc.unary_stream_rpc_method_handler(deny)
            if handler.request_streaming:
                return grpc.stream_unary_rpc_method_handler(deny)
            return grpc.unary_unary_rpc_method_handler(deny)
        return continuation(handler_call_details)


@dataclass
class RunningServer:
    engine: ServerEngine
    grpc_server: grpc.Server
    grpc_port: int
    http_server: object
    http_port: int
    health: health.HealthServicer
    health_monitor: HealthMonitor

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop taking requests, interrupt the running job cleanly, close the ports."""
        self.health_monitor.stop()
        self.health.enter_graceful_shutdown()
        self.http_server.shutdown()
        self.http_server.server_close()
        self.engine.stop()
        self.grpc_server.stop(grace_seconds).wait()


class HealthMonitor:
    """Keeps the health status true: NOT_SERVING (on gRPC and, through it, on HTTP ``/healthz``) while the
    engine reports a problem (a failing job store, a nearly full state disk), SERVING again once it clears.
    Checked every ``interval`` seconds on a thread of its own."""

    def __init__(self, engine: ServerEngine, servicer: health.HealthServicer, interval: float = 1.0) -> None:
        self._engine, self._servicer, self._interval = engine, servicer, interval
        self._stopped = threading.Event()
        self._problem: str | None = "starting"
        self.check()
        self._thread = threading.Thread(target=self._run, name="hepatoquant-health", daemon=True)
        self._thread.start()

    def check(self) -> None:
        problem = self._engine.serving_problem()
        status = health_pb2.HealthCheckResponse.NOT_SERVING if problem else health_pb2.HealthCheckResponse.SERVING
        if problem == self._problem:
            return
        for name in ("", SERVICE_NAME):
            self._servicer.set(name, status)
        if problem:
            log.warning("health=NOT_SERVING reason=%s", problem)
        elif self._problem != "starting":
            log.info("health=SERVING (recovered)")
        self._problem = problem

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a failing check must not end the monitor
                log.exception("health check failed")

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)


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
    servicer = HepatoQuantServicer(engine)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    interceptors = [_TokenInterceptor(config.token)] if config.token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=options, interceptors=interceptors)
    pb_grpc.add_HepatoQuantServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{grpc_port}"
    if tls is not None:
        credentials = grpc.ssl_server_credentials([(Path(tls[1]).read_bytes(), Path(tls[0]).read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    server.start()
    monitor = HealthMonitor(engine, health_servicer)
    def overall_health() -> str:
        reply = health_servicer.Check(health_pb2.HealthCheckRequest(service=""), None)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    gateway = create_gateway(servicer, (http_host, http_port), token=config.token,
                             max_body_bytes=config.max_message_bytes, tls=tls, health_status=overall_health)
    serve_in_thread(gateway)
    running = RunningServer(engine, server, port, gateway, gateway.server_address[1], health_servicer, monitor)
    log.info("serving gRPC on port %d and HTTP/JSON on port %d; slide roots: %s", port, running.http_port,
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
