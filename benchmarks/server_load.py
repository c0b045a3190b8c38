"""Issue 19's load benchmark: one `hepatoquant serve` on loopback under many and hostile clients, bounded in time.

Phases (each measures gRPC and HTTP health latency every 50 ms while it runs):
1. baseline: nothing else;
2. watchers: 500 concurrent WatchJob streams (grpc.aio client, 10 channels) on jobs that 4 submitting clients
   keep adding;
3. idle and slow: 100 idle TCP connections to each port and 20 HTTP clients that send half a request header;
4. hostile tiles: 6 concurrent ClassifyTiles of a 0.4 MB PNG that decodes to 12,000 x 12,000 px, then 6 streams
   of 20 normal 224 px tiles; the server's peak memory (VmHWM) before and after.

The load's clients run in this process (at nice 15 from phase 2 on: in a lab they run on other machines), the
health probe in a process of its own at normal priority. Prints a table and writes JSON (--out). Usage: python benchmarks/server_load.py [--watchers 500] [--out F]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import multiprocessing
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hepatoquant_client.proto import pb, pb_grpc
from PIL import Image

from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.synthetic import write_synthetic_slide

SERVING_LINE = re.compile(r"gRPC port (\d+), HTTP/JSON port (\d+)")


class HealthProbe:
    """Health over gRPC and HTTP every ``interval`` seconds, in a process of its own (so that the load this
    benchmark generates does not delay the probe's own clock); latencies in ms per transport."""

    def __init__(self, grpc_port: int, http_port: int, interval: float = 0.05) -> None:
        self.grpc_port, self.http_port, self.interval = grpc_port, http_port, interval
        self.samples: dict[str, list[float]] = {"grpc": [], "http": []}
        self.failures = {"grpc": 0, "http": 0}
        context = multiprocessing.get_context("spawn")
        self._stop, self._ready = context.Event(), context.Event()
        self._results = context.Queue()
        self._process = context.Process(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._process.start()
        if not self._ready.wait(60):
            raise RuntimeError("the health probe process did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.samples, self.failures = self._results.get(timeout=60)
        self._process.join(10)

    def _run(self) -> None:
        self._measure()
        self._results.put((self.samples, self.failures))

    def _measure(self) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)])
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=30)  # connected before the phase starts
        gc.freeze()  # the probe is the clock: none of its own collections (0.2 s with torch imported) in a sample
        gc.disable()
        self._ready.set()
        while not self._stop.wait(self.interval):
            started = time.perf_counter()
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                self.samples["grpc"].append(1000 * (time.perf_counter() - started))
            except grpc.RpcError:
                self.failures["grpc"] += 1
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=5) as reply:
                    reply.read()
                self.samples["http"].append(1000 * (time.perf_counter() - started))
            except OSError:
                self.failures["http"] += 1
        channel.close()

    def summary(self) -> dict:
        out = {}
        for transport, values in self.samples.items():
            ordered = sorted(values) or [float("nan")]
            out[transport] = {"n": len(values), "failed": self.failures[transport],
                              "p50_ms": round(statistics.median(ordered), 2),
                              "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2),
                              "max_ms": round(ordered[-1], 2)}
        return out


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _watchers(port: int, count: int, seconds: float) -> dict:
    """``count`` WatchJob streams over 10 channels, re-opened on new jobs as jobs end, for ``seconds``;
    4 submitters add a small job every 0.5 s each."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(10)]
    stubs = [pb_grpc.HepatoQuantStub(c) for c in channels]
    deadline = time.monotonic() + seconds
    jobs: list[str] = []
    counters: dict = {"events": 0, "submitted": 0, "streams_opened": 0, "submit_errors": {}, "watch_errors": {}}

    def tally(kind: str, error: grpc.aio.AioRpcError) -> None:
        counters[kind][error.code().name] = counters[kind].get(error.code().name, 0) + 1

    async def submitter(index: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            fraction = 0.2 + 0.001 * (index * 150 + n % 150)  # distinct requests: new jobs, not reused results
            try:
                job = await stubs[index].SubmitAnalysis(pb.AnalysisRequest(
                    slide="bench.tiff", tile_size_px=64, omit_tiles=True, min_tissue_fraction=fraction), timeout=10)
                jobs.append(job.job_id)
                counters["submitted"] += 1
            except grpc.aio.AioRpcError as error:
                tally("submit_errors", error)
            n += 1
            await asyncio.sleep(0.5)

    async def watcher(index: int) -> None:
        while time.monotonic() < deadline:
            if not jobs:
                await asyncio.sleep(0.1)
                continue
            call = stubs[index % 10].WatchJob(pb.WatchJobRequest(job_id=jobs[-1]), timeout=max(1, deadline - time.monotonic()))
            counters["streams_opened"] += 1
            try:
                async for _ in call:
                    counters["events"] += 1
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # the phase's end, not an error
                    tally("watch_errors", error)

    await asyncio.gather(*(submitter(i) for i in range(4)), *(watcher(i) for i in range(count)))
    for channel in channels:
        await channel.close()
    return counters


def _hostile_tiles(port: int) -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (12_000, 12_000), (230, 180, 200)).save(buffer, format="PNG", optimize=True)
    bomb = buffer.getvalue()
    buffer = io.BytesIO()
    Image.new("RGB", (224, 224), (200, 120, 180)).save(buffer, format="PNG")
    tile = buffer.getvalue()
    outcomes: list[str] = []

    def send(images: list[bytes]) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1),
                                                                       ("grpc.max_send_message_length", -1)])
        try:
            list(pb_grpc.HepatoQuantStub(channel).ClassifyTiles(iter([pb.TileBatch(images=images)]), timeout=120))
            outcomes.append("OK")
        except grpc.RpcError as error:
            outcomes.append(error.code().name)
        finally:
            channel.close()

    threads = [threading.Thread(target=send, args=([bomb],)) for _ in range(6)]
    threads += [threading.Thread(target=send, args=([tile] * 20,)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return {"bomb_bytes": len(bomb), "outcomes": sorted(outcomes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watchers", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the watcher phase")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="hq-server-load-"))
    slides = work / "slides"
    slides.mkdir()
    write_synthetic_slide(slides / "bench.tiff")
    ensure_demo_pack(work / "models", encoder="test_vit_micro")
    command = [sys.executable, "-m", "hepatoquant.cli", "--models-dir", str(work / "models"), "serve",
               "--slide-root", str(slides), "--state-dir", str(work / "state"), "--host", "127.0.0.1", "--port", "0",
               "--http-host", "127.0.0.1", "--http-port", "0", "--device", "cpu", "--seg-model", "none",
               "--max-queued", "1000"]
    log = (work / "serve.log").open("wb")
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    results: dict = {"watchers": args.watchers}
    try:
        grpc_port, http_port = map(int, SERVING_LINE.search(server.stdout.readline()).groups())
        results["rss_start_mib"] = round(_rss_mib(server.pid), 1)

        with HealthProbe(grpc_port, http_port) as probe:
            time.sleep(3)
        results["baseline"] = probe.summary()

        with HealthProbe(grpc_port, http_port) as probe:
            # The load's clients run here, on the server's cores; in a lab they are other machines. At nice 15
            # they take what CPU is left instead of delaying the server (the probe keeps normal priority).
            os.setpriority(os.PRIO_PROCESS, 0, 15)
            results["watch_load"] = asyncio.run(_watchers(grpc_port, args.watchers, args.seconds))
        results["watchers_phase"] = probe.summary()

        idle = [socket.create_connection(("127.0.0.1", port)) for port in (grpc_port, http_port) for _ in range(100)]
        slow = []
        for _ in range(20):
            connection = socket.create_connection(("127.0.0.1", http_port))
            connection.sendall(b"POST /v1/GetServerInfo HTTP/1.1\r\nHost: x\r\n")
            slow.append(connection)
        with HealthProbe(grpc_port, http_port) as probe:
            time.sleep(5)
        results["idle_and_slow_phase"] = probe.summary()
        for connection in idle + slow:
            connection.close()

        results["peak_rss_before_tiles_mib"] = round(_peak_rss_mib(server.pid), 1)
        with HealthProbe(grpc_port, http_port) as probe:
            results["hostile_tiles"] = _hostile_tiles(grpc_port)
        results["hostile_tiles_phase"] = probe.summary()
        results["peak_rss_after_tiles_mib"] = round(_peak_rss_mib(server.pid), 1)
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    log_text = (work / "serve.log").read_text()
    results["log_lines"] = len(log_text.splitlines())
    results["log_tracebacks"] = log_text.count("Traceback")
    shutil.rmtree(work, ignore_errors=True)

    print(f"{'phase':<22} {'transport':<9} {'n':>6} {'failed':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for phase in ("baseline", "watchers_phase", "idle_and_slow_phase", "hostile_tiles_phase"):
        for transport, row in results[phase].items():
            print(f"{phase:<22} {transport:<9} {row['n']:>6} {row['failed']:>6} {row['p50_ms']:>8} "
                  f"{row['p99_ms']:>8} {row['max_ms']:>8}")
    print("watch load:", results["watch_load"])
    print("hostile tiles:", results["hostile_tiles"], f"peak RSS {results['peak_rss_before_tiles_mib']} -> "
          f"{results['peak_rss_after_tiles_mib']} MiB")
    print(f"server log: {results['log_lines']} lines, {results['log_tracebacks']} tracebacks")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
