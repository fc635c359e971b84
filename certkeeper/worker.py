"""The network worker: one job of network work, unprivileged, then exit.

``python -m certkeeper.worker FD`` is started by the keeper (``certkeeper.privsep``)
already as the configured ``user``/``group`` when the keeper is root. ``FD`` is
its end of a socketpair; everything it says and hears there is a
``certkeeper.protocol`` message:

1. it reads ``Start`` (the job, its arguments, the configuration text the
   keeper runs with, and the secret files its user cannot read: the ACME
   account key, the EAB key, the TSIG secret);
2. it confines itself (no_new_privs; Landlock to the interpreter, the state
   directory and the system files a resolver and TLS need; pledge/unveil on
   OpenBSD) before any network work or thread starts;
3. it runs the job: ACME orders (with a CSR from the keeper), ARI, DNS updates
   and lookups, verification probes, the policy self-check, alert mail; for
   anything that needs root it asks the keeper (``PipeKeeper``);
4. it sends ``Line`` messages for progress and last ``Exit`` (code, and the
   soonest time an outcome names: a planned renewal, an ARI window, the end of
   a backoff, the next DKIM step or MTA-STS retry).

A failure of one part of a job is logged and never stops another part.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from certkeeper import protocol, sandbox
from certkeeper.core import logs, secrets
from certkeeper.core.config import CertificateConfig, Config, parse
from certkeeper.core.errors import CertkeeperError, ConfigError
from certkeeper.network.keeper_client import PipeKeeper

log = logging.getLogger(__name__)


FLEET_PUBLISH_EVERY = timedelta(hours=1)  # [fleet]: the publish job runs again then (well within live_within)

Job = Callable[[Config, dict[str, Any], PipeKeeper], tuple[int, datetime | None]]


def _guard(what: str, work: Callable[[], object]) -> None:
    """Run one part of a job; a failure is logged as one line and never stops the other parts."""
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - one part must never stop another
        log.error("%s failed: %s", what, " ".join(str(exc).split()) or type(exc).__name__)


# ---------------------------------------------------------------------------
# Jobs. Each returns (exit code, soonest next time or None).


def job_renew(config: Config, args: dict[str, Any], keeper: PipeKeeper) -> tuple[int, datetime | None]:
    line = _liner(keeper)
    dry_run = str(args.get("directory") or "") if args.get("dry_run") else ""
    if args.get("dry_run") and not dry_run:
        line("certkeeper: renew --dry-run needs [acme] staging or --directory URL")
        return 1, None
    shared = None
    if config.fleet.enabled:  # HTTP-01 tokens through etcd too: the CA may ask any host of a round-robin name
        from certkeeper.network import fleet

        shared = keeper.challenges = fleet.SharedChallenges(config, keeper.challenges)
    try:
        return _renew(config, args, keeper, line, dry_run)
    finally:
        if shared is not None:
            shared.close()


def _renew(config: Config, args: dict[str, Any], keeper: PipeKeeper, line: Callable[[str], None],
           dry_run: str) -> tuple[int, datetime | None]:
    from certkeeper.network.alerts import Alerter
    from certkeeper.network.runner import Renewer, format_outcome

    renewer = Renewer(config, keeper=keeper, dry_run=dry_run)
    reason = args.get("revoke")
    if reason:  # `certkeeper revoke NAME`: revoke, then renew at once with a fresh key
        (name,) = args["names"]
        renewer.revoke(name, str(reason), line)
    report = renewer.renew(args.get("names") or None, force=bool(args.get("force")) or bool(reason),
                           progress=line if args.get("progress", True) else None, fresh_key=bool(reason),
                           roll=bool(args.get("roll")))
    for outcome in report.outcomes:
        line(format_outcome(outcome))
    if dry_run:
        return report.exit_code, None  # no alert, no state, nothing planned
    Alerter(config, keeper=keeper).after_renewal(report.outcomes)
    times = [o.next_renewal for o in report.outcomes if o.next_renewal is not None]
    return report.exit_code, min(times) if times else None


def job_publish(config: Config, args: dict[str, Any], keeper: PipeKeeper) -> tuple[int, datetime | None]:
    """MTA-STS ids and TLSRPT records (the listener serves the policy by then); removed domains withdrawn
    (RFC 8461 8.3). The daemon's job returns when a withdrawal can next progress; the CLI's prints outcomes."""
    from certkeeper.core import mtasts_state
    from certkeeper.network import mtasts_publish

    line = _liner(keeper)
    domains = tuple(args["domains"]) if args.get("domains") else None
    if config.fleet.enabled:  # several MX hosts: an id only for a policy every live host serves
        from certkeeper.network import fleet

        agreed = fleet.agreed_policies(config, line, datetime.now(UTC), keeper)
        domains = tuple(d for d in (domains if domains is not None else agreed) if d in agreed)
    outcomes: list[mtasts_publish.Outcome] = []
    if args.get("cli"):
        outcomes = mtasts_publish.publish_all(config, line, domains=domains, keeper=keeper)
        for o in outcomes:
            sep = ": " if o.status == "failed" else " "
            line(f"{o.record}: {o.status}{sep + o.detail if o.detail else ''}")
        if not outcomes:
            line("nothing to publish: no [[mta_sts]] table and no [tlsrpt] rua")
        if any(o.status == "failed" for o in outcomes):
            return 1, None
        return (0 if any(o.changed for o in outcomes) else 2), None
    _guard("MTA-STS publishing", lambda: outcomes.extend(mtasts_publish.publish_all(config, line, domains=domains,
                                                                                   keeper=keeper)))
    times = [t for t in (mtasts_state.next_due(config),) if t is not None]
    if config.fleet.enabled:  # the fleet's hosts and MX names change: report and follow them every hour
        times.append(datetime.now(UTC) + min(FLEET_PUBLISH_EVERY, config.fleet.live_within / 2))
    if not outcomes and (config.mta_sts or config.tlsrpt.rua) or any(o.status == "failed" for o in outcomes):
        # a DNS server or the policy fetch failed: try again when status says (STATE/mta-sts/DOMAIN.retry)
        times.append(datetime.now(UTC) + mtasts_publish.RETRY_AFTER)
    return 0, min(times, default=None)


def job_hourly(config: Config, args: dict[str, Any], keeper: PipeKeeper) -> tuple[int, datetime | None]:
    """DKIM rotation steps that are due, and expiry warnings; the soonest next DKIM step."""
    from certkeeper.network import rotation
    from certkeeper.network.alerts import Alerter

    reports: list[rotation.DueReport] = []
    if config.dkim and config.fleet.enabled:  # several MX hosts: the rotation is coordinated through etcd
        from certkeeper.network import fleet

        _guard("DKIM rotation", lambda: reports.append(fleet.run_due(config, datetime.now(UTC), _liner(keeper),
                                                                     keeper)))
    elif config.dkim:
        _guard("DKIM rotation", lambda: reports.append(rotation.run_due(config, datetime.now(UTC), _liner(keeper),
                                                                        keeper)))
    _guard("expiry check", lambda: Alerter(config, keeper=keeper).check_expiry())
    from certkeeper.core.dane import load_state

    published = [c for c in config.certificates if c.dane or load_state(config.state_dir, c.name).names]
    if published:  # next keys' TLSA records seen, old ones withdrawn; all of them when dane was turned off
        from certkeeper.network.dane import Dane

        dane = Dane(config, keeper, _liner(keeper))

        def maintain(cert: CertificateConfig) -> object:
            if not cert.dane:
                return dane.withdraw(cert, datetime.now(UTC))
            return dane.maintain(cert, datetime.now(UTC), want_change=False)

        for cert in published:
            _guard(f"{cert.name}: TLSA records", partial(maintain, cert))
    # When the next DKIM step is due: the daemon runs this job again then, not an hour later.
    return 0, min((r.next_due for r in reports if r.next_due is not None), default=None)


def job_rotate(config: Config, args: dict[str, Any], keeper: PipeKeeper) -> tuple[int, datetime | None]:
    """``certkeeper rotate-dkim [DOMAIN] [--now]``."""
    from certkeeper.network import rotation

    line = _liner(keeper)
    failed = False
    now = datetime.now(UTC)
    for item in rotation.selected_items(config, args.get("domain")):
        try:
            if config.fleet.enabled:
                from certkeeper.network import fleet

                fleet.rotate_now(config, item, now, bool(args.get("now")), line, keeper)
            else:
                rotation.rotate_now(config, item, now, bool(args.get("now")), line, keeper)
        except CertkeeperError as exc:
            line(f"certkeeper: {item.domain}: {exc}")
            failed = True
    return (1 if failed else 0), None


def job_adopt(config: Config, args: dict[str, Any], keeper: PipeKeeper) -> tuple[int, datetime | None]:
    """``certkeeper rotate-dkim --adopt SELECTOR [DOMAIN]``: the record is read here, the key is the keeper's."""
    from certkeeper.network import rotation

    [item] = rotation.selected_items(config, args.get("domain"))
    rotation.adopt(config, item, str(args["selector"]), datetime.now(UTC), _liner(keeper), keeper)
    return 0, None


