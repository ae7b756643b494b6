"""Every setting of ``otel-tracegen infill serve``: :class:`InfillConfig`, from flags or a YAML file whose strings
may read the environment (``${env:NAME}``, as the Collector's configuration does)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..report import UserError
from .detect import DetectSettings
from .forward import ForwardSettings
from .repair import RepairSettings


@dataclass
class InfillConfig:
    """Every setting of ``otel-tracegen infill serve``. In YAML the fields are grouped by their prefix
    (``receiver:``, ``buffer:``, ``repair:``, ``queue:``, ``exporter:``), e.g. ``buffer: {wait_s: 2}``; on the
    command line they are flags (``--buffer-wait-s 2``)."""

    receiver_grpc: str | None = "127.0.0.1:4327"  # host:port, or none
    receiver_http: str | None = "127.0.0.1:4328"  # host:port, or none; also serves /metrics
    receiver_max_message_mib: float = 16.0
    receiver_tls_cert: str | None = None
    receiver_tls_key: str | None = None
    receiver_bearer_token: str | None = None
    receiver_workers: int = 4  # threads that decode and log requests (each holds at most one request in memory)
    receiver_read_timeout_s: float = 30.0  # a TLS handshake or a request body must arrive within this
    metrics_public: bool = False  # serve /metrics without the bearer token
    memory_limit_mib: float = 0.0  # refuse requests while the process's RSS is above this; 0: off
    buffer_wait_s: float = 2.0
    buffer_max_traces: int = 100_000
    buffer_max_mib: float = 256.0
    buffer_remember_traces: int = 20_000  # released traces whose span ids are kept, so late spans join them
    repair_model: str | None = None  # a model directory; None: the shipped model
    repair_no_model: bool = False  # rules only (re-parent to the nearest ancestor, clock skew)
    repair_confidence: float = 0.5
    repair_skew_tolerance_ms: float = 1.0
    repair_batch_traces: int = 256
    repair_threads: int | None = None
    queue_directory: str = "otel-tracegen-infill-queue"
    queue_max_mib: float = 1024.0
    queue_fsync: bool = True
    queue_dead_letter_max_mib: float = 256.0
    queue_dead_letter_max_requests: int = 1000
    exporter_endpoint: str | None = None
    exporter_protocol: str = "grpc"
    exporter_insecure: bool | None = None
    exporter_headers: dict = field(default_factory=dict)
    exporter_compression: str | None = None
    exporter_timeout_s: float = 10.0
    exporter_retry_initial_s: float = 0.5
    exporter_retry_max_s: float = 30.0
    exporter_max_request_mib: float = 4.0
    localize_keep_s: float = 0.0  # keep released traces this long for GET /localize; 0: off
    localize_max_spans: int = 500_000
    drain_s: float = 30.0

    SECTIONS = ("receiver", "buffer", "repair", "queue", "exporter", "localize")

    def __post_init__(self) -> None:
        for name in ("receiver_grpc", "receiver_http"):  # "none" (a flag or YAML) turns a receiver off
            v = getattr(self, name)
            if v is not None and str(v).strip().lower() in ("", "none", "off", "false"):
                setattr(self, name, None)
        if self.buffer_wait_s < 0 or self.repair_batch_traces < 1 or self.queue_max_mib <= 0:
            raise ValueError("need buffer.wait_s >= 0, repair.batch_traces >= 1 and queue.max_mib > 0")
        if self.receiver_workers < 1 or self.receiver_read_timeout_s <= 0 or self.buffer_max_mib <= 0:
            raise ValueError("need receiver.workers >= 1, receiver.read_timeout_s > 0 and buffer.max_mib > 0")
        if self.receiver_bearer_token is not None:
            # YAML reads a token of digits as a number: a token is text
            self.receiver_bearer_token = str(self.receiver_bearer_token)
            if not self.receiver_bearer_token.strip():
                raise ValueError("receiver.bearer_token is empty (an empty environment variable?): an empty token "
                                 "would turn authentication off; give a token, or leave the setting out")

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str = "config") -> InfillConfig:
        """From a YAML document's mapping (sections of fields); an unknown key is an error naming it."""
        names = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in (data or {}).items():
            if key in cls.SECTIONS:
                if not isinstance(value, dict):
                    raise UserError(f"{where}: {key}: expected a mapping of settings, got {type(value).__name__}")
                for sub, v in value.items():
                    name = f"{key}_{sub}"
                    if name not in names:
                        known = ", ".join(n[len(key) + 1 :] for n in names if n.startswith(key + "_"))
                        raise UserError(f"{where}: unknown setting {key}.{sub} (known: {known})")
                    kwargs[name] = _typed(name, v, _kind(names[name]), where)
            elif key in names:
                kwargs[key] = _typed(key, value, _kind(names[key]), where)
            else:
                top = ", ".join(n for n in names if not n.startswith(tuple(f"{x}_" for x in cls.SECTIONS)))
                raise UserError(f"{where}: unknown setting {key!r} (sections: {', '.join(cls.SECTIONS)}; {top})")
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> InfillConfig:
        try:
            import yaml
        except ModuleNotFoundError:
            raise UserError("--config needs PyYAML: pip install 'otel-tracegen[infill]'") from None

        p = Path(path)
        if not p.is_file():
            raise UserError(f"no config file at {p}")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{p}: not valid YAML ({e})") from None
        if data is not None and not isinstance(data, dict):
            raise UserError(f"{p}: expected a mapping at the top")
        return cls.from_mapping(expand_env(data or {}, str(p)), str(p))

    @property
    def tls(self) -> bool:
        return bool(self.receiver_tls_cert and self.receiver_tls_key)

    def repair_settings(self) -> RepairSettings:
        return RepairSettings(confidence=self.repair_confidence,
                              detect=DetectSettings(skew_tolerance_ns=int(self.repair_skew_tolerance_ms * 1e6)))

    def forward_settings(self) -> ForwardSettings:
        return ForwardSettings(self.exporter_endpoint, self.exporter_protocol, self.exporter_insecure,
                               self.exporter_headers or None, self.exporter_compression, self.exporter_timeout_s,
                               self.exporter_retry_initial_s, self.exporter_retry_max_s,
                               int(self.queue_dead_letter_max_mib * (1 << 20)),
                               self.queue_dead_letter_max_requests)  # fmt: skip


