"""The deployment files: Docker does not run here, so check what can be checked without it. Every YAML
parses; every endpoint one file names is a service and port another file opens; the generator's command
lines parse with our own CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from otel_tracegen.cli import _build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"
COLLECTOR = ROOT / "collector-config" / "collector.yaml"
TEMPO = ROOT / "docker" / "tempo.yaml"
GRAFANA = ROOT / "docker" / "grafana-datasources.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
JAEGER_OTLP_GRPC, JAEGER_UI = 4317, 16686  # Jaeger v2 all-in-one defaults (no config file of ours)


def load(p: Path) -> dict:
    data = yaml.safe_load(p.read_text())
    assert isinstance(data, dict), p
    return data


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1].split("/")[0])


def host_of(endpoint: str) -> str:
    return endpoint.split("://")[-1].rsplit(":", 1)[0]


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


def _opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_every_yaml_parses():
    for p in [*ROOT.joinpath("docker").glob("*.yaml"), *ROOT.joinpath("collector-config").glob("*.yaml")]:
        load(p)


def test_generator_command_parses_and_points_at_the_collector(compose):
    cmd = compose["services"]["tracegen"]["command"]
    args = _build_parser().parse_args(cmd)
    assert args.command == "generate" and args.otlp_insecure
    collector = load(COLLECTOR)
    grpc = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert host_of(args.otlp_endpoint) == "otel-collector" and "otel-collector" in compose["services"]
    assert port_of(args.otlp_endpoint) == port_of(grpc)
    # The image's default command is the same job.
    cmd_line = re.search(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), re.M).group(1)
    assert yaml.safe_load(cmd_line) == cmd
    assert re.search(r'^ENTRYPOINT \["otel-tracegen"\]$', DOCKERFILE.read_text(), re.M)


def test_collector_fans_out_to_jaeger_and_tempo_on_their_receiving_ports(compose):
    collector = load(COLLECTOR)
    tempo = load(TEMPO)
    receivers = {"jaeger": JAEGER_OTLP_GRPC,
                 "tempo": port_of(tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])}
    pipeline = collector["service"]["pipelines"]["traces"]
    assert set(pipeline["exporters"]) == {"otlp/jaeger", "otlp/tempo"}
    for name in pipeline["exporters"]:
        endpoint = collector["exporters"][name]["endpoint"]
        host = host_of(endpoint)
        assert host in compose["services"], endpoint
        assert port_of(endpoint) == receivers[host], endpoint
    for stage in ("receivers", "processors", "exporters"):
        for name in pipeline[stage]:
            assert name in collector[stage], f"pipeline names {stage[:-1]} {name} that is not configured"


def test_published_ports_and_datasources_agree(compose):
    services = compose["services"]
    published = {int(p.split(":")[1].split("/")[0]) for s in services.values() for p in s.get("ports", [])}
    tempo_http = load(TEMPO)["server"]["http_listen_port"]
    assert {4317, 4318, JAEGER_UI, tempo_http, 3000} <= published
    for ds in load(GRAFANA)["datasources"]:
        host, port = host_of(ds["url"]), port_of(ds["url"])
        assert host in services
        assert port == {"tempo": tempo_http, "jaeger": JAEGER_UI}[host]


def test_mounted_files_and_build_context_exist(compose):
    base = COMPOSE.parent
    build = compose["services"]["tracegen"]["build"]
    assert (base / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            assert (base / src).is_file(), vol
    for copied in re.findall(r"^COPY (.+) \./?\S*$", DOCKERFILE.read_text(), re.M):
        for name in copied.split():
            assert (ROOT / name).exists(), name


# --- the repairing pipeline: gateway -> infill replicas -> collector -----------------------------------------

INFILL_COMPOSE = ROOT / "docker" / "compose.infill.yaml"
GATEWAY = ROOT / "collector-config" / "infill-gateway.yaml"
INFILL = ROOT / "collector-config" / "infill.yaml"


def test_infill_replicas_parse_and_chain_gateway_to_collector(compose):
    from otel_tracegen.infill.command import config_from_args

    extra = load(INFILL_COMPOSE)["services"]
    gateway = load(GATEWAY)
    lb = gateway["exporters"]["loadbalancing"]
    assert lb["routing_key"] == "traceID"  # every span of a trace reaches the same replica
    hostnames = lb["resolver"]["static"]["hostnames"]
    replicas = [name for name, svc in extra.items() if svc.get("command", [None])[0] == "infill"]
    assert sorted(host_of(h) for h in hostnames) == sorted(replicas)
    collector_grpc = port_of(load(COLLECTOR)["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    for name in replicas:
        svc = extra[name]
        args = _build_parser().parse_args(svc["command"])
        mounted = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
        config_file = mounted[str(args.config)]
        assert (INFILL_COMPOSE.parent / config_file).resolve() == INFILL.resolve()
        args.config = INFILL  # read the file the container mounts
        config = config_from_args(args)
        for h in hostnames:
            if host_of(h) == name:
                assert port_of(h) == port_of(config.receiver_grpc)
        assert host_of(config.exporter_endpoint) == "otel-collector" and "otel-collector" in compose["services"]
        assert port_of(config.exporter_endpoint) == collector_grpc
        assert config.queue_directory in mounted  # the queue lives on a volume, so it survives a restart
    for stage in ("receivers", "processors", "exporters"):
        for n in gateway["service"]["pipelines"]["traces"][stage]:
            assert n in gateway[stage]
