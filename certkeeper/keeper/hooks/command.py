"""Any other program: the ``command`` argv of the [hooks.NAME] table, run without a shell.

certkeeper tells it what changed in the environment: ``CERTKEEPER_HOOK`` (the
hook's name) and ``CERTKEEPER_CERTIFICATES`` (space-separated certificate names).
"""

from __future__ import annotations

NAME = "command"
DEFAULT_COMMANDS: dict[str, tuple[str, ...]] = {}  # config requires ``command`` for a hook of this kind
SUGGESTED_VERIFY: tuple[str, ...] = ()
