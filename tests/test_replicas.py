"""Two `hepatoquant serve` replicas on loopback sharing one models folder, and the Python client given both:
submissions spread round-robin, every later call of a job reaches the replica holding it, results are what one
server gives, and a replica asked about another's job answers a clear NOT_FOUND, never a wrong result."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hepatoquant_client import Client, NotFoundError
from hepatoquant_client.client import replica_addresses

from hepatoquant.model_pack import ensure_demo_pack
from hepatoquant.service.engine import ServerConfig
from hepatoquant.service.server import start_server

SLIDES = ["s1.tiff", "s2.tiff", "s3.tiff", "s4.tiff"]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, synthetic_slide: Path):
    base = tmp_path_factory.mktemp("replicas")
    root = base / "slides"
    root.mkdir()
    for name in SLIDES:
        shutil.copy(synthetic_slide, root / name)
    models = base / "models"  # one models folder for both, as on a shared volume
    ensure_demo_pack(models, encoder="test_vit_micro")
    servers = [start_server(ServerConfig(slide_roots=(root.resolve(),), state_dir=base / f"state{i}", models_dir=models),
                            host="127.0.0.1", grpc_port=0, http_host="127.0.0.1", http_port=0) for i in range(2)]
    yield [f"127.0.0.1:{s.grpc_port}" for s in servers]
    for server in servers:
        server.stop(grace_seconds=1)


def test_round_robin_over_replicas_gives_the_single_server_results(replicas: list[str]) -> None:
    with Client(",".join(replicas)) as both, Client(replicas[0]) as single:
        outcomes = {name: both.analyze(name, omit_tiles=True) for name in SLIDES}
        reference = single.analyze(SLIDES[0], omit_tiles=True, tile_size_px=149)  # a request no replica has seen
    per_replica = []
    for target in replicas:
        with Client(target) as one:
            per_replica.append({job.job_id for job in one.jobs()})
    assert [len(ids) for ids in per_replica] == [3, 2]  # 4 round-robin submissions, plus the reference on the first
    assert not per_replica[0] & per_replica[1]  # job ids are unique across replicas
    counts = {name: [(r.region_class, r.tile_count) for r in o.region_classes] for name, o in outcomes.items()}
    assert len({tuple(c) for c in counts.values()}) == 1  # four copies of one slide: one answer, whichever replica
    assert reference.region_classes[0].tile_count != 0
    with Client(",".join(replicas)) as both:
        assert {j.job_id for j in both.jobs()} == per_replica[0] | per_replica[1]  # listing covers every replica


def test_a_job_is_found_on_its_replica_and_not_on_another(replicas: list[str]) -> None:
    with Client(replicas[1]) as second:
        job_id = second.submit(SLIDES[1], omit_tiles=True, tile_size_px=151)
        second.watch(job_id)
    with Client(replicas[0]) as first, pytest.raises(NotFoundError, match="replica that accepted it"):
        first.result(job_id)
    with Client(",".join(replicas)) as both:  # a job id from elsewhere: the client finds the replica holding it
        assert both.result(job_id).job_id == job_id


def test_replica_targets() -> None:
    assert replica_addresses("h:1") == [("h:1", "h")]
    assert replica_addresses("ipv4:10.0.0.1:5,10.0.0.2:5") == [("10.0.0.1:5", "10.0.0.1"), ("10.0.0.2:5", "10.0.0.2")]
    assert replica_addresses("dns:///localhost:50051")[0][1] == "localhost"
