#!/bin/sh
# Create the compose demo's three replicas in DATA (default /data), once: site alpha
# creates the merge project, beta and gamma join it from alpha's directory and alpha admits
# them. From then on the servers sync them over HTTP.
set -eu
DATA="${1:-/data}"
PROFILE="${CRDT_MERGE_PROFILE:-v1}"
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
