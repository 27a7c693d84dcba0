#!/usr/bin/env bash
# Base-image digests of the Dockerfile.
#
#   scripts/pin-images.sh           resolve every FROM image's tag at its registry and rewrite the
#                                   line as IMAGE:TAG@sha256:DIGEST (the multi-arch index digest,
#                                   so amd64 and arm64 builds both stay pinned)
#   scripts/pin-images.sh --check   offline: fail unless every FROM line (other than a previous
#                                   stage) carries @sha256:<64 hex>; what CI runs
#
# Registries spoken to: Docker Hub (registry-1.docker.io, anonymous pull token from
# auth.docker.io) and gcr.io (anonymous). Only HEAD/GET of manifests; nothing is pulled.
# Review the diff after a refresh: a new digest is new code in the image.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKERFILE="${DOCKERFILE:-$ROOT/Dockerfile}"
ACCEPT="application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.list.v2+json,application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json"

# Image references of the FROM lines, previous build stages left out.
from_images() {
    awk 'toupper($1) == "FROM" {
             image = ""
             for (i = 2; i <= NF; i++) if ($i !~ /^--/) { image = $i; break }
             if (image != "") print image
             for (i = 2; i <= NF; i++) if (toupper($i) == "AS" && i < NF) print "stage:" $(i + 1)
         }' "$DOCKERFILE" |
        awk '/^stage:/ { stages[substr($0, 7)] = 1; next } !($0 in stages) { print }'
}

if [ "${1:-}" = "--check" ]; then
    status=0
    while read -r image; do
        if [[ "$image" =~ @sha256:[0-9a-f]{64}$ ]]; then
            echo "pinned:   $image"
        else
            echo "UNPINNED: $image (run scripts/pin-images.sh where the registry is reachable)" >&2
            status=1
        fi
    done < <(from_images)
    exit "$status"
fi

# digest REGISTRY REPOSITORY TAG -> sha256:...
digest() {
    local registry="$1" repository="$2" tag="$3" auth=()
    if [ "$registry" = "registry-1.docker.io" ]; then
        local token
        token="$(curl -fsS --max-time 20 "https://auth.docker.io/token?service=registry.docker.io&scope=repository:$repository:pull" |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')"
        auth=(-H "Authorization: Bearer $token")
    fi
    curl -fsS --max-time 20 -I "${auth[@]}" -H "Accept: $ACCEPT" \
        "https://$registry/v2/$repository/manifests/$tag" |
        tr -d '\r' | awk 'tolower($1) == "docker-content-digest:" { print $2 }'
}

changed=0
while read -r image; do
    name="${image%@*}"            # drop an old digest
    tag="${name##*:}"
    repo="${name%:*}"
    [ "$tag" != "$name" ] || { echo "skip $image: no tag to resolve" >&2; continue; }
    case "$repo" in
        */*.*/* | *.*/*) registry="${repo%%/*}"; repository="${repo#*/}" ;;
        */*) registry="registry-1.docker.io"; repository="$repo" ;;
        *) registry="registry-1.docker.io"; repository="library/$repo" ;;
    esac
    d="$(digest "$registry" "$repository" "$tag" 2>/dev/null)" ||
        { echo "error: cannot resolve $name at $registry (is the registry reachable from here?)" >&2; exit 1; }
    [[ "$d" =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "error: no digest for $name from $registry" >&2; exit 1; }
    pinned="$name@$d"
    if [ "$pinned" != "$image" ]; then
        # A plain string replacement: image references are full of characters sed would read.
        python3 - "$DOCKERFILE" "$image" "$pinned" <<'PY'
import sys
path, old, new = sys.argv[1:]
text = open(path).read()
open(path, "w").write(text.replace(old, new))
PY
        echo "updated:  $pinned"
        changed=1
    else
        echo "current:  $pinned"
    fi
done < <(from_images)
[ "$changed" -eq 0 ] || echo "Dockerfile updated: review and commit the new digests"
