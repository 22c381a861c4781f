#!/usr/bin/env bash
# Development PKI for the broker's TLS listeners: a CA, a server certificate and client certificates.
#
#   make-dev-certs.sh OUT_DIR [CLIENT_NAME...]        e.g.  make-dev-certs.sh ./secrets/certs hub s01 s02
#
# Writes into OUT_DIR (created 0700):
#   ca.crt ca.key             the development CA (ca.key signs everything below: keep it off the broker)
#   server.crt server.key     the broker; SAN = localhost, 127.0.0.1, ::1, broker (the compose service)
#                             plus $SERVER_SANS, e.g. SERVER_SANS="DNS:mqtt.example.com,IP:10.0.0.5"
#   NAME.crt NAME.key         one client certificate per NAME, CN = NAME: on the mutual-TLS listener
#                             (use_identity_as_username) the CN *is* the MQTT username the ACL checks
#
# Idempotent: existing files are kept, so it can be re-run to add clients to an existing CA.
# EC P-256 keys, SHA-256 signatures; CA 10 years, leaves $DAYS days (default 825).
# For production use your organisation's PKI; this CA exists for development and tests.
set -euo pipefail

usage() { echo "usage: $0 OUT_DIR [CLIENT_NAME...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
out="$1"; shift
days="${DAYS:-825}"
command -v openssl >/dev/null || { echo "openssl is not installed" >&2; exit 1; }

umask 077
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# sign NAME SUBJECT EXTENSIONS: NAME.key (new if missing) -> NAME.crt signed by the CA
sign() {
    local name="$1" subject="$2" ext="$3"
    [ -f "$out/$name.crt" ] && { echo "kept     $out/$name.crt"; return; }
    [ -f "$out/$name.key" ] || newkey "$out/$name.key"
    openssl req -new -key "$out/$name.key" -subj "$subject" -out "$tmp/$name.csr"
    printf '%s\n' "$ext" > "$tmp/$name.ext"
    openssl x509 -req -in "$tmp/$name.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
        -CAserial "$out/ca.srl" -CAcreateserial -days "$days" -sha256 \
        -extfile "$tmp/$name.ext" -out "$out/$name.crt" 2>/dev/null
    echo "created  $out/$name.crt"
}

if [ ! -f "$out/ca.crt" ]; then
    newkey "$out/ca.key"
    openssl req -new -x509 -key "$out/ca.key" -sha256 -days 3650 -subj "/O=edgeml/CN=edgeml development CA" \
        -addext "basicConstraints=critical,CA:true,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "subjectKeyIdentifier=hash" -out "$out/ca.crt"
    echo "created  $out/ca.crt"
else
    echo "kept     $out/ca.crt"
fi

leaf="basicConstraints=critical,CA:false
keyUsage=critical,digitalSignature
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid:always"

# Clients verify the broker's name against the SAN (CN is ignored by modern TLS clients).
sans="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:broker${SERVER_SANS:+,$SERVER_SANS}"
sign server "/O=edgeml/CN=localhost" "$leaf
extendedKeyUsage=serverAuth
subjectAltName=$sans"

name_re='^[A-Za-z0-9_.:-]{1,64}$'   # the contract's device id rule (edge_agent.contract.check_id)
for name in "$@"; do
    if ! [[ "$name" =~ $name_re ]] || [ "$name" = ca ] || [ "$name" = server ]; then
        echo "invalid client name '$name': 1-64 of A-Z a-z 0-9 _ . : - (and not 'ca' or 'server')" >&2
        exit 2
    fi
    sign "$name" "/O=edgeml/CN=$name" "$leaf
extendedKeyUsage=clientAuth"
done
# Certificates are public; keys stay private to their owner (0600).
chmod 644 "$out"/*.crt
