#!/usr/bin/env bash
# Fuzz every parser that sees outside bytes (fuzz/, README "Fuzzing").
#
#   scripts/fuzz.sh smoke [SECONDS]     each target for SECONDS (default 10); CI runs this
#   scripts/fuzz.sh long  [SECONDS]     each target for SECONDS (default 180), corpus kept
#   scripts/fuzz.sh run TARGET [ARGS]   one target, libFuzzer ARGS passed through
#   scripts/fuzz.sh list
#
# Any crash (a panic, an overflow caught by debug assertions, a timeout over FUZZ_TIMEOUT
# seconds for one input, or memory over FUZZ_RSS_MB) fails the run; libFuzzer writes the input to
# fuzz/artifacts/TARGET/. Reproduce with `scripts/fuzz.sh run TARGET fuzz/artifacts/TARGET/FILE`.
#
# cargo-fuzz needs nightly flags: it runs on the stable toolchain with RUSTC_BOOTSTRAP=1. The
# sanitizer is off (-s none): the crate forbids unsafe code, so what is hunted is panics, integer
# overflow (overflow-checks in fuzz/Cargo.toml), hangs and unbounded memory, which libFuzzer's coverage-guided
# search finds without ASan; and ASan would also instrument the C libraries the build compiles
# (zstd), against which librdkafka's configure links its checks without ASan and fails.
set -euo pipefail

cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
NICE=(nice -n 19 ionice -c3)
FLAGS=(-O -s none)
TIMEOUT="${FUZZ_TIMEOUT:-10}"
RSS_MB="${FUZZ_RSS_MB:-2048}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    "${NICE[@]}" cargo install cargo-fuzz --locked
fi

targets() { cargo fuzz list; }

build() {
    local t0=$SECONDS
    "${NICE[@]}" cargo fuzz build "${FLAGS[@]}"
    echo "fuzz build: $((SECONDS - t0)) s"
}

# One target for $2 seconds on a scratch copy of its committed seeds (smoke) or on its kept
# corpus (long). Prints the executions and corpus size libFuzzer reports.
run_for() {
    local target=$1 secs=$2 corpus=$3
    mkdir -p "artifacts/$target"
    local log
    log=$(mktemp)
    if ! "${NICE[@]}" cargo fuzz run "${FLAGS[@]}" "$target" "$corpus" -- \
        -max_total_time="$secs" -timeout="$TIMEOUT" -rss_limit_mb="$RSS_MB" \
        -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log"
        echo "FUZZ FINDING in $target: input saved under fuzz/artifacts/$target/" >&2
        rm -f "$log"
        return 1
    fi
    local execs units
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    units=$(find "$corpus" -type f | wc -l)
    printf '%-16s %8s s %12s execs %6s corpus files  no findings\n' "$target" "$secs" "$execs" "$units"
    rm -f "$log"
}

mode="${1:-smoke}"
case "$mode" in
    list) targets ;;
    smoke | long)
        if [ "$mode" = smoke ]; then secs="${2:-10}"; else secs="${2:-180}"; fi
        build
        failed=0
        scratch=$(mktemp -d)
        trap 'rm -rf "$scratch"' EXIT
        for t in $(targets); do
            if [ "$mode" = smoke ]; then
                corpus="$scratch/$t"
                mkdir -p "$corpus"
                cp corpus/"$t"/seed-* "$corpus"/ 2>/dev/null || true
            else
                corpus="corpus/$t"
                mkdir -p "$corpus"
            fi
            run_for "$t" "$secs" "$corpus" || failed=1
        done
        exit $failed
        ;;
    run)
        shift
        target="$1"
        shift
        exec "${NICE[@]}" cargo fuzz run "${FLAGS[@]}" "$target" "$@"
        ;;
    *)
        echo "usage: $0 smoke|long [SECONDS] | run TARGET [ARGS] | list" >&2
        exit 2
        ;;
esac
