"""certkeeper.network.mtasts_publish against a real BIND and a small local HTTPS policy server."""

from __future__ import annotations

import io
import ssl
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trustme

from certkeeper import cli
from certkeeper.core.errors import ServiceError
from certkeeper.core.mtasts import Policy, parse_txt
from certkeeper.core.mtasts_state import DomainState, domains_to_serve, load_state, next_due
from certkeeper.network.dns import backend_for
from certkeeper.network.mtasts_publish import (
    check_served,
    fetch_policy,
    parse_tlsrpt,
    publish_all,
    render_tlsrpt,
    status_rows,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class PolicyServer:
    """HTTPS on 127.0.0.1 answering /.well-known/mta-sts.txt with ``self.text``; logs each fetch in ``events``."""

    def __init__(self, ca: trustme.CA, events: list[str], name: str = "mta-sts.example.test") -> None:
        self.text = ""
        self.status = 200
        self.content_type = "text/plain"
        self.events = events
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner.events.append(f"fetch {self.headers.get('Host')}")
                body = owner.text.encode()
                self.send_response(owner.status if self.path == "/.well-known/mta-sts.txt" else 404)
                self.send_header("Content-Type", owner.content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(name).configure_cert(context)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        # serve_forever polls for shutdown every 0.5 s by default: every teardown waited that long
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def ca():
    return trustme.CA()


@pytest.fixture
def events():
    return []


@pytest.fixture
def policy_server(ca, events):
    server = PolicyServer(ca, events)
    try:
        yield server
    finally:
        server.stop()


class RecordingBackend:
    """The real backend, with each call noted in the shared event list (to check the order)."""

    def __init__(self, inner, events):
        self.inner, self.events = inner, events

    def publish(self, rrset):
        self.events.append(f"publish {rrset.name} {rrset.values[0]}")
        self.inner.publish(rrset)

    def remove(self, name, rtype):
        self.events.append(f"remove {name}")
        self.inner.remove(name, rtype)

    def list(self):
        return self.inner.list()


def make_config(bind, tmp_path, policy_server, ca, mta_sts: str | None = 'mode = "enforce"\nmax_age = 604800',
                rua: str = '["mailto:tlsrpt@example.test"]', **dns_overrides):
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    extra = f"""
[[certificate]]
name = "mta-sts.example.test"
domains = ["mta-sts.example.test"]
key = "{tmp_path}/k.pem"
cert = "{tmp_path}/c.pem"
chain = "{tmp_path}/ch.pem"
fullchain = "{tmp_path}/fc.pem"
"""
    if mta_sts is not None:
        extra += f'\n[[mta_sts]]\ndomain = "example.test"\nmx = ["mail.example.test"]\n{mta_sts}\n'
    if rua:
        extra += f"\n[tlsrpt]\nrua = {rua}\n"
    return bind.config(extra, state_dir=tmp_path / "state", mta_sts_fetch_address=policy_server.address,
                       mta_sts_fetch_ca=str(ca_file), **dns_overrides)


def serve(policy_server, config):
    """What the daemon does: serve what ``domains_to_serve`` says."""
    policies = domains_to_serve(config)
    policy_server.text = policies["example.test"].render() if "example.test" in policies else ""


def published_id(bind):
    values = bind.query("_mta-sts.example.test", "TXT")
    assert len(values) <= 1
    return parse_txt(values[0]) if values else None


# ---------------------------------------------------------------------------
# Units.


def test_tlsrpt_round_trip():
    rua = ("mailto:tlsrpt@example.com", "https://reports.example.com/v1")
    text = render_tlsrpt(rua)
    assert text == "v=TLSRPTv1; rua=mailto:tlsrpt@example.com,https://reports.example.com/v1"
    assert parse_tlsrpt(text) == rua
    with pytest.raises(ValueError):
        parse_tlsrpt("v=spf1 mx -all")


def test_drain_waits_for_every_earlier_max_age():
    enforce = Policy("enforce", ("mail.example.test",), 604800)
    testing = Policy("testing", ("mail.example.test",), 86400)
    none = Policy("none", (), 3600)
    st = DomainState("example.test").with_published(enforce, T0)
    st = st.with_published(testing, T0 + timedelta(days=1))
    assert st.drain_until() is None  # not withdrawing yet
    st = st.with_published(none, T0 + timedelta(days=2))
    # enforce replaced at day 1 (+7 days), testing at day 2 (+1 day): the later end wins
    assert st.drain_until() == T0 + timedelta(days=8)
    assert st.with_published(none, T0 + timedelta(days=3)) is st  # same policy: same id, no change


# ---------------------------------------------------------------------------
# Against BIND and the HTTPS server.


def test_id_published_only_after_the_new_policy_is_served(bind, tmp_path, policy_server, ca, events):
    config = make_config(bind, tmp_path, policy_server, ca, rua="")
    new = Policy.from_config(config.mta_sts[0])
    policy_server.text = Policy("testing", ("mail.example.test",), 86400).render()  # the old policy
    backend = RecordingBackend(backend_for(config), events)

    outcomes = publish_all(config, lambda line: None, now=T0, backend=backend)
    assert [(o.record, o.status) for o in outcomes] == [("_mta-sts.example.test", "failed")]
    assert "serves another policy" in outcomes[0].detail and "RFC 8461 8.1" in outcomes[0].detail
    assert published_id(bind) is None
    assert not any(e.startswith("publish") for e in events)
    # status shows the failure and when it is retried (never a time in the past: T0's retry is "at once")
    from certkeeper.keeper.status import _iso, mta_sts_rows

    (row,) = mta_sts_rows(config)
    assert row["next_action"] == "retry publish" and "serves another policy" in row["error"]
    assert row["next_action_at"] is None
    now = datetime.now(UTC).replace(microsecond=0)
    publish_all(config, lambda line: None, now=now, backend=backend)
    (row,) = mta_sts_rows(config)
    assert row["next_action_at"] == row["retry_at"] == _iso(now + timedelta(minutes=10))

    serve(policy_server, config)  # the daemon now serves the new policy
    events.clear()
    outcomes = publish_all(config, lambda line: None, now=T0, backend=backend)
    assert [(o.status, o.changed) for o in outcomes] == [("published", True)]
    assert published_id(bind) == new.policy_id()
    (row,) = mta_sts_rows(config)
    assert row["error"] is None and row["next_action"] == "none"
    assert events == ["fetch mta-sts.example.test", f"publish _mta-sts.example.test v=STSv1; id={new.policy_id()}"]


def test_id_changes_when_and_only_when_the_policy_changes(bind, tmp_path, policy_server, ca):
    config = make_config(bind, tmp_path, policy_server, ca, rua="")
    serve(policy_server, config)
    assert publish_all(config, lambda line: None, now=T0)[0].status == "published"
    first = published_id(bind)

    again = publish_all(config, lambda line: None, now=T0 + timedelta(hours=1))
    assert [(o.status, o.changed) for o in again] == [("unchanged", False)]
    assert published_id(bind) == first
    assert len(load_state(config, "example.test").policies) == 1

    same_again = make_config(bind, tmp_path, policy_server, ca, rua="")  # re-read: same content
    assert publish_all(same_again, lambda line: None)[0].status == "unchanged"

    changed = make_config(bind, tmp_path, policy_server, ca, 'mode = "enforce"\nmax_age = 86400', rua="")
    serve(policy_server, changed)
    assert publish_all(changed, lambda line: None, now=T0 + timedelta(hours=2))[0].status == "published"
    second = published_id(bind)
    assert second != first and second == Policy.from_config(changed.mta_sts[0]).policy_id()
    history = load_state(config, "example.test").policies
    assert [p.policy_id for p in history] == [first, second]
    assert history[0].superseded_at == T0 + timedelta(hours=2)


def test_removal_follows_rfc8461_8_3(bind, tmp_path, policy_server, ca):
    short = 'mode = "enforce"\nmax_age = 600'
    config = make_config(bind, tmp_path, policy_server, ca, short, rua="")
    serve(policy_server, config)
    publish_all(config, lambda line: None, now=T0)
    enforce_id = published_id(bind)

    gone = make_config(bind, tmp_path, policy_server, ca, mta_sts=None, rua="")
    drain = domains_to_serve(gone)["example.test"]  # still served, now as mode none
    assert drain.mode == "none" and drain.max_age == 600
    serve(policy_server, gone)
    t1 = T0 + timedelta(minutes=1)
    outcomes = publish_all(gone, lambda line: None, now=t1)
    assert [(o.status, o.changed) for o in outcomes] == [("draining", True)]
    assert published_id(bind) == drain.policy_id() != enforce_id
    assert status_rows(gone, t1)[0]["status"] == "draining"
    assert status_rows(gone, t1)[0]["drain_until"] == (t1 + timedelta(seconds=600)).isoformat()

    assert next_due(gone) == t1 + timedelta(seconds=600)
    still = publish_all(gone, lambda line: None, now=t1 + timedelta(seconds=599))
    assert [(o.status, o.changed) for o in still] == [("draining", False)]
    assert "example.test" in domains_to_serve(gone)

    done = publish_all(gone, lambda line: None, now=t1 + timedelta(seconds=600))
    assert [(o.status, o.changed) for o in done] == [("removed", True)]
    assert published_id(bind) is None
    assert "example.test" not in domains_to_serve(gone)
    assert publish_all(gone, lambda line: None) == []
    assert next_due(gone) is None
    assert status_rows(gone)[0]["status"] == "removed"


def test_withdrawal_keeps_serving_until_no_server_has_the_record(bind, bind_factory, tmp_path, policy_server, ca):
    config = make_config(bind, tmp_path, policy_server, ca, 'mode = "enforce"\nmax_age = 600', rua="")
    serve(policy_server, config)
    publish_all(config, lambda line: None, now=T0)
    gone = make_config(bind, tmp_path, policy_server, ca, mta_sts=None, rua="")
    serve(policy_server, gone)
    assert publish_all(gone, lambda line: None, now=T0)[0].status == "draining"
    drain_id = published_id(bind)

    stale = bind_factory(key=bind.key, dynamic=False, name="stale",
                         records=f'_mta-sts IN TXT "v=STSv1; id={drain_id}"')
    both = make_config(bind, tmp_path, policy_server, ca, mta_sts=None, rua="",
                       check_servers=[bind.server, stale.server], propagation_timeout=0.3)
    (outcome,) = publish_all(both, lambda line: None, now=T0 + timedelta(hours=1))
    assert outcome.status == "failed" and stale.server in outcome.detail
    assert published_id(bind) is None  # removed on the primary, but a server still hands out the id:
    assert "example.test" in domains_to_serve(both)  # so the policy is still served
    (outcome,) = publish_all(gone, lambda line: None, now=T0 + timedelta(hours=1))
    assert outcome.status == "removed" and "example.test" not in domains_to_serve(gone)


def test_tlsrpt_published_and_removed(bind, tmp_path, policy_server, ca):
    config = make_config(bind, tmp_path, policy_server, ca)
    serve(policy_server, config)
    outcomes = {o.record: o.status for o in publish_all(config, lambda line: None)}
    assert outcomes == {"_mta-sts.example.test": "published", "_smtp._tls.example.test": "published"}
    assert bind.query("_smtp._tls.example.test", "TXT") == ["v=TLSRPTv1; rua=mailto:tlsrpt@example.test"]
    assert {o.status for o in publish_all(config, lambda line: None)} == {"unchanged"}

    no_rua = make_config(bind, tmp_path, policy_server, ca, rua="")
    outcomes = {o.record: o.status for o in publish_all(no_rua, lambda line: None)}
    assert outcomes == {"_mta-sts.example.test": "unchanged", "_smtp._tls.example.test": "removed"}
    assert bind.query("_smtp._tls.example.test", "TXT") == []


def test_fetch_checks_the_certificate_name(bind, tmp_path, ca, events):
    wrong = PolicyServer(ca, events, name="other.example.test")
    try:
        config = make_config(bind, tmp_path, wrong, ca)
        with pytest.raises(ServiceError, match="certificate not valid"):
            fetch_policy(config, "example.test")
    finally:
        wrong.stop()


def test_fetch_refuses_a_non_200(bind, tmp_path, policy_server, ca):
    config = make_config(bind, tmp_path, policy_server, ca)
    policy_server.status = 302
    with pytest.raises(ServiceError, match="HTTP 302"):
        check_served(config, "example.test", Policy.from_config(config.mta_sts[0]), fetch_policy)


def test_fetch_wants_text_plain(bind, tmp_path, policy_server, ca):
    config = make_config(bind, tmp_path, policy_server, ca)
    serve(policy_server, config)
    policy = Policy.from_config(config.mta_sts[0])
    policy_server.content_type = "text/plain; charset=us-ascii"  # parameters are fine
    check_served(config, "example.test", policy, fetch_policy)
    for wrong in ("text/html", "application/octet-stream", "text/plainx"):
        policy_server.content_type = wrong
        with pytest.raises(ServiceError, match=f"served as '{wrong}', not text/plain"):
            fetch_policy(config, "example.test")


def test_fetch_takes_64_kib_and_not_a_byte_more(bind, tmp_path, policy_server, ca):
    """RFC 8461 3.3: senders may refuse a larger policy; certkeeper's self-check refuses it too."""
    config = make_config(bind, tmp_path, policy_server, ca)
    policy = Policy.from_config(config.mta_sts[0])
    text = policy.render()
    padding = 65536 - len(text) - len("x_pad: \r\n")  # an extension field (RFC 8461 3.2) fills it up
    policy_server.text = text + "x_pad: " + "a" * padding + "\r\n"
    assert len(policy_server.text.encode()) == 65536
    assert fetch_policy(config, "example.test") == policy_server.text
    check_served(config, "example.test", policy, fetch_policy)
    policy_server.text += "b"
    with pytest.raises(ServiceError, match="larger than 65536 bytes"):
        fetch_policy(config, "example.test")


def test_cli_mta_sts_publish(bind, tmp_path, policy_server, ca):
    config = make_config(bind, tmp_path, policy_server, ca)
    serve(policy_server, config)
    out = io.StringIO()
    assert cli.main(["-c", str(config.path), "mta-sts", "publish"], out) == 0
    text = out.getvalue()
    assert "_mta-sts.example.test: published id=" in text
    assert "_smtp._tls.example.test: published" in text
    out = io.StringIO()
    assert cli.main(["-c", str(config.path), "mta-sts", "publish", "example.test"], out) == 2
    assert "_mta-sts.example.test: unchanged" in out.getvalue()
    assert cli.main(["-c", str(config.path), "mta-sts", "publish", "nope.test"], io.StringIO()) == 1
