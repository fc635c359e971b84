"""``[metrics] listen``: Prometheus text exposition of certkeeper's state (off by default).

This module owns the metric names and renders the text; the listener serves it.
Nothing is counted in memory: a custom collector reads the same sources as
``certkeeper status`` at scrape time (files on disk, ``STATE/certificates``,
the last verify results, the DKIM module's rows), so a scrape is always
current and a restart loses nothing. ``prometheus-client`` is an optional
dependency (``pip install 'certkeeper[metrics]'``), imported only when
``listen`` is set.

Names follow the Prometheus conventions (base unit seconds, ``_seconds`` for
timestamps, snake_case, ``certkeeper_`` prefix)::

    certkeeper_certificate_present{name}                        1 when key+cert are on disk
    certkeeper_certificate_not_after_seconds{name}              leaf notAfter, Unix time
    certkeeper_certificate_not_before_seconds{name}
    certkeeper_certificate_next_renewal_seconds{name}           planned renewal time
    certkeeper_certificate_last_renewal_attempt_seconds{name}
    certkeeper_certificate_last_renewal_success_seconds{name}
    certkeeper_certificate_renewal_consecutive_failures{name}
    certkeeper_verify_ok{certificate,hook,endpoint}             1 when it served the file on disk
    certkeeper_verify_checked_seconds{certificate,hook,endpoint}
    certkeeper_dkim_selector_state{domain,selector,algorithm,state}   1 per selector
    certkeeper_dkim_selector_next_action_seconds{domain,selector}
    certkeeper_start_time_seconds                               when the daemon started
    certkeeper_uptime_seconds
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from certkeeper.core import state
from certkeeper.core.config import Config
from certkeeper.core.errors import LocalError
from certkeeper.keeper.service import decide
from certkeeper.keeper.store import CertificateStore
from certkeeper.network import verification

log = logging.getLogger(__name__)


def _prometheus() -> Any:
    try:
        import prometheus_client  # noqa: PLC0415 - optional dependency, loaded only when used
        import prometheus_client.core  # noqa: F401, PLC0415
    except ImportError:
        raise LocalError("[metrics] listen is set but prometheus-client is not installed; "
                         "install it with: pip install 'certkeeper[metrics]'") from None
    return prometheus_client


def _ts(value: Any) -> float | None:
    """Unix seconds from a datetime or an ISO 8601 string; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(value, datetime):
        return value.timestamp()
    return None


class StateCollector:
    """A prometheus-client collector that reads certkeeper's state at every scrape."""

    def __init__(self, config: Config, started_at: datetime, clock: Callable[[], datetime] | None = None) -> None:
        self.config = config
        self.started_at = started_at
        self.clock = clock or (lambda: datetime.now(UTC))
        self.core = _prometheus().core

    def describe(self) -> list[Any]:
        return []  # values come from disk at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        yield from self._certificates()
        yield from self._verify()
        yield from self._dkim()
        now = self.clock()
        yield self._gauge("certkeeper_start_time_seconds", "Unix time the certkeeper daemon started.", [],
                          [((), self.started_at.timestamp())])
        yield self._gauge("certkeeper_uptime_seconds", "Seconds since the certkeeper daemon started.", [],
                          [((), (now - self.started_at).total_seconds())])

    def _gauge(self, name: str, doc: str, labels: list[str],
               samples: Sequence[tuple[Sequence[str], float]]) -> Any:
        family = self.core.GaugeMetricFamily(name, doc, labels=labels)
        for values, value in samples:
            family.add_metric(list(values), value)
        return family

    def _certificates(self) -> Iterator[Any]:
        store = CertificateStore(self.config.state_dir)
        rows: dict[str, list[tuple[tuple[str, ...], float]]] = {key: [] for key in _CERT_METRICS}
        for cert in self.config.certificates:
            label = (cert.name,)
            on_disk = store.read(cert)
            info = on_disk.info() if on_disk else None
            rows["present"].append((label, 1.0 if info else 0.0))
            if info:
                rows["not_after_seconds"].append((label, info.not_after.timestamp()))
                rows["not_before_seconds"].append((label, info.not_before.timestamp()))
            st = state.load_cert_state(self.config.state_dir, cert.name)
            decision = decide(self.config, store, cert, self.clock())  # what status shows, from one place
            for key, value in (("next_renewal_seconds", decision.when),
                               ("last_renewal_attempt_seconds", st.last_attempt),
                               ("last_renewal_success_seconds", st.last_success)):
                if (seconds := _ts(value)) is not None:
                    rows[key].append((label, seconds))
            rows["renewal_consecutive_failures"].append((label, float(st.consecutive_failures)))
        for key, doc in _CERT_METRICS.items():
            yield self._gauge(f"certkeeper_certificate_{key}", doc, ["name"], rows[key])

    def _verify(self) -> Iterator[Any]:
        ok: list[tuple[tuple[str, ...], float]] = []
        checked: list[tuple[tuple[str, ...], float]] = []
        for cert in self.config.certificates:
            for result in verification.last_results(self.config, cert.name):
                label = (cert.name, str(result["hook"] or ""), str(result["endpoint"] or ""))
                ok.append((label, 1.0 if result["ok"] else 0.0))
                if (seconds := _ts(result["checked_at"])) is not None:
                    checked.append((label, seconds))
        labels = ["certificate", "hook", "endpoint"]
        yield self._gauge("certkeeper_verify_ok", "1 when the endpoint served the certificate on disk at the "
                          "last check.", labels, ok)
        yield self._gauge("certkeeper_verify_checked_seconds", "Unix time of the last check of the endpoint.",
                          labels, checked)

    def _dkim(self) -> Iterator[Any]:
        from certkeeper.keeper.status import dkim_rows  # noqa: PLC0415 - status imports the optional modules

        rows = [r for r in dkim_rows(self.config) if "error" not in r]
        states, next_at = [], []
        for row in rows:
            domain, selector = str(row.get("domain", "")), str(row.get("selector", ""))
            states.append(((domain, selector, str(row.get("algorithm", "")), str(row.get("state", ""))), 1.0))
            if (seconds := _ts(row.get("next_action_at"))) is not None:
                next_at.append(((domain, selector), seconds))
        yield self._gauge("certkeeper_dkim_selector_state", "1 for each DKIM selector, labelled with its state.",
                          ["domain", "selector", "algorithm", "state"], states)
        yield self._gauge("certkeeper_dkim_selector_next_action_seconds", "Unix time of the selector's next "
                          "lifecycle step.", ["domain", "selector"], next_at)


_CERT_METRICS = {
    "present": "1 when the certificate's key and leaf are on disk and parse.",
    "not_after_seconds": "Unix time the certificate on disk expires (notAfter).",
    "not_before_seconds": "Unix time the certificate on disk became valid (notBefore).",
    "next_renewal_seconds": "Unix time of the next planned renewal.",
    "last_renewal_attempt_seconds": "Unix time of the last renewal attempt.",
    "last_renewal_success_seconds": "Unix time of the last successful renewal.",
    "renewal_consecutive_failures": "Renewal attempts that failed in a row (0 after a success).",
}


def render(config: Config, started_at: datetime, clock: Callable[[], datetime] | None = None) -> bytes:
    """The text of one scrape (Prometheus exposition format), read from disk now.

    The keeper renders it and hands it to the listener, which serves it on
    ``[metrics] listen``: the process that reads the state never listens."""
    prometheus = _prometheus()
    registry = prometheus.CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(config, started_at, clock))
    return bytes(prometheus.generate_latest(registry))
