"""ACME (RFC 8555) through certbot's ``acme`` library: the only module that imports acme/josepy.

It owns the account (an acme-client account key in PEM, RSA or EC, is reused
as is; a missing key is created), orders, HTTP-01 answers (placed in the shared
``ChallengeTable`` that the web listener serves), finalisation and download,
and ARI (RFC 9773) look-ups. Everything it returns is plain data; josepy
objects stay in here.

Calls block; the daemon runs them in worker threads. Polling uses a short,
bounded backoff of our own (the library's helpers sleep a whole second per
poll) and honours ``Retry-After``. ``badNonce`` is retried. Every ACME error
becomes an ``AcmeError`` whose message names the RFC 8555 type and detail.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import josepy as jose
import requests
from acme import challenges as acme_challenges
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certkeeper import __version__
from certkeeper.core import certs, layout, secrets
from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import DEFAULT_AUTHORITY, AcmeConfig
from certkeeper.core.errors import AcmeError, LocalError
from certkeeper.core.files import write_atomic, write_json_atomic
from certkeeper.core.times import parse_iso

if TYPE_CHECKING:
    from certkeeper.network.dns.challenge import Dns01Records

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
BAD_NONCE_RETRIES = 10
_FIRST_POLL = 0.02  # seconds; Pebble validates in a few milliseconds
_MAX_POLL = 2.0


@dataclass(frozen=True)
class RenewalWindow:
    """RFC 9773 4.2: the server's suggested renewal window for a certificate."""

    start: dt.datetime
    end: dt.datetime
    retry_after: float  # seconds until the server wants to be asked again
    explanation_url: str = ""


@dataclass(frozen=True)
class Issued:
    fullchain: bytes
    order_url: str


_LAST_RETRY_AFTER = threading.local()  # Retry-After of this thread's last ACME response, seconds
_LAST_STATUS = threading.local()  # HTTP status of this thread's last ACME response
_DEADLINE = threading.local()  # time.monotonic() by which this thread's order must be done, or None
# RFC 8555 6.7 error types that mean the CA is in trouble, not that our request was wrong.
CA_SIDE_CODES = frozenset({"rateLimited", "serverInternal", "badNonce"})


class _Network(acme_client.ClientNetwork):
    """ClientNetwork that retries ``badNonce`` (RFC 8555 6.5) more than once and
    remembers the last ``Retry-After`` (the library drops it from its errors)."""

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        deadline = getattr(_DEADLINE, "value", None)
        if deadline is not None:
            # The order's deadline holds on every read: the body is read here in pieces (a server that
            # drips one byte at a time never trips the per-read timeout) and each read waits at most
            # what is left.
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise requests.exceptions.Timeout("the order's deadline passed")
            kwargs["timeout"] = min(float(self._default_timeout), remaining)
            kwargs["stream"] = True
            kwargs["hooks"] = {"response": lambda response, *a, **k: _read_body(response, deadline)}
        response = super()._send_request(method, url, *args, **kwargs)
        _LAST_RETRY_AFTER.value = _retry_after_seconds(response)
        _LAST_STATUS.value = response.status_code
        return response

    @classmethod
    def _check_response(cls, response: requests.Response, content_type: str | None = None) -> requests.Response:
        """A 409 with a problem document is that problem (RFC 9773 7.4 ``alreadyReplaced`` is a 409);
        the library turns every 409 into an account ``ConflictError``."""
        if response.status_code == 409:
            try:
                problem = response.json()
            except ValueError:
                problem = None
            if isinstance(problem, dict) and "type" in problem:
                raise messages.Error.from_json(problem)
        return super()._check_response(response, content_type)

    def post(self, *args: Any, **kwargs: Any) -> requests.Response:
        for attempt in range(BAD_NONCE_RETRIES):
            try:
                return self._post_once(*args, **kwargs)
            except messages.Error as error:
                if error.code != "badNonce" or attempt == BAD_NONCE_RETRIES - 1:
                    raise
                log.debug("badNonce from the ACME server; retrying with a fresh nonce")
        raise AssertionError("unreachable")


class _NewOrder(messages.NewOrder):
    """newOrder with RFC 9773 5 ``replaces`` (the library's NewOrder lacks it)."""

    replaces: str | None = jose.field("replaces", omitempty=True)


