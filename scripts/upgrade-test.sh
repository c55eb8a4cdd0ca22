#!/usr/bin/env bash
# make upgrade-test FROM=<git ref>: graceful as it was at FROM, upgraded under load to this tree
# on the e2e cluster (e2e/tests/upgrade.rs), so the operator of this tree meets sidecars that
# FROM's webhook injected. FROM's operator and sidecar are built in a worktree of their own
# (cached in $GRACEFUL_CACHE/upgrade-from), pushed to the cluster's registry under FROM's
# version (<its workspace version>-rev-<commit>), and FROM's chart installed from there over the
# release `make deploy` installed; the upgrade test then moves it to this tree's version, and
# deploy.sh puts the release back as make deploy left it, whatever happened.
set -euo pipefail
source "$(dirname "$0")/../e2e/scripts/common.sh"
export KUBECONFIG=${KUBECONFIG:-$KUBECONFIG_ADMIN}

from=${FROM:-}
[[ -n $from ]] || die "make upgrade-test needs FROM=<git ref>, the version to upgrade from (FROM=v0.1.0, FROM=HEAD~3)"
sha=$(git -C "$REPO" rev-parse --verify --quiet "$from^{commit}") || die "FROM=$from names no commit here"
to=$(cat "$CACHE/images/dev-version" 2>/dev/null) || die "this tree is not deployed: make deploy"
work=$CACHE/upgrade-from/${sha:0:12}
old="$(git -C "$REPO" show "$sha:Cargo.toml" | workspace_version -)-rev-${sha:0:12}"

step "graceful at $from ($old): worktree and static build"
if [[ ! -e $work/.git ]]; then
  git -C "$REPO" worktree prune
  git -C "$REPO" worktree add --detach --force "$work" "$sha" >/dev/null
fi
# As make build-static builds them (without LTO: the same code, a shorter build).
(cd "$work" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_PROFILE_RELEASE_LTO=false \
  CARGO_TARGET_DIR="$CACHE/upgrade-from/target" cargo build -q --release --locked \
  --target x86_64-unknown-linux-gnu --bin graceful-sidecar --bin graceful-operator)
release=$CACHE/upgrade-from/target/x86_64-unknown-linux-gnu/release
done_step

step "images and chart of $old in $E2E_REGISTRY, installed over $to"
for name in graceful-operator graceful-sidecar; do
  # This tree's Containerfiles: commits before them had none, and an image is the binary alone.
  image_push "$REPO/${name#graceful-}/Containerfile" "$release/$name" "$E2E_REGISTRY/$name:$old" -- \
    --timestamp 0 --build-arg "VERSION=$old" --build-arg "REVISION=$sha"
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"; "$REPO/e2e/scripts/deploy.sh" >&2 || log "deploy.sh failed: make deploy"' EXIT
helm package "$work/charts/graceful" --version "$old" --app-version "$old" -d "$tmp" >/dev/null
helm push --plain-http "$tmp/graceful-$old.tgz" "oci://$E2E_REGISTRY/charts" >/dev/null 2>&1
if grep -q '^image:' "$work/charts/graceful/values.yaml"; then
  values=(--set "image.registry=$E2E_REGISTRY")
else # a chart from before image.registry: each image named in full
  values=()
  for part in operator sidecar; do
    values+=(--set "$part.image.repository=$E2E_REGISTRY/graceful-$part,$part.image.tag=$old,$part.image.pullPolicy=IfNotPresent")
  done
fi
helm upgrade --install graceful "oci://$E2E_REGISTRY/charts/graceful" --version "$old" --plain-http \
  -n graceful-system "${values[@]}" --wait --timeout 180s >/dev/null 2>&1 \
  || die "helm could not install graceful $old: helm -n graceful-system history graceful"
done_step

step "upgrade test: $old -> $to under load"
cd "$REPO"
GRACEFUL_UPGRADE_TO=$to e2e/run.sh --test upgrade
done_step
