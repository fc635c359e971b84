#!/bin/sh
# Install what certkeeper's tests and demo need on Debian 12 (bookworm), as root.
# Idempotent: packages already present are not fetched again.
set -eu
cd "$(dirname "$0")/.."

APT_PACKAGES="pebble bind9 bind9-dnsutils bind9-utils dovecot-core dovecot-imapd mandoc openssl rspamd etcd-server etcd-client unbound"
# OpenSMTPD 7.4 from backports: bookworm's own 6.8 fails every TLS handshake with OpenSSL 3.
BACKPORTS_PACKAGES="opensmtpd opensmtpd-filter-dkimsign"

missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
smtpd_ok=no
if dpkg -s opensmtpd-filter-dkimsign >/dev/null 2>&1 \
    && dpkg-query -W -f='${Version}' opensmtpd 2>/dev/null | grep -q '^7\.'; then smtpd_ok=yes; fi

if [ -n "$missing" ] || [ "$smtpd_ok" = no ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-deps: run as root to install:$missing $BACKPORTS_PACKAGES (bookworm-backports)" >&2
        exit 1
    fi
    if [ -f /etc/debian_version ] && ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # The machine's own Debian mirror: none is written here.
        mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
                 2>/dev/null | grep -E '^(URIs:|deb )' | grep -oE 'https?://[^ ]+/debian/?' \
                 | grep -v -e security -e backports | head -n 1)
        if [ -z "$mirror" ]; then
            echo "install-deps: no Debian mirror in the apt sources; add bookworm-backports by hand" >&2
            exit 1
        fi
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" > /etc/apt/sources.list.d/bookworm-backports.sources
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $APT_PACKAGES
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports $BACKPORTS_PACKAGES
fi
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check -e '.[test]'
if [ "$(id -u)" = 0 ]; then
    # Run as root, certkeeper runs its network worker and listener as _certkeeper (certkeeper(8),
    # PRIVILEGE SEPARATION): that user must exist and reach this interpreter and checkout.
    id _certkeeper >/dev/null 2>&1 \
        || useradd --system --no-create-home --home-dir /var/empty --shell /usr/sbin/nologin _certkeeper
    python3 scripts/reachable.py
fi