class Issuer:
    """One ACME account at one directory; safe to share between threads."""

    remember_account = True  # False (renew --dry-run): the account URL is not written to the state directory

    def __init__(self, config: AcmeConfig, state_dir: Path, challenges: ChallengeTable,
                 name: str = DEFAULT_AUTHORITY) -> None:
        self.config = config
        self.name = name  # the authority's name in the configuration
        self.state_dir = state_dir
        self.challenges = challenges
        self._lock = threading.Lock()
        self._client: acme_client.ClientV2 | None = None

    # -- account -----------------------------------------------------------------

    def client(self) -> acme_client.ClientV2:
        """The registered client, created on first use (directory fetch + account)."""
        with self._lock:
            if self._client is None:
                with _acme_errors("registering the ACME account"):
                    self._client = self._register()
            return self._client

    def _register(self) -> acme_client.ClientV2:
        key = _jwk(self._account_key_pem())
        # requests takes a CA file path for ``verify`` too; the library annotates it as bool.
        verify: Any = self._verify()
        net = _Network(key, alg=_jws_alg(key), user_agent=f"certkeeper/{__version__}",
                       verify_ssl=verify, timeout=int(self.config.timeout))
        directory = acme_client.ClientV2.get_directory(self.config.directory, net)
        client = acme_client.ClientV2(directory, net)
        cached = self._cached_account_url()
        if cached:
            net.account = messages.RegistrationResource(body=messages.Registration(), uri=cached)
            return client
        registration = messages.NewRegistration.from_data(
            contact=self.config.contact, terms_of_service_agreed=True,
            external_account_binding=self._eab(key, directory),
        )
        try:
            regr = client.new_account(registration)
        except acme_errors.ConflictError as conflict:  # the key is already registered: reuse it
            regr = messages.RegistrationResource(body=messages.Registration(), uri=conflict.location)
            net.account = regr
        log.info("ACME account %s at %s", regr.uri, self.config.directory)
        self._cache_account_url(regr.uri)
        return client

    def _account_key_pem(self) -> bytes:
        """Handed over by the keeper (``core.secrets``); in one process, read or created here."""
        path = self.config.account_key
        try:
            return secrets.read(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise LocalError(f"{path}: cannot read the ACME account key: {exc.strerror}") from None
        pem = certs.generate_key(self.config.account_key_type)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, pem, 0o600)
        log.info("created ACME account key %s (%s)", path, self.config.account_key_type)
        return pem

    def _verify(self) -> bool | str:
        """requests' ``verify``: the system store, plus ``ca_bundle`` when set."""
        if self.config.ca_bundle is None:
            return True
        try:
            import certifi

            system = Path(certifi.where()).read_bytes()
        except (ImportError, OSError):
            system = b""
        try:
            extra = self.config.ca_bundle.read_bytes()
        except OSError as exc:
            raise LocalError(f"{self.config.ca_bundle}: cannot read ca_bundle: {exc.strerror}") from None
        filename = "ca-bundle.pem" if self.name == DEFAULT_AUTHORITY else f"ca-bundle.{self.name}.pem"
        bundle = layout.path(self.state_dir, "acme", filename)
        bundle.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not bundle.exists() or bundle.read_bytes() != system + b"\n" + extra:
            write_atomic(bundle, system + b"\n" + extra, 0o644)
        return str(bundle)

    def _eab(self, key: jose.JWK, directory: messages.Directory) -> dict[str, Any] | None:
        """RFC 8555 7.3.4: the externalAccountBinding JWS, when ``[acme] eab_kid`` is set."""
        if not self.config.eab_kid:
            return None
        if self.config.eab_hmac_key_file is None:
            raise LocalError("acme.eab_hmac_key_file: is required when acme.eab_kid is set")
        try:
            hmac_key = secrets.read(self.config.eab_hmac_key_file).decode().strip()
        except OSError as exc:
            raise LocalError(f"{self.config.eab_hmac_key_file}: cannot read: {exc.strerror}") from None
        from certkeeper.core.logs import register_secret

        register_secret(hmac_key)
        return messages.ExternalAccountBinding.from_data(key.public_key(), self.config.eab_kid, hmac_key, directory)

    def _account_cache(self) -> Path:
        return layout.path(self.state_dir, "acme", "account.json")

    def _cached_account_url(self) -> str:
        try:
            data = json.loads(self._account_cache().read_text())
        except (OSError, ValueError):
            return ""
        key_id = _key_id(self._account_key_pem())
        entry = data.get(self.config.directory, {})
        return str(entry.get("url", "")) if entry.get("key") == key_id else ""

    def _cache_account_url(self, url: str) -> None:
        if not self.remember_account:
            return
        try:
            data = json.loads(self._account_cache().read_text())
        except (OSError, ValueError):
            data = {}
        data[self.config.directory] = {"url": url, "key": _key_id(self._account_key_pem())}
        write_json_atomic(self._account_cache(), data)

    # -- orders -----------------------------------------------------------------------

    def profiles(self) -> dict[str, str]:
        """The profiles the directory offers (draft-aaron-acme-profiles), may be empty."""
        meta = self.client().directory.meta
        return dict(getattr(meta, "profiles", None) or {})

    def issue(self, domains: tuple[str, ...], csr_pem: bytes, profile: str = "", replaces: str = "",
              progress: Progress | None = None, dns01: Dns01Records | None = None) -> Issued:
        """Order, answer HTTP-01 (DNS-01 through ``dns01`` when given), finalise with ``csr_pem`` (the
        keeper made it and keeps the key), download the chain.

        RFC 8555 7.3.1: when the server no longer knows the cached account URL
        (``accountDoesNotExist``), the account is looked up or created again with
        the same key and the order retried once.
        """
        try:
            return self._issue(domains, csr_pem, profile, replaces, progress, dns01)
        except AcmeError as exc:
            if exc.code != "accountDoesNotExist":
                raise
            log.warning("the ACME server does not know the cached account; registering the key again")
            self._forget_account()
            return self._issue(domains, csr_pem, profile, replaces, progress, dns01)
        finally:
            _DEADLINE.value = None

    def _forget_account(self) -> None:
        with self._lock:
            self._client = None
        try:
            data = json.loads(self._account_cache().read_text())
        except (OSError, ValueError):
            return
        data.pop(self.config.directory, None)
        write_json_atomic(self._account_cache(), data)

    def _issue(self, domains: tuple[str, ...], csr_pem: bytes, profile: str, replaces: str,
               progress: Progress | None, dns01: Dns01Records | None = None) -> Issued:
        progress = progress or (lambda line: None)
        deadline = time.monotonic() + self.config.order_timeout
        _DEADLINE.value = deadline
        client = self.client()
        offered = self.profiles() if profile else {}
        if profile and not offered:  # draft-aaron-acme-profiles: only ask for what the directory lists
            raise AcmeError(f"the ACME server offers no profiles; remove profile = {profile!r} from the configuration")
        if profile and profile not in offered:
            raise AcmeError(f"the ACME server offers no profile {profile!r} (it has {', '.join(offered)})")
        with _acme_errors("ordering a certificate"):
            orderr = self._new_order(client, csr_pem, profile, replaces)
        tokens: list[str] = []
        records: dict[str, list[str]] = {}  # dns-01: _acme-challenge name → values
        try:
            if dns01 is not None:
                deadline = self._answer_dns01(client, orderr, dns01, records, progress, deadline)
            else:
                with _acme_errors("answering the HTTP-01 challenge"):
                    for authzr in orderr.authorizations:
                        if authzr.body.status == messages.STATUS_VALID:
                            continue
                        challb = _http01(authzr)
                        response, validation = challb.response_and_validation(client.net.key)
                        self.challenges.add(challb.chall.encode("token"), validation,
                                            name=str(authzr.body.identifier.value))
                        tokens.append(challb.chall.encode("token"))
                        client.answer_challenge(challb, response)
            with _acme_errors(f"answering the {'DNS' if dns01 else 'HTTP'}-01 challenge"):
                for authzr in orderr.authorizations:
                    self._wait_authorization(client, authzr, deadline)
            progress(f"{domains[0]}: challenges validated")
            with _acme_errors("finalizing the order"):
                fullchain = self._finalize(client, orderr, deadline)
        finally:
            for token in tokens:
                self.challenges.remove(token)
            if dns01 is not None and records:
                dns01.remove(list(records), progress)
        _check_issued(fullchain.encode(), csr_pem)
        return Issued(fullchain=fullchain.encode(), order_url=orderr.uri or "")

    def _answer_dns01(self, client: acme_client.ClientV2, orderr: messages.OrderResource, dns01: Dns01Records,
                      records: dict[str, list[str]], progress: Progress, deadline: float) -> float:
        """RFC 8555 8.4: publish every TXT value, wait until every authoritative server has them, then
        ask the CA to look. The propagation wait has its own bound: the order's deadline moves by it."""
        from certkeeper.network.dns.challenge import record_name

        pending = []
        for authzr in orderr.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue
            challb = _dns01(authzr)
            response, validation = challb.response_and_validation(client.net.key)
            records.setdefault(record_name(authzr.body.identifier.value), []).append(validation)
            pending.append((challb, response))
        started = time.monotonic()
        _DEADLINE.value = None  # DNS is not the ACME server: its wait is bounded by propagation_timeout
        dns01.publish(records, progress)
        deadline += time.monotonic() - started
        _DEADLINE.value = deadline
        with _acme_errors("answering the DNS-01 challenge"):
            for challb, response in pending:
                client.answer_challenge(challb, response)
        return deadline

    def _new_order(self, client: acme_client.ClientV2, csr_pem: bytes, profile: str,
                   replaces: str) -> messages.OrderResource:
        csr = x509.load_pem_x509_csr(csr_pem)
        names, _ = acme_client.crypto_util.get_identifiers_from_x509(csr.subject, csr.extensions)
        identifiers = [messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=n) for n in names]
        body = _NewOrder(identifiers=identifiers, profile=profile or None, replaces=replaces or None)
        response = client._post(client.directory["newOrder"], body)  # noqa: SLF001 - library has no replaces
        order = messages.Order.from_json(response.json())
        authorizations = [client._authzr_from_response(self._post_as_get(client, url), uri=url)  # noqa: SLF001
                          for url in order.authorizations]
        return messages.OrderResource(body=order, uri=response.headers.get("Location"),
                                      authorizations=authorizations, csr_pem=csr_pem)

    def _wait_authorization(self, client: acme_client.ClientV2, authzr: messages.AuthorizationResource,
                            deadline: float) -> None:
        for pause in _backoff(deadline):
            response = self._post_as_get(client, authzr.uri)
            body = messages.Authorization.from_json(response.json())
            if body.status == messages.STATUS_VALID:
                return
            if body.status != messages.STATUS_PENDING:
                raise AcmeError(f"authorization for {body.identifier.value} is {body.status.name}: "
                                f"{_challenge_error(body)}")
            time.sleep(_pause_for(response, pause, deadline))
        raise AcmeError(f"timed out after {self.config.order_timeout:g}s waiting for the ACME server to validate "
                        f"{authzr.body.identifier.value}", ca_side=True)

    def _finalize(self, client: acme_client.ClientV2, orderr: messages.OrderResource, deadline: float) -> str:
        try:
            orderr = client.begin_finalization(orderr)
        except messages.Error as error:
            if error.code != "orderNotReady":
                raise
        for pause in _backoff(deadline):
            response = self._post_as_get(client, orderr.uri or "")
            body = messages.Order.from_json(response.json())
            if body.status == messages.STATUS_VALID and body.certificate:
                return str(self._post_as_get(client, body.certificate).text)
            if body.status == messages.STATUS_INVALID:
                code = str(body.error.code or "") if body.error else ""
                raise AcmeError(f"the order failed: {_problem(body.error) if body.error else 'no reason given'}",
                                code=code, ca_side=code in CA_SIDE_CODES)
            if body.status == messages.STATUS_READY:
                client.begin_finalization(orderr)
            time.sleep(_pause_for(response, pause, deadline))
        raise AcmeError(f"timed out after {self.config.order_timeout:g}s waiting for the certificate", ca_side=True)

    @staticmethod
    def _post_as_get(client: acme_client.ClientV2, url: str) -> requests.Response:
        return client._post_as_get(url)  # noqa: SLF001 - RFC 8555 6.3 POST-as-GET

    # -- revocation (RFC 8555 7.6) -------------------------------------------------------------

    def revoke(self, cert_pem: bytes, reason: int) -> bool:
        """Revoke with the account key (the account that ordered it); False when it already was."""
        client = self.client()
        cert = x509.load_pem_x509_certificate(cert_pem)
        try:
            with _acme_errors("revoking the certificate"):
                client.revoke(cert, reason)
        except AcmeError as exc:
            if exc.code == "alreadyRevoked":
                return False
            raise
        return True

    # -- ARI (RFC 9773) --------------------------------------------------------------------

    def renewal_window(self, cert_pem: bytes) -> RenewalWindow | None:
        """The server's suggested window, or None when the directory has no ``renewalInfo``."""
        client = self.client()
        try:
            base = client.directory["renewalInfo"]
        except KeyError:
            return None
        url = f"{str(base).rstrip('/')}/{ari_cert_id(cert_pem)}"
        with _acme_errors("fetching renewal information"):
            response = client.net.get(url, content_type="application/json")
        data = response.json()
        window = data.get("suggestedWindow") or {}
        start, end = parse_iso(window.get("start")), parse_iso(window.get("end"))
        if start is None or end is None:
            raise AcmeError(f"{url}: malformed renewalInfo (no suggestedWindow start/end)")
        if end < start:
            raise AcmeError(f"{url}: renewalInfo window ends before it starts")
        retry = _retry_after_seconds(response)
        # RFC 9773 4.3.3: six hours without Retry-After; clamp a silly one to between a minute and a day.
        retry = 6 * 3600.0 if retry is None else min(max(retry, 60.0), 86400.0)
        return RenewalWindow(start=start, end=end, retry_after=retry,
                             explanation_url=str(data.get("explanationURL", "")))


