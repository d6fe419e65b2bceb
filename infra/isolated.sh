#!/usr/bin/env bash
# Run a command in a private network namespace where only loopback exists.
# Ray listens on every interface and its dashboard agent binds the machine's own address, so tests that
# start Ray or servers must not share the host's network; inside the namespace, any attempt to reach the
# outside fails at once, which also proves the tests need no network.
set -euo pipefail
if [ "$(id -u)" -eq 0 ]; then
  exec unshare -n -- sh -c 'ip link set lo up && exec "$@"' sh "$@"
fi
# Unprivileged users: a user namespace maps us to root inside it, which allows the same.
if unshare -rn true 2>/dev/null; then
  exec unshare -rn -- sh -c 'ip link set lo up && exec "$@"' sh "$@"
fi
echo "isolated.sh: cannot create a network namespace here (need root or user namespaces)" >&2
exit 1
