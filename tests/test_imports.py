"""What a status request or a metrics scrape loads: no DNS, ACME or HTTP client libraries.

The daemon answers both in its own process; dnspython, aiohttp, acme, requests and josepy belong to
the processes that talk to the network. Checked in a fresh interpreter, which imports the modules and
then does the work (a status document and a scrape's collection) on DKIM and MTA-STS state.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("dns.resolver", "dns.query", "aiohttp", "acme", "requests", "josepy")

SCRIPT = """
import json, sys
from datetime import UTC, datetime
from pathlib import Path

import certkeeper.keeper.status as status
import certkeeper.keeper.metrics as metrics
from certkeeper.core import config, dkimstate, mtasts, mtasts_state

tmp = Path(sys.argv[1])
cfg = config.parse(f'''state_dir = "{tmp}/state"
[[certificate]]
name = "mta-sts.example.com"
key = "{tmp}/k"
cert = "{tmp}/c"
chain = "{tmp}/ch"
fullchain = "{tmp}/f"
[[dkim]]
domain = "example.com"
key_dir = "{tmp}/keys"
[[mta_sts]]
domain = "example.com"
mx = ["mail.example.com"]
''', tmp / "c.toml")
now = datetime(2026, 3, 4, tzinfo=UTC)
item = cfg.dkim[0]
state = dkimstate.DomainState("example.com")
state = state.with_key(dkimstate.new_key(state, item, "rsa2048", now))
dkimstate.save_state(cfg, state)
mtasts_state.save_state(cfg, mtasts_state.DomainState("example.com").with_published(
    mtasts.Policy.from_config(cfg.mta_sts[0]), now))
doc = status.collect(cfg, now=now)
assert doc["dkim"][0]["state"] == "pending" and doc["mta_sts"][0]["status"] == "published", doc
status.render_text(doc)
families = list(metrics.StateCollector(cfg, now).collect())
assert any(f.name == "certkeeper_dkim_selector_state" and f.samples for f in families)
print(json.dumps(sorted(m for m in sys.modules if m in FORBIDDEN or m.split(".")[0] in FORBIDDEN)))
"""


def test_status_and_metrics_load_no_network_libraries(tmp_path):
    script = SCRIPT.replace("FORBIDDEN", repr(FORBIDDEN))
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"a status request or scrape loaded {result.stdout.strip()}"