def ari_cert_id(cert_pem: bytes) -> str:
    """RFC 9773 4.1: base64url(AKI keyIdentifier) "." base64url(serial number DER bytes)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier or b""
    serial = cert.serial_number
    serial_bytes = serial.to_bytes((serial.bit_length() + 8) // 8, "big")  # DER INTEGER: leading 0 if high bit

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    return f"{b64(aki)}.{b64(serial_bytes)}"


def _check_issued(fullchain: bytes, csr_pem: bytes) -> None:
    """What the CA sent is a PEM chain whose first certificate is for the CSR's key: else the CA
    failed (and another authority may do better); nothing of it reaches the keeper."""
    from cryptography.hazmat.primitives import serialization

    try:
        leaf = x509.load_pem_x509_certificates(fullchain)[0]
    except ValueError:
        raise AcmeError("the ACME server sent a certificate that is not PEM", ca_side=True) from None

    def spki(key: Any) -> bytes:
        return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))

    if spki(leaf.public_key()) != spki(x509.load_pem_x509_csr(csr_pem).public_key()):
        raise AcmeError("the ACME server sent a certificate for another key than the one in the CSR",
                        ca_side=True)


def _jwk(pem: bytes) -> jose.JWK:
    key = certs.load_private_key(pem, "acme.account_key")
    if isinstance(key, rsa.RSAPrivateKey):
        return jose.JWKRSA(key=key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return jose.JWKEC(key=key)
    raise LocalError("acme.account_key: must be an RSA or ECDSA key")


def _jws_alg(key: jose.JWK) -> jose.JWASignature:
    if isinstance(key, jose.JWKEC):
        size = key.key.curve.key_size
        return {256: jose.ES256, 384: jose.ES384, 521: jose.ES512}[size]
    return jose.RS256


def _key_id(pem: bytes) -> str:
    import hashlib

    return hashlib.sha256(certs.public_key_der(pem)).hexdigest()[:16]


def _http01(authzr: messages.AuthorizationResource) -> messages.ChallengeBody:
    for challb in authzr.body.challenges:
        if isinstance(challb.chall, acme_challenges.HTTP01):
            return challb
    raise AcmeError(f"the ACME server offers no http-01 challenge for {authzr.body.identifier.value}")


def _dns01(authzr: messages.AuthorizationResource) -> messages.ChallengeBody:
    for challb in authzr.body.challenges:
        if isinstance(challb.chall, acme_challenges.DNS01):
            return challb
    raise AcmeError(f"the ACME server offers no dns-01 challenge for {authzr.body.identifier.value}")


def _backoff(deadline: float) -> Iterator[float]:
    pause = _FIRST_POLL
    while time.monotonic() < deadline:
        yield pause
        pause = min(pause * 2, _MAX_POLL)


def _pause_for(response: requests.Response, pause: float, deadline: float) -> float:
    retry = _retry_after_seconds(response)
    if retry is not None:
        pause = max(pause, retry)
    return max(0.0, min(pause, deadline - time.monotonic()))


def _retry_after_seconds(response: requests.Response) -> float | None:
    """RFC 9110 10.2.3: Retry-After is delay-seconds or an HTTP-date."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def _problem(error: messages.Error) -> str:
    parts = [error.typ or "error"]
    if error.detail:
        parts.append(error.detail)
    text = ": ".join(parts)
    for sub in getattr(error, "subproblems", None) or ():
        ident = getattr(sub.identifier, "value", "") if getattr(sub, "identifier", None) else ""
        text += f"; {ident}: {sub.detail}" if ident else f"; {sub.detail}"
    return text


