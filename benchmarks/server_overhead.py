"""Server overhead: the same work through the gRPC server and in-process, in one run.

1. A generated slide analysed through the server (SubmitAnalysis → WatchJob → GetResult, loopback) against
   ``analyze_slide`` + ``write_outputs`` in this process; same model, batch, threads. Target: at most 1.05.
2. ``ClassifyTiles`` streaming (PNG tiles, batches of 32) against in-process classification of the same
   decoded tiles (``predict_batches``), as tiles per second.

Usage: python benchmarks/server_overhead.py [--size 8192] [--tiles 512] [--model demo]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import torch
from hepatoquant_client.proto import pb, pb_grpc

from hepatoquant.analysis import AnalysisOptions, analyze_slide
from hepatoquant.classify import choose_device, load_classifier, predict_batches
from hepatoquant.pack_lookup import resolve_model_pack
from hepatoquant.outputs import write_outputs
from hepatoquant.service.engine import ServerConfig
from hepatoquant.service.server import start_server
from hepatoquant.synthetic import SyntheticSlideSpec, write_synthetic_slide
from hepatoquant.tile_reader import TileBatch
from hepatoquant.tiling import TileSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--tiles", type=int, default=512, help="tiles for the ClassifyTiles comparison")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pack = resolve_model_pack(args.model)
    device = choose_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "slides"
        slide = write_synthetic_slide(root / "bench.tiff", SyntheticSlideSpec(width_px=args.size, height_px=args.size))
        config = ServerConfig(slide_roots=(root,), state_dir=Path(tmp) / "state", models_dir=pack.path.parent,
                              default_model=pack.path.name)
        running = start_server(config, host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0)
        try:
            channel = grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}",
                                            options=[("grpc.max_receive_message_length", 256 * 2**20)])
            stub = pb_grpc.HepatoQuantStub(channel)

            in_process, through_server = [], []
            for repeat in range(args.repeats):  # alternating; the reuse cache is defeated by a changed threshold
                threshold = 0.5 + repeat / 1000
                started = time.perf_counter()
                result = analyze_slide(slide, pack, AnalysisOptions(tile=TileSpec(min_tissue_fraction=threshold)))
                write_outputs(result, Path(tmp) / "inprocess")
                in_process.append(time.perf_counter() - started)

                started = time.perf_counter()
                job = stub.SubmitAnalysis(pb.AnalysisRequest(slide="bench.tiff", min_tissue_fraction=threshold))
                for event in stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id)):
                    state = event.job.state
                reply = stub.GetResult(pb.GetResultRequest(job_id=job.job_id))
                through_server.append(time.perf_counter() - started)
                assert state == pb.JOB_STATE_SUCCEEDED and reply.region_classes[0].tile_count == len(result.grid)
            tiles = len(result.grid)
            in_process_s, server_s = statistics.median(in_process), statistics.median(through_server)
            print(f"model {pack.name} ({pack.encoder_name}), device {device}, torch threads {torch.get_num_threads()}")
            print(f"1. {args.size} px slide, {tiles} tiles: in-process {in_process_s:.2f} s "
                  f"(runs {', '.join(f'{t:.2f}' for t in in_process)}), through the server {server_s:.2f} s "
                  f"(runs {', '.join(f'{t:.2f}' for t in through_server)}); ratio {server_s / in_process_s:.3f} of "
                  f"medians, {min(through_server) / min(in_process):.3f} of the best runs (target <= 1.05)")

            rng = np.random.default_rng(0)
            size = pack.tile_size_px
            tiles_rgb = rng.integers(120, 255, (args.tiles, size, size, 3), dtype=np.uint8)
            encoded = [cv2.imencode(".png", t)[1].tobytes() for t in tiles_rgb]
            model = load_classifier(pack, device)
            resized = np.stack([cv2.resize(t, (pack.input_size_px,) * 2) for t in tiles_rgb])
            started = time.perf_counter()
            for _ in predict_batches(model, [TileBatch(i, resized[i : i + 32]) for i in range(0, len(resized), 32)], device):
                pass
            in_process_tps = args.tiles / (time.perf_counter() - started)
            batches = [pb.TileBatch(images=encoded[i : i + 32], mpp_um_px=pack.spacing_um_px)
                       for i in range(0, len(encoded), 32)]
            started = time.perf_counter()
            count = sum(len(r.predictions) for r in stub.ClassifyTiles(iter(batches)))
            stream_tps = count / (time.perf_counter() - started)
            print(f"2. ClassifyTiles, {count} PNG tiles of {size} px in batches of 32: {stream_tps:.1f} tiles/s; "
                  f"in-process on decoded tiles {in_process_tps:.1f} tiles/s; ratio {stream_tps / in_process_tps:.3f}")
            channel.close()
        finally:
            running.stop(grace_seconds=1)
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