def job_verify(config: Config, args: dict[str, Any], keeper: PipeKeeper) -> tuple[int, datetime | None]:
    """``certkeeper verify [NAME...]``: probe every endpoint; 0 when each serves the file on disk."""
    from certkeeper.network.verification import check_certificate, save_results

    line = _liner(keeper)
    names = args.get("names") or []
    failed = False
    for cert in [c for c in config.certificates if not names or c.name in names]:
        checks = check_certificate(config, keeper, cert)
        if not checks:
            line(f"{cert.name}: no verify endpoints; {args.get('suggestions', {}).get(cert.name, '')}".rstrip())
            continue
        if checks[0].expected is None:
            line(f"{cert.name}: no certificate installed at {cert.cert}")
        for check in checks:
            line(check.describe())
            failed = failed or not check.ok
        save_results(config, cert.name, checks)
    return (1 if failed else 0), None


def job_dns_check(config: Config, args: dict[str, Any], keeper: PipeKeeper) -> tuple[int, datetime | None]:
    """``certkeeper dns --check``: look every expected record up."""
    from certkeeper.network import records

    line = _liner(keeper)
    lookup = records.resolver_lookup(config)
    rows = [row for d in args.get("domains") or [] for row in records.check(config, d, lookup)]
    if any(c.dane for c in config.certificates):  # TLSA through the validating resolver, keys on the ports
        from certkeeper.network import dane

        rows += [row for d in args.get("domains") or [] for row in dane.check_rows(config, keeper, d)]
    for text in records.render_table(rows).splitlines():
        line(text)
    # "unmanaged" (a DKIM key made by hand) is reported, not a failure: adopt it or let it be.
    bad = [r for r in rows if r.status not in ("ok", "unmanaged")]
    unmanaged = sum(r.status == "unmanaged" for r in rows)
    unvalidated = sum(r.status == "not validated" for r in bad)
    line(f"{sum(r.status == 'ok' for r in rows)} ok, {sum(r.status == 'missing' for r in bad)} missing, "
         f"{sum(r.status == 'wrong' for r in bad)} wrong" + (f", {unvalidated} not validated" if unvalidated else "")
         + (f", {unmanaged} unmanaged" if unmanaged else ""))
    return (0 if not bad else 1), None