def _challenge_error(body: messages.Authorization) -> str:
    for challb in body.challenges:
        if challb.error is not None:
            return _problem(challb.error)
    return "no error detail"


@contextmanager
def _acme_errors(doing: str) -> Iterator[None]:
    """Turn library and network exceptions into one-line AcmeErrors."""
    _LAST_RETRY_AFTER.value = None
    _LAST_STATUS.value = None
    try:
        yield
    except AcmeError:
        raise
    except messages.Error as error:
        # RFC 8555 6.6: a rateLimited error comes with Retry-After; never retry sooner.
        retry = getattr(_LAST_RETRY_AFTER, "value", None)
        if retry is None and error.code == "rateLimited":
            retry = 3600.0
        status = getattr(_LAST_STATUS, "value", None) or 0
        raise AcmeError(f"{doing}: {_problem(error)}", retry_after=retry, code=error.code or "",
                        ca_side=error.code in CA_SIDE_CODES or status >= 500) from None
    except acme_errors.ValidationError as error:
        details = "; ".join(_challenge_error(a.body) for a in error.failed_authzrs)
        raise AcmeError(f"{doing}: validation failed: {details}") from None
    except acme_errors.ClientError as error:  # an HTTP error without a problem document
        response = error.args[0] if error.args else None
        if isinstance(response, requests.Response):
            raise AcmeError(f"{doing}: HTTP {response.status_code} {response.reason} from {response.url}",
                            retry_after=_retry_after_seconds(response),
                            ca_side=response.status_code >= 500 or response.status_code == 429) from None
        raise AcmeError(f"{doing}: {error}") from None
    except acme_errors.Error as error:
        raise AcmeError(f"{doing}: {error}") from None
    except requests.exceptions.SSLError as error:
        raise AcmeError(f"{doing}: TLS error talking to the ACME server ({_short(error)}); "
                        "set [acme] ca_bundle for a private CA") from None
    except requests.exceptions.Timeout as error:
        raise AcmeError(f"{doing}: the ACME server did not answer in time: {_short(error)}", ca_side=True) from None
    except requests.exceptions.RequestException as error:
        raise AcmeError(f"{doing}: cannot reach the ACME server: {_short(error)}", ca_side=True) from None
    except (ValueError, KeyError, jose.DeserializationError) as error:
        raise AcmeError(f"{doing}: unexpected answer from the ACME server: {_short(error)}", ca_side=True) from None


def _read_body(response: requests.Response, deadline: float) -> requests.Response:
    """Read a streamed body in pieces, giving up at ``deadline`` (a response hook)."""
    chunks = []
    while True:
        if time.monotonic() >= deadline:
            response.close()
            raise requests.exceptions.Timeout(f"the body from {response.url} was still arriving at the "
                                              "order's deadline")
        try:
            chunk = response.raw.read1(65536, decode_content=True)
        except Exception as exc:  # noqa: BLE001 - urllib3's read errors become requests' ones
            response.close()
            raise requests.exceptions.ConnectionError(str(exc)) from None
        if not chunk:
            break
        chunks.append(chunk)
    response._content = b"".join(chunks)  # noqa: SLF001 - what requests' .content caches
    response._content_consumed = True  # type: ignore[attr-defined]  # noqa: SLF001
    return response


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) < 300 else text[:297] + "..."
