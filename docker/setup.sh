#!/bin/sh
# Create the compose demo's three replicas in DATA (default /data), once: site alpha
# creates the merge project, beta and gamma join it from alpha's directory and alpha admits
# them. From then on the servers sync them over HTTP.
#
# It also generates the servers' tokens into CONFIG (default /config), once: `tokens` (the
# file every server accepts: alpha admin, beta and gamma contribute) and SITE.token (the
# token each server uses with its peers), each 256 random bits, readable by their owner
# only. No token ships with the repository.
set -eu
DATA="${1:-/data}"
CONFIG="${2:-/config}"
PROFILE="${CRDT_MERGE_PROFILE:-v1}"
umask 077
if [ ! -e "$CONFIG/tokens" ]; then
    mkdir -p "$CONFIG"
    : > "$CONFIG/tokens.new"
    for site in alpha beta gamma; do
        token=$(python3 -c 'import secrets; print(secrets.token_hex(32))')
        printf '%s\n' "$token" > "$CONFIG/$site.token"
        scope=contribute
        [ "$site" = alpha ] && scope=admin
        printf '%s %s %s\n' "$site" "$scope" "$token" >> "$CONFIG/tokens.new"
    done
    mv "$CONFIG/tokens.new" "$CONFIG/tokens"
    echo "setup: generated tokens in $CONFIG"
fi
if [ -e "$DATA/alpha/replica.sqlite" ]; then
    echo "setup: the replicas in $DATA exist already"
    exit 0
fi
crdt-merge init "$DATA/alpha" --site alpha --profile "$PROFILE"
for site in beta gamma; do
    crdt-merge --json init "$DATA/$site" --site "$site" --join "$DATA/alpha" > "$DATA/$site.join.json"
    key=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["public_key"])' \
        "$DATA/$site.join.json")
    crdt-merge admit "$DATA/alpha" "$site" "$key"
    rm "$DATA/$site.join.json"
done
echo "setup: alpha, beta and gamma are ready in $DATA"
