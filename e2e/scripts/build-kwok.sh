#!/usr/bin/env bash
# Builds the kwok controller (sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION: fake nodes and pods for
# the scale measurement) into the cache, once, and lays out the Stages it plays from the same
# module. A warm run only compares a stamp and a file and returns in milliseconds.
# Only the controller: kwokctl (which makes whole clusters from images) is not needed, since
# kwok.sh runs the controller as a host process against the e2e cluster's apiserver.
set -euo pipefail
source "$(dirname "$0")/common.sh"

kwok_bin="$BIN/kwok"
kwok_mod="sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
# No -X needed: the module's own pkg/consts.Version is the tag's (`kwok --version`).
ldflags="-s -w"
stamp="$kwok_mod $ldflags"
if [[ -x $kwok_bin && $(cat "$BIN/kwok.version" 2>/dev/null) == "$stamp" ]]; then
  log "kwok $KWOK_VERSION: cached ($kwok_bin)"
else
  step "go install $kwok_mod (cold: about 4 min on 2 cores)"
  mkdir -p "$BIN"
  # Into a private GOBIN, then one rename: a half-written binary never sits at $kwok_bin.
  tmp=$(mktemp -d "$CACHE/kwok-build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  GOBIN="$tmp" CGO_ENABLED=0 go install -trimpath -ldflags "$ldflags" "$kwok_mod"
  mv "$tmp/kwok" "$kwok_bin"
  echo "$stamp" > "$BIN/kwok.version"
  done_step
fi

# The kwok binary has no Stages built in: without a Stage for nodes and pods it refuses to
# start ("no stages found"). kwokctl feeds it kustomize/stage/fast of its own module; so do we:
#   node/fast                 node-initialize: conditions Ready, allocatable/capacity (kept
#                             when the node brings its own), nodeInfo, phase Running
#   node/heartbeat-with-lease node-heartbeat-with-lease: status refresh every 10-20 min, the
#                             liveness itself is the Lease (--node-lease-duration-seconds)
#   pod/fast                  pod-ready (Pending -> Running and Ready at once, pod IP from
#                             --cidr), pod-complete (Job pods), pod-delete (a pod with a
#                             deletionTimestamp is deleted with grace period 0)
stages="$CACHE/kwok-$KWOK_VERSION/stages.yaml"
if [[ -s $stages ]]; then
  log "kwok $KWOK_VERSION stages: cached ($stages)"
else
  step "kwok $KWOK_VERSION stages (kustomize/stage/fast) from the module cache"
  mod_dir=$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" \
    | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [[ -d $mod_dir/kustomize/stage/pod/fast ]] || die "no kustomize/stage in the kwok module ($mod_dir)"
  mkdir -p "${stages%/*}"
  for dir in node/fast node/heartbeat-with-lease pod/fast; do
    # The resources of each kustomization, in its order (testdata/ is not among them).
    # shellcheck disable=SC2013 # file names: one word each, split on purpose
    for f in $(sed -n 's/^- *//p' "$mod_dir/kustomize/stage/$dir/kustomization.yaml"); do
      echo "---"
      cat "$mod_dir/kustomize/stage/$dir/$f"
    done
  done > "$stages.tmp"
  mv "$stages.tmp" "$stages"
  done_step
fi
