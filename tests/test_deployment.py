"""The deployment files: Docker does not run here, so check what can be checked without it. Every YAML
parses; every endpoint one file names is a service and port another file opens; the commands parse with our own
CLI; every path a container is told about exists in its image (read from the Dockerfiles: COPY, WORKDIR,
mkdir), every service has a healthcheck that runs a program its image has, against the port its service serves;
volumes are owned by the image's user; the infill replicas, which listen on all interfaces, require a token that
the gateway sends."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml")

from otel_tracegen.cli import _build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
INFILL_COMPOSE = DOCKER / "compose.infill.yaml"
COLLECTOR = ROOT / "collector-config" / "collector.yaml"
GATEWAY = ROOT / "collector-config" / "infill-gateway.yaml"
INFILL = ROOT / "collector-config" / "infill.yaml"
TEMPO = DOCKER / "tempo.yaml"
GRAFANA = DOCKER / "grafana-datasources.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
JAEGER_OTLP_GRPC, JAEGER_UI = 4317, 16686  # Jaeger v2 all-in-one defaults (no config file of ours)
JAEGER_HEALTH = "/status"  # its healthcheckv2 extension (use_v2) on 13133, as Jaeger's all-in-one config sets it
JAEGER_HEALTH_PORT = 13133
TOKEN_VARIABLE = "OTEL_TRACEGEN_INFILL_TOKEN"

# What upstream images contain that a healthcheck may run. They are not built here, so this is what their own
# build files say: jaeger's base is Alpine (scripts/build/docker/base/Dockerfile: busybox wget); grafana's
# default image is Alpine with curl added for health checks (grafana/grafana#65547); the collector-contrib image
# is FROM scratch and tempo's is distroless: nothing to run, hence docker/probe.Dockerfile.
UPSTREAM_PROGRAMS = {
    "jaegertracing/jaeger": {"wget"},
    "grafana/grafana": {"curl"},
    "otel/opentelemetry-collector-contrib": set(),
    "grafana/tempo": set(),
}
PYTHON_IMAGE_PROGRAMS = {"python", "otel-tracegen"}  # python:*-slim, plus our console script


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


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    """Every service of the demo stack with the repairing pipeline added, as `docker compose -f ... -f ...`."""
    return {**load(COMPOSE)["services"], **load(INFILL_COMPOSE)["services"]}


@pytest.fixture
def token(monkeypatch) -> str:
    value = "test-token-" + "ab12" * 4
    monkeypatch.setenv(TOKEN_VARIABLE, value)
    return value


# --- what an image holds, read from its Dockerfile --------------------------------------------------------------


@dataclass
class Image:
    base: str
    programs: set[str] = field(default_factory=set)  # what a CMD healthcheck may run: on PATH, or absolute
    directories: dict[str, str | None] = field(default_factory=dict)  # made by the image -> owner "uid:gid"
    files: set[str] = field(default_factory=set)  # copied into the image
    user: str | None = None
    copied_from_context: list[str] = field(default_factory=list)  # sources of COPY without --from, all stages
    runs: list[str] = field(default_factory=list)  # RUN lines of the final stage


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, args = pending.strip().partition(" ")
        out.append((word.upper(), " ".join(args.split())))
        pending = ""
    return out


def image_of(service: dict) -> Image:
    if "image" in service:
        return Image(base=service["image"], programs=set(UPSTREAM_PROGRAMS[service["image"].split(":")[0]]))
    build = service["build"]
    dockerfile = (service["_dir"] / build["context"] / build["dockerfile"]).resolve()
    args = dict(build.get("args", {}))
    steps = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    image = Image(base="")
    for i, (word, rest) in enumerate(steps):
        if word == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args.setdefault(name, default)
        if word == "COPY" and not rest.startswith("--from"):
            image.copied_from_context.extend(shlex.split(rest)[:-1])
        if i < last_from:
            continue
        if word == "FROM":
            image.base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), rest.split()[0])
            repo = image.base.split(":")[0]
            image.programs |= PYTHON_IMAGE_PROGRAMS if repo == "python" else set(UPSTREAM_PROGRAMS[repo])
        elif word == "COPY":
            dest = shlex.split(rest)[-1]
            image.files.add(dest)
            image.programs.add(dest)
        elif word == "WORKDIR":
            image.directories[rest] = None
        elif word == "USER":
            image.user = rest
        elif word == "RUN":
            image.runs.append(rest)
            for made in re.findall(r"mkdir -p ((?:/\S+ ?)+)", rest):
                image.directories.update(dict.fromkeys(made.split()))
            for owner, paths in re.findall(r"chown (\d+:\d+) ((?:/\S+ ?)+)", rest):
                image.directories.update(dict.fromkeys(paths.split(), owner))
    return image


def with_dirs(services: dict[str, dict]) -> dict[str, dict]:
    """The services with the directory their compose file lies in (relative paths are relative to it)."""
    out = {}
    for path in (COMPOSE, INFILL_COMPOSE):
        for name, svc in load(path)["services"].items():
            out[name] = {**svc, "_dir": path.parent}
    assert out.keys() == services.keys()
    return out


def bind_mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts."""
    mounts = {}
    for vol in service.get("volumes", []):
        src, target = vol.split(":")[:2]
        if src.startswith("."):
            mounts[target] = (service["_dir"] / src).resolve()
    return mounts


