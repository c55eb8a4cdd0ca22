#!/usr/bin/env bash
# The lint that is not cargo's: shellcheck on every tracked shell script, and actionlint on the
# GitHub workflows (actionlint runs shellcheck on their run: steps as well, since it is on PATH).
# Both come from `make deps`. Every finding of both tools is shown before it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/scripts/common.sh

for tool in shellcheck actionlint; do
  command -v "$tool" >/dev/null || die "$tool not found: run make deps"
done

# Tracked scripts: *.sh (the sourced ones too), .ci/run, and any file whose first line is a
# bash shebang. A file deleted in the working tree but not yet in git is skipped.
mapfile -t scripts < <(
  {
    git ls-files '*.sh' .ci/run
    git grep -I -n -E '^#!.*[/ ]bash([[:space:]]|$)' | awk -F: '$2 == 1 {print $1}'
  } | sort -u | while IFS= read -r f; do if [[ -f $f ]]; then echo "$f"; fi; done
)
((${#scripts[@]})) || die "no tracked shell scripts found (not a git checkout?)"

shopt -s nullglob
workflows=(.github/workflows/*.yml .github/workflows/*.yaml)
shopt -u nullglob

failed=()
step "shellcheck: ${#scripts[@]} scripts"
if shellcheck "${scripts[@]}"; then done_step; else failed+=(shellcheck); fi
if ((${#workflows[@]})); then
  step "actionlint: ${#workflows[@]} workflows"
  if actionlint "${workflows[@]}"; then done_step; else failed+=(actionlint); fi
else
  log "actionlint: no workflows in .github/workflows"
fi
((${#failed[@]} == 0)) || die "lint failed: ${failed[*]} (findings above)"
log "lint ok"