def job_fleet_watch(config: Config, args: dict[str, Any], keeper: PipeKeeper) -> tuple[int, datetime | None]:
    """[fleet], the daemon's long-running worker: the other hosts' HTTP-01 tokens for this host's listener, and
    the DKIM job at once when a rotator dies (``fleet.watch``); it runs until the daemon stops it."""
    from certkeeper.network import fleet

    if not config.fleet.enabled:
        return 0, None
    fleet.watch(config, keeper, _liner(keeper), lambda: keeper.notify(protocol.Alive()))
    return 0, None


JOBS: dict[str, Job] = {"renew": job_renew, "publish": job_publish, "hourly": job_hourly, "rotate": job_rotate,
                        "adopt": job_adopt, "verify": job_verify, "dns-check": job_dns_check,
                        "fleet-watch": job_fleet_watch}


def _liner(keeper: PipeKeeper) -> Callable[[str], None]:
    return lambda text: keeper.notify(protocol.Line(text))


# ---------------------------------------------------------------------------
# Entry point.


def confine(config: Config) -> None:
    """Take away what this role does not need, before any network work or thread starts."""
    import ssl  # noqa: F401 - loaded now, with its libraries, rather than found later

    state_dir = config.state_dir
    read = [*sandbox.SYSTEM_READ, str(config.path.parent)]
    bundles = [config.authority(name).ca_bundle for name in config.authorities]
    read += [str(p) for p in (*bundles, config.dns.mta_sts_fetch_ca) if p is not None]
    sandbox.confine("network", read, [str(state_dir)])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(argv[0]))
    start = protocol.receive(sock)
    if not isinstance(start, protocol.Start) or start.job not in JOBS:
        raise SystemExit("certkeeper worker: the first message is not a Start for a known job")
    logs.setup_daemon(start.foreground, start.verbosity)
    keeper: PipeKeeper | None = None
    code, soonest = 1, None
    try:
        config = parse(start.config_text, start.config_path)
        secrets.hand_over({s.path: s.data.encode() for s in start.secrets})
        confine(config)
        keeper = PipeKeeper(config, sock)
        code, soonest = JOBS[start.job](config, json.loads(start.args), keeper)
    except ConfigError as exc:
        _say(sock, f"certkeeper: {'; '.join(exc.lines)}")
    except CertkeeperError as exc:
        _say(sock, f"certkeeper: {exc}")
    except Exception as exc:  # noqa: BLE001 - a bug: one line to the log and to the keeper
        message = " ".join(str(exc).split())
        log.error("%s job: internal error: %s: %s", start.job, type(exc).__name__, message)
        _say(sock, f"certkeeper: internal error: {type(exc).__name__}: {message}")
    _tell(sock, protocol.Exit(code, soonest.isoformat() if soonest else ""))
    return code


def _say(sock: socket.socket, text: str) -> None:
    _tell(sock, protocol.Line(text))


def _tell(sock: socket.socket, message: object) -> None:
    """The last words to the keeper; a keeper that went first (the CLI's reader closed its pipe,
    a SIGINT) has nothing left to hear, and that is no error of this worker's."""
    try:
        protocol.send(sock, message)
    except (BrokenPipeError, ConnectionResetError):
        log.debug("the keeper went away before the worker's %s", type(message).__name__)




if __name__ == "__main__":
    status = main()
    # Everything is on disk or with the keeper by now: skip the interpreter's teardown of the
    # ACME, HTTP and DNS libraries (the keeper waits for this exit before it answers its caller).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
