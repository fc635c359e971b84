"""Let every user search (not list) the directories on the way to this interpreter and this checkout.

Run by scripts/test.sh as root: the unprivileged roles run ``python -m certkeeper.worker`` as
_certkeeper, so a Python under /root (pyenv) or a checkout in a private directory must be
reachable. A production install (README, Installing) lives under /usr/local and needs nothing.
"""

import os
import sys
import sysconfig
from pathlib import Path

here = Path(__file__).resolve().parent.parent
targets = {Path(os.path.realpath(sys.executable)), here / "certkeeper", Path(sysconfig.get_paths()["stdlib"]),
           Path(sysconfig.get_paths()["purelib"])}
for target in targets:
    for directory in (*reversed(target.parents), target):
        if directory.is_dir():
            mode = directory.stat().st_mode & 0o7777
            if not mode & 0o001:
                directory.chmod(mode | 0o001)
                print(f"reachable.py: {directory}: mode {mode:04o} -> {mode | 0o001:04o}")
