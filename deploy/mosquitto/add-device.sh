#!/usr/bin/env bash
# Provision (or remove) one broker identity: a device id, or `hub` for the hub workers.
#
#   add-device.sh [-p PASSWD_FILE] [-c CERT_DIR] DEVICE_ID [PASSWORD]
#   add-device.sh [-p PASSWD_FILE] --remove DEVICE_ID
#
#   -p PASSWD_FILE  mosquitto password file (default /etc/mosquitto/passwd; created if missing).
#                   The password is PASSWORD, or $DEVICE_PASSWORD, or a new random one that is
#                   printed once: put it into the device's broker URL, mqtts://ID:PASSWORD@host:8883.
#   -c CERT_DIR     also issue a client certificate CN=DEVICE_ID signed by the CA in CERT_DIR
#                   (make-dev-certs.sh; development CA) for the mutual-TLS listener on 8884.
#   -n              certificate only: no password entry.
#   --remove        delete the password entry (revoke a certificate with a CRL: see README).
#
# The device id is the MQTT username; the ACL lets it publish only edgeml/devices/ID/{results,status}.
# mosquitto reads the password file at start and on reload: afterwards run
#   systemctl reload mosquitto     (or: docker compose kill -s HUP broker)
set -euo pipefail

passwd=/etc/mosquitto/passwd
certs=""
remove=0
password_entry=1
usage() { sed -n '2,17p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        -p) passwd="$2"; shift 2 ;;
        -c) certs="$2"; shift 2 ;;
        -n) password_entry=0; shift ;;
        --remove) remove=1; shift ;;
        -h|--help) usage ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] && [ $# -le 2 ] || usage
dev="$1"
password="${2:-${DEVICE_PASSWORD:-}}"

# The contract's device id rule (edge_agent.contract.check_id) minus ':' (the password file's
# separator). Also keeps MQTT wildcards and '/' out of the ACL's %u.
if ! [[ "$dev" =~ ^[A-Za-z0-9_.-]{1,64}$ ]]; then
    echo "invalid device id '$dev': use 1-64 of A-Z a-z 0-9 _ . -" >&2
    exit 2
fi
need_passwd() {
    command -v mosquitto_passwd >/dev/null || { echo "mosquitto_passwd is not installed (apt-get install mosquitto)" >&2; exit 1; }
}

if [ "$remove" = 1 ]; then
    need_passwd
    mosquitto_passwd -D "$passwd" "$dev"
    echo "removed $dev from $passwd; reload the broker"
    exit 0
fi
if [ "$dev" = hub ]; then echo "note: 'hub' is the hub identity (reads every device, publishes models)" >&2; fi

if [ "$password_entry" = 1 ]; then
    need_passwd
    generated=0
    if [ -z "$password" ]; then
        password="$(openssl rand -base64 33 | tr -d '/+=\n' | cut -c1-32)"
        generated=1
    fi
    ( umask 027; [ -f "$passwd" ] || : > "$passwd" )
    # -b puts the password on this command line for an instant (visible in ps to local users):
    # run it on the broker host as root, not on a shared machine.
    mosquitto_passwd -b "$passwd" "$dev" "$password"
    # The broker re-reads the file as user mosquitto on reload.
    if [ "$(id -u)" = 0 ] && getent group mosquitto >/dev/null; then
        chgrp mosquitto "$passwd"
    fi
    chmod 0640 "$passwd"
    echo "password entry for $dev in $passwd"
    if [ "$generated" = 1 ]; then echo "password: $password"; fi
fi

if [ -n "$certs" ]; then
    "$(dirname "$0")/make-dev-certs.sh" "$certs" "$dev" >/dev/null
    echo "client certificate: $certs/$dev.crt, key: $certs/$dev.key (CN=$dev)"
fi
if [ "$password_entry" = 1 ]; then echo "reload the broker to apply: systemctl reload mosquitto"; fi