def named_volumes(service: dict) -> dict[str, str]:
    """Container path -> volume name."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", []) if not v.startswith(".")}


def absolute_paths(argv: list[str]) -> list[str]:
    """Container paths an argv names: arguments that are paths, and --flag=/path values."""
    return [a.split("=", 1)[-1] for a in argv if a.split("=", 1)[-1].startswith("/")]


def healthcheck_url(test: list[str]) -> str:
    return next(u for u in re.findall(r"https?://[^\s'\"]+", " ".join(test)))


# --- the demo stack ------------------------------------------------------------------------------------------------


def test_every_yaml_parses():
    for p in [*DOCKER.glob("*.yaml"), *ROOT.joinpath("collector-config").glob("*.yaml")]:
        load(p)


def test_generator_command_parses_and_points_at_the_collector(compose):
    cmd = compose["services"]["tracegen"]["command"]
    args = _build_parser().parse_args(cmd)
    assert args.command == "generate" and args.otlp_insecure
    assert args.model is None  # the model inside the installed package, found by the code
    collector = load(COLLECTOR)
    grpc = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert host_of(args.otlp_endpoint) == "otel-collector" and "otel-collector" in compose["services"]
    assert port_of(args.otlp_endpoint) == port_of(grpc)
    # The image's default command is the same job.
    cmd_line = re.search(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    assert yaml.safe_load(cmd_line) == cmd
    assert re.search(r'^ENTRYPOINT \["otel-tracegen"\]$', DOCKERFILE.read_text(), re.MULTILINE)


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
    published = {int(p.split(":")[-2].split("/")[0]) for s in services.values() for p in s.get("ports", [])}
    tempo_http = load(TEMPO)["server"]["http_listen_port"]
    assert {4317, 4318, JAEGER_UI, tempo_http, 3000} <= published
    for ds in load(GRAFANA)["datasources"]:
        host, port = host_of(ds["url"]), port_of(ds["url"])
        assert host in services
        assert port == {"tempo": tempo_http, "jaeger": JAEGER_UI}[host]


def test_mounted_files_and_build_inputs_exist(services):
    for name, svc in with_dirs(services).items():
        for target, host in bind_mounts(svc).items():
            assert host.is_file(), f"{name}: {host} (mounted at {target}) does not exist"
        if "build" in svc:
            dockerfile = svc["_dir"] / svc["build"]["context"] / svc["build"]["dockerfile"]
            assert dockerfile.is_file(), name
            for src in image_of(svc).copied_from_context:
                assert (svc["_dir"] / svc["build"]["context"] / src).exists(), f"{dockerfile.name}: COPY {src}"


def test_the_image_builds_the_wheel_from_what_pyproject_names_and_installs_the_package():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "MANIFEST.in", project["project"]["readme"], "otel_tracegen",
              *project["tool"]["setuptools"]["package-dir"].values()}
    image = image_of({"build": {"context": "..", "dockerfile": "docker/Dockerfile"}, "_dir": DOCKER})
    assert needed <= set(image.copied_from_context), needed - set(image.copied_from_context)
    # The final image gets the model from the wheel, not from a copy of model/ that the code would not look at.
    assert not any(PurePosixPath(f).name == "model" for f in image.files), image.files
    assert any(re.search(r"pip install .*\.whl\)?\[[^\]]*\binfer\b", run) for run in image.runs), image.runs


# --- every container: its paths, its healthcheck, its user --------------------------------------------------------


def test_every_service_has_a_healthcheck_that_runs_without_a_shell(services):
    for name, svc in services.items():
        test = svc.get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"
        assert test[0] == "CMD", f"{name}: CMD-SHELL needs /bin/sh, which not every image has"


def test_healthchecks_run_programs_their_images_have(services):
    for name, svc in with_dirs(services).items():
        program = svc["healthcheck"]["test"][1]
        image = image_of(svc)
        assert program in image.programs, f"{name}: {image.base} has no {program} (it has {sorted(image.programs)})"


def test_every_path_a_container_is_told_about_exists_in_it(services, token):
    from otel_tracegen.infill.command import config_from_args

    for name, svc in with_dirs(services).items():
        image = image_of(svc)
        mounts, volumes = bind_mounts(svc), named_volumes(svc)
        provided = [*mounts, *volumes, *image.directories, *image.files]
        argv = [*svc.get("command", []), *svc["healthcheck"]["test"][1:]]
        for path in absolute_paths(argv):
            assert any(path == p or PurePosixPath(p) in PurePosixPath(path).parents for p in provided), \
                f"{name}: {path} is neither mounted nor made by its image"
        for target in volumes:
            assert target in image.directories, f"{name}: volume target {target} is not made by the image"
        if svc.get("command", [None])[0] == "infill":
            args = _build_parser().parse_args(svc["command"])
            args.config = mounts[str(args.config)]  # read the file the container mounts
            config = config_from_args(args)
            assert config.queue_directory in volumes  # the queue lives on a volume, so it survives a restart
            assert config.repair_model is None  # the shipped model, found in the installed package


def test_volume_directories_belong_to_the_image_user(services):
    for name, svc in with_dirs(services).items():
        if not named_volumes(svc):
            continue
        image = image_of(svc)
        assert image.user and re.fullmatch(r"\d+:\d+", image.user), f"{name}: USER should be a numeric uid:gid"
        assert not image.user.startswith("0:"), f"{name} runs as root"
        for target in named_volumes(svc):
            # Docker copies the image directory's ownership into a new named volume mounted on it.
            assert image.directories.get(target) == image.user, f"{name}: {target} is not owned by {image.user}"


def test_healthchecks_ask_the_port_their_service_serves(services, token):
    from otel_tracegen.infill.command import config_from_args

    tempo_port = load(TEMPO)["server"]["http_listen_port"]
    expected = {"jaeger": (JAEGER_HEALTH_PORT, JAEGER_HEALTH), "tempo": (tempo_port, "/ready"),
                "grafana": (3000, "/api/health")}
    for name, svc in with_dirs(services).items():
        test = svc["healthcheck"]["test"]
        if name == "tracegen":  # no port of its own: it checks that it can reach where it sends
            args = _build_parser().parse_args(svc["command"])
            assert f"({host_of(args.otlp_endpoint)!r}, {port_of(args.otlp_endpoint)})" in test[-1]
            continue
        url = urlparse(healthcheck_url(test))
        assert url.hostname == "127.0.0.1", f"{name}: a healthcheck runs inside the container"
        config_file = next((host for target, host in bind_mounts(svc).items() if target.endswith(".yaml")), None)
        if svc.get("command", [None])[0] == "infill":
            args = _build_parser().parse_args(svc["command"])
            args.config = bind_mounts(svc)[str(args.config)]
            http = config_from_args(args).receiver_http
            assert (url.port, url.path) == (port_of(http), "/healthz"), name
            assert host_of(http) in ("0.0.0.0", "127.0.0.1"), name  # reachable on the loopback
        elif config_file is not None and "extensions" in load(config_file):  # a collector
            extension = load(config_file)["extensions"]["health_check"]
            assert "health_check" in load(config_file)["service"]["extensions"], name
            assert (url.port, url.path) == (port_of(extension["endpoint"]), extension.get("path", "/")), name
        else:
            assert (url.port, url.path) == expected[name], name


def test_depends_on_waits_only_for_services_that_can_report_health(services):
    for name, svc in services.items():
        deps = svc.get("depends_on", [])
        for dep in deps:
            assert dep in services, f"{name} depends on unknown {dep}"
            if isinstance(deps, dict) and deps[dep].get("condition") == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep}, which has no healthcheck"


def test_the_generator_and_the_replicas_have_cpu_limits(services):
    limited = [n for n, s in services.items() if "build" in s and "docker/Dockerfile" in s["build"]["dockerfile"]]
    assert {"tracegen", "infill-1", "infill-2"} <= set(limited)
    for name in limited:
        assert float(services[name]["cpus"]) > 0, name


# --- the repairing pipeline: gateway -> infill replicas -> collector -----------------------------------------------


def test_infill_replicas_parse_and_chain_gateway_to_collector(compose, token):
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
    for stage in ("receivers", "processors", "exporters"):
        for n in gateway["service"]["pipelines"]["traces"][stage]:
            assert n in gateway[stage]


def _replica_config(monkeypatch, token: str | None):
    from otel_tracegen.infill.command import config_from_args

    if token is None:
        monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(TOKEN_VARIABLE, token)
    command = load(INFILL_COMPOSE)["services"]["infill-1"]["command"]
    args = _build_parser().parse_args(command)
    args.config = INFILL
    return config_from_args(args)


def test_replicas_listening_beyond_loopback_require_the_token_from_the_environment(monkeypatch):
    from otel_tracegen.report import UserError

    first, second = _replica_config(monkeypatch, "a" * 32), _replica_config(monkeypatch, "b" * 32)
    for config, expected in ((first, "a" * 32), (second, "b" * 32)):
        exposed = [e for e in (config.receiver_grpc, config.receiver_http) if e and host_of(e) != "127.0.0.1"]
        assert exposed and config.receiver_bearer_token == expected  # not a secret written in the file
    with pytest.raises(UserError, match=TOKEN_VARIABLE):
        _replica_config(monkeypatch, None)  # unset: the replica refuses to start rather than run open


def test_the_gateway_sends_the_token_the_replicas_expect(monkeypatch):
    token = "c0ffee" * 5
    config = _replica_config(monkeypatch, token)
    otlp = load(GATEWAY)["exporters"]["loadbalancing"]["protocol"]["otlp"]
    assert "endpoint" not in otlp  # the resolver sets it; the otlp template takes every other otlp option
    header = otlp["headers"]["authorization"]
    # The Collector expands ${env:NAME} inside strings; the replica compares the whole header.
    sent = re.sub(r"\$\{env:(\w+)\}", lambda m: {TOKEN_VARIABLE: token}[m.group(1)], header)
    assert sent == f"Bearer {config.receiver_bearer_token}"


def test_compose_passes_the_token_to_the_gateway_and_every_replica_and_requires_it():
    extra = load(INFILL_COMPOSE)["services"]
    needs = [n for n, s in extra.items() if s.get("command", [None])[0] == "infill" or n == "infill-gateway"]
    assert len(needs) == 3
    for name in needs:
        value = extra[name]["environment"][TOKEN_VARIABLE]
        assert value.startswith("${" + TOKEN_VARIABLE + ":?"), f"{name}: compose must refuse to start without it"


def test_collector_configs_use_documented_keys_and_enable_their_extensions():
    # health_check extension settings (its README): endpoint, path, response_body, plus confighttp's tls.
    health_check_keys = {"endpoint", "path", "response_body", "tls"}
    for path in (COLLECTOR, GATEWAY):
        config = load(path)
        enabled, configured = config["service"].get("extensions", []), config.get("extensions", {})
        assert set(enabled) == set(configured), path.name
        assert set(configured["health_check"]) <= health_check_keys, path.name
        assert host_of(configured["health_check"]["endpoint"]) == "127.0.0.1", path.name
