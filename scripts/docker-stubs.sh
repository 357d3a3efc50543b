#!/bin/sh
# Stub sources for the Dockerfile's dependency layer: with only the manifests and the lock file
# copied, cargo needs a file for every target the manifests declare before it builds the
# dependencies. Shared with CI (scripts/ops-check.sh), which runs it on a copy of the manifests
# and lets cargo parse them, so a new target cannot silently break `docker build`.
#
#   sh scripts/docker-stubs.sh [DIR]     (DIR: where Cargo.toml is; default .)
set -eu
cd "${1:-.}"
mkdir -p src loadtest/src benches
echo 'fn main() {}' > src/main.rs
: > src/lib.rs
echo 'fn main() {}' > loadtest/src/main.rs
# Every [[bench]] of the root manifest, at its default path benches/<name>.rs.
for name in $(awk '/^\[\[bench\]\]/ { b = 1; next } /^\[/ { b = 0 } b && /^name *=/ { gsub(/^name *= *"|".*$/, ""); print }' Cargo.toml); do
  echo 'fn main() {}' > "benches/$name.rs"
done
