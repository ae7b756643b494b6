"""What every emitted trace carries besides what it was made of: the marks that tell synthetic traffic apart, and
the attributes a user adds, by flag (telemetrygen's) or by the environment (the OpenTelemetry SDK's).

- ``--otlp-attributes k=v`` (resource) and ``--telemetry-attributes k=v`` (span) take telemetrygen's values:
  ``key="text"``, ``key=true``/``false``, ``key=<integer>``; a float or a bare word is taken as well (as a number
  or a string).
- ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME`` are read as the SDK's ``OTELResourceDetector`` reads them
  (comma-separated ``key=value``, values percent-decoded, ``OTEL_SERVICE_NAME`` winning for ``service.name``).

The SDK describes one process; a generated or replayed trace crosses many services. So what the environment says
is *added* to every service's resource and never replaces what the resource has (``service.name`` above all):
``OTEL_SERVICE_NAME`` names only spans that have no service. What the user passes by flag is asked for and wins,
``--otlp-attributes service.name=X`` included (every span then belongs to X). The marks win over both:
``otel_tracegen.synthetic=true`` cannot be switched off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from ..trace import SERVICE_NAME, AttrValue

SYNTHETIC_ATTRIBUTE = "otel_tracegen.synthetic"
LIBRARY_ATTRIBUTE = "otel_tracegen.library"  # the replayed library's content hash, on every replayed resource

_logger = logging.getLogger(__name__)


def parse_attribute(text: str) -> tuple[str, AttrValue]:
    """``key=value`` as telemetrygen takes it: ``"text"`` is a string, ``true``/``false`` a bool, an integer an int;
    beyond telemetrygen, a float is a float and any other bare word a string. ValueError names what is wrong."""
    key, eq, value = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ValueError(f'expected key="value", key=true|false or key=<number>, got {text!r}')
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return key, value[1:-1]
    if value in ("true", "false"):
        return key, value == "true"
    for number in (int, float):
        try:
            return key, number(value)
        except ValueError:
            pass
    return key, value


def environment_resource(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``OTEL_RESOURCE_ATTRIBUTES`` (+ ``OTEL_SERVICE_NAME`` as ``service.name``), as the SDK's detector reads
    them; a malformed item is skipped with a warning, as there."""
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    for item in (env.get("OTEL_RESOURCE_ATTRIBUTES") or "").split(","):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            _logger.warning("Invalid key value resource attribute pair %s: not key=value", item)
            continue
        out[key.strip()] = unquote(value.strip())
    if env.get("OTEL_SERVICE_NAME"):
        out[SERVICE_NAME] = env["OTEL_SERVICE_NAME"]
    return out


@dataclass
class ExtraAttributes:
    """What to add to every emitted resource and span (see the module's text for who wins)."""

    resource: dict[str, AttrValue] = field(default_factory=dict)  # --otlp-attributes: asked for, wins
    span: dict[str, AttrValue] = field(default_factory=dict)  # --telemetry-attributes
    environment: dict[str, AttrValue] = field(default_factory=dict)  # OTEL_RESOURCE_ATTRIBUTES: only where absent
    marks: dict[str, AttrValue] = field(default_factory=lambda: {SYNTHETIC_ATTRIBUTE: True})  # always, last

    @classmethod
    def from_flags(cls, resource: list[tuple[str, AttrValue]] = (), span: list[tuple[str, AttrValue]] = (),
                   env: Mapping[str, str] | None = None) -> ExtraAttributes:  # fmt: skip
        return cls(resource=dict(resource), span=dict(span), environment=environment_resource(env))

    @property
    def service_override(self) -> str | None:
        """The service every span is moved to, when ``service.name`` was asked for by flag."""
        value = self.resource.get(SERVICE_NAME)
        return str(value) if value is not None else None

    def resource_attributes(self, own: Mapping[str, AttrValue], service: str) -> dict[str, AttrValue]:
        """A resource's attributes for a span of ``service`` whose resource has ``own``."""
        out = {**self.environment, **own}
        if service:
            out[SERVICE_NAME] = service
        out.update(self.resource)
        if self.service_override is not None:
            out[SERVICE_NAME] = self.service_override
        out.update(self.marks)
        return out

    def service_for(self, service: str) -> str:
        """The service a span of ``service`` is emitted as: the asked-for one, else its own, else the environment's
        (a span with no service at all)."""
        if self.service_override is not None:
            return self.service_override
        if service:
            return service
        return str(self.environment.get(SERVICE_NAME) or "")

    def span_attributes(self, own: Mapping[str, AttrValue], *, mark: bool) -> dict[str, AttrValue]:
        """A span's attributes: its own, then ``--telemetry-attributes``, then (``mark``) the synthetic mark."""
        if not self.span and not mark:
            return dict(own)
        out = {**own, **self.span}
        if mark:
            out[SYNTHETIC_ATTRIBUTE] = True
        return out
