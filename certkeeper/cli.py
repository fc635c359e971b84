"""Command line: argv → subcommand → exit code. Nothing else lives here.

Each subcommand is ``main(config, args, out) -> int`` in its own module of
``certkeeper.commands`` (those import the heavy domain code inside ``main``, so
start-up stays fast). Exit codes follow acme-client(1) where they overlap:

    0  something changed (or, for check/status/verify, all is well)
    1  an error
    2  nothing was due (renew) / nothing to do
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TextIO

from certkeeper import __version__
from certkeeper.commands import (
    check,
    dns,
    import_acme_client,
    mta_sts,
    renew,
    revoke,
    rotate_dkim,
    run,
    status,
    verify,
)
from certkeeper.commands.roll_key import main as roll_key_main
from certkeeper.core.config import DEFAULT_PATH, REVOCATION_REASONS, Config, load
from certkeeper.core.errors import CertkeeperError, ConfigError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_UNCHANGED = 2

Command = Callable[[Config, argparse.Namespace, TextIO], int]

COMMANDS: dict[str, Command] = {
    "check": check.main,
    "renew": renew.main,
    "status": status.main,
    "run": run.main,
    "verify": verify.main,
    "dns": dns.main,
    "mta-sts": mta_sts.main,
    "rotate-dkim": rotate_dkim.main,
    "revoke": revoke.main,
    "roll-key": roll_key_main,
}
# Subcommands that do not read certkeeper.toml.
NO_CONFIG: dict[str, Callable[[argparse.Namespace, TextIO], int]] = {
    "import-acme-client": import_acme_client.main,
}


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1 (an error), not argparse's 2, which means "nothing was due" here."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"certkeeper: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    # --config is accepted before and after the subcommand.
    common = _Parser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"configuration file (default {DEFAULT_PATH}, or $CERTKEEPER_CONFIG)")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output (repeat for debug)")

    parser = _Parser(prog="certkeeper", parents=[common],
                                     description="Keeps TLS certificates, DKIM keys and MTA-STS alive.")
    parser.add_argument("--version", action="version", version=f"certkeeper {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("check", parents=[common], help="validate the configuration and exit 0 or 1")

    p = sub.add_parser("renew", parents=[common], help="renew certificates that are due (exit 0 renewed, 2 none due)")
    p.add_argument("--force", action="store_true", help="renew the named (or all) certificates even if not due")
    p.add_argument("--dry-run", action="store_true",
                   help="the whole path against the staging directory; install nothing, run no hook")
    p.add_argument("--directory", metavar="URL", help="with --dry-run: the ACME directory (default [acme] staging)")
    p.add_argument("names", nargs="*", metavar="NAME", help="certificate names (default: all)")

    p = sub.add_parser("revoke", parents=[common],
                       help="revoke a certificate at its issuing authority, then renew it with a fresh key")
    p.add_argument("--reason", default="unspecified", choices=list(REVOCATION_REASONS),
                   help="RFC 5280 reason (default unspecified)")
    p.add_argument("name", metavar="NAME", help="certificate name")

    p = sub.add_parser("status", parents=[common], help="show certificates, DKIM selectors and MTA-STS state")
    p.add_argument("--json", action="store_true", help="machine-readable output with stable keys")
    p.add_argument("names", nargs="*", metavar="NAME", help="certificate names (default: all)")

    p = sub.add_parser("run", parents=[common], help="run the daemon (HTTP-01, mta-sts.txt, scheduler)")
    p.add_argument("-d", dest="foreground", action="store_true",
                   help="stay in the foreground and log to stderr")

    p = sub.add_parser("verify", parents=[common], help="check that each service serves the certificate on disk")
    p.add_argument("names", nargs="*", metavar="NAME", help="certificate names (default: all)")

    p = sub.add_parser("dns", parents=[common], help="print (or --check) the DNS records a mail domain needs")
    p.add_argument("domain", nargs="?", help="mail domain (default: every configured one)")
    p.add_argument("--check", action="store_true", help="look each record up and report ok/missing/wrong")

    p = sub.add_parser("mta-sts", parents=[common], help="MTA-STS policy and _mta-sts record")
    mta = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = mta.add_parser("publish", parents=[common], help="serve the policy, then publish its id in DNS")
    q.add_argument("domain", nargs="?", help="mail domain (default: every [[mta_sts]] domain)")

    p = sub.add_parser("rotate-dkim", parents=[common], help="start a DKIM key rotation now")
    p.add_argument("domain", nargs="?", help="mail domain (default: every [[dkim]] domain)")
    p.add_argument("--now", action="store_true",
                   help="emergency rotation: skip publish_ahead (still waits for DNS)")
    p.add_argument("--adopt", metavar="SELECTOR",
                   help="take over a key made by hand (its record in DNS): active if its private key is found, "
                        "else retired on schedule")

    p = sub.add_parser("roll-key", parents=[common],
                       help="move a dane certificate to its next key once its TLSA record is seen (exit 2: not yet)")
    p.add_argument("name", metavar="NAME", help="certificate name")

    p = sub.add_parser("import-acme-client", parents=[common],
                       help="print a certkeeper.toml equivalent to an acme-client.conf")
    p.add_argument("file", nargs="?", default="/etc/acme-client.conf", help="default /etc/acme-client.conf")
    return parser


def config_path(args: argparse.Namespace) -> str:
    return getattr(args, "config", None) or os.environ.get("CERTKEEPER_CONFIG") or str(DEFAULT_PATH)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    from certkeeper.core import files

    # State, locks, sockets and temp files are private unless a mode says otherwise. Put back at the
    # end for callers in the same process (tests); hook commands get the inherited umask meanwhile.
    files.restrict_umask()
    try:
        return _main(argv, out or sys.stdout)
    finally:
        os.umask(files.inherited_umask())


def _main(argv: Sequence[str] | None, out: TextIO) -> int:
    from certkeeper.core import logs

    args = build_parser().parse_args(argv)
    logs.setup_cli(getattr(args, "verbose", 0) or 0)
    try:
        if args.command in NO_CONFIG:
            code = NO_CONFIG[args.command](args, out)
        else:
            code = COMMANDS[args.command](load(config_path(args)), args, out)
        out.flush()  # a closed pipe shows here, not as a traceback at exit
        return code
    except BrokenPipeError:  # e.g. `certkeeper status | head`: the reader has what it wanted
        quiet_stdout()
        return EXIT_OK if args.command == "status" else EXIT_ERROR
    except ConfigError as exc:
        for line in exc.lines:
            print(f"certkeeper: {line}", file=sys.stderr)
        return EXIT_ERROR
    except CertkeeperError as exc:
        print(f"certkeeper: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("certkeeper: interrupted", file=sys.stderr)
        return 130


def quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not report the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # stdout is not a file (tests): nothing will be flushed to a pipe
    finally:
        os.close(devnull)


def entry() -> NoReturn:
    """The ``certkeeper`` command. A one-shot command has written and synced all it writes when
    ``main`` returns: with no other thread left, the interpreter's teardown (tens of milliseconds
    for the libraries loaded) is skipped. The daemon's threads, if any, get the normal exit."""
    import logging
    import threading

    code = main()
    if threading.active_count() > 1:
        sys.exit(code)
    logging.shutdown()
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass  # `certkeeper status | head`: the reader has what it wanted
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


if __name__ == "__main__":
    entry()
