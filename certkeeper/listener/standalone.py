"""The HTTP-01 listener of one CLI run, when no daemon is running.

``certkeeper renew`` without a daemon answers its own challenges: it starts the
daemon's HTTP listener (``web.WebServer``, HTTP side only: challenges and
redirects, no HTTPS) on ``[http] listen`` in a background thread for the time
of the orders, and stops it after. Nothing is bound when nothing is due.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from certkeeper.core.challenges import ChallengeTable
from certkeeper.core.config import Config
from certkeeper.core.errors import LocalError


@contextmanager
def serving(config: Config, challenges: ChallengeTable) -> Iterator[None]:
    from certkeeper.listener.web import WebServer

    http_only = dataclasses.replace(config, http=dataclasses.replace(config.http, tls_listen=()))
    loop = asyncio.new_event_loop()
    server = WebServer(http_only, challenges)
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.start())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(server.stop())

    thread = threading.Thread(target=run, name="http-01", daemon=True)
    thread.start()
    started.wait(30)
    if failure:
        thread.join(5)
        loop.close()
        exc = failure[0]
        raise exc if isinstance(exc, LocalError) else LocalError(f"HTTP-01 listener: {exc}")
    try:
        yield
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
