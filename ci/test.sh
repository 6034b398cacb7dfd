#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs
# (idempotently), builds the guest image, checks style and lints, and runs
# every test. `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { printf '\n== %s (%ss)\n' "$*" "$(( $(date +%s) - start ))"; }

step "host packages"
bash ci/setup-host.sh

step "guest image"
bash images/build.sh

step "format"
cargo fmt --all -- --check

step "build"
cargo build --workspace --all-targets --locked

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests"
# Guest-booting tests serialise themselves with a lock; pure tests run in parallel.
cargo test --workspace --locked --no-fail-fast

step "fuzz (bounded)"
bash ci/fuzz.sh 30

step "done"