def _kind(f) -> type:
    """The type a config field holds, from its annotation ("float", "bool | None"); text for the rest."""
    declared = str(f.type).split("|")[0].strip()
    return {"bool": bool, "int": int, "float": float}.get(declared, str)


_ENV_REFERENCE = re.compile(r"\$\{(?:env:)?([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, where: str = "config") -> Any:
    """``${env:NAME}`` (and ``${NAME}``, ``${env:NAME:-default}``) in every string of a YAML document, as the
    Collector expands its configuration; ``$${...}`` stays literal. An unset variable without a default is an
    error naming it, so a token never silently becomes empty."""
    if isinstance(value, dict):
        return {k: expand_env(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def one(m: re.Match) -> str:
        if m.start() > 0 and value[m.start() - 1] == "$":
            return m.group(0)
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise UserError(f"{where}: {m.group(0)} names the environment variable {name}, which is not set")

    return _ENV_REFERENCE.sub(one, value).replace("$${", "${")  # text: each setting converts it to its own type


def _typed(name: str, value: Any, kind: type, where: str) -> Any:
    """A setting's value as its field's type: YAML and ``${env:...}`` give text where a number or a switch is
    meant (and a token of digits must stay text)."""
    if not isinstance(value, str) or kind is str:
        return value
    text = value.strip()
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "yes", "on", "1")
        return kind(text)
    except ValueError:
        raise UserError(f"{where}: {name.replace('_', '.', 1)} = {value!r} is not a {kind.__name__}") from None
