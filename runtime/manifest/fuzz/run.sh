#!/usr/bin/env bash
# Runs the beemesh-manifest fuzz targets for a bounded time each and summarises the result.
#
#   runtime/manifest/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 60; TARGET defaults to every target (`cargo fuzz list`).
# Targets run one after another (the fuzzers are single-threaded; start two copies of this
# script with different targets to use two cores). Each run starts from the committed seeds
# in seeds/<target>/ plus the git-ignored working corpus in corpus/<target>/, which it grows,
# with the keyword dictionary dicts/<target>.dict where there is one.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`) and a nightly toolchain for the
# sanitizer flags: `cargo +nightly fuzz` when rustup has a nightly, otherwise the stable
# toolchain with RUSTC_BOOTSTRAP=1. Set FUZZ_TOOLCHAIN=nightly|bootstrap to force one, and
# FUZZ_SANITIZER (default: address; `none` runs about twice as fast) to change the sanitizer.
#
# Per target it prints the executions (libFuzzer's closing `Done N runs in M second(s)`, or
# its last status line when a crash stopped the run) and the crash artifacts (crash-*, oom-*,
# timeout-*, leak-*) written during this run; logs are kept in logs/<target>.log.
# Exits 1 when any target crashed or failed to build.

set -euo pipefail

FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$FUZZ_DIR"

SECONDS_PER_TARGET="${1:-60}"
if ! [[ "$SECONDS_PER_TARGET" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET] [TARGET...]" >&2
    exit 2
fi
shift $(($# > 0 ? 1 : 0))

# Limits, identical for every target:
# - rss_limit_mb: libFuzzer's default; stated so a memory blow-up is an oom-* artifact.
# - max_len: 64 KiB. Without it libFuzzer caps inputs at the largest seed (about 2 KiB), too
#   small to grow deep nesting or long strings; far beyond 64 KiB every execution gets slower
#   without reaching new parser states. The real size caps (input::MAX_*_BYTES, 256 KiB and
#   more) are enforced before parsing and unit-tested there.
# - timeout: one input taking over 10 s is a finding (quadratic or worse parsing), not noise.
LIBFUZZER_FLAGS=(
    "-max_total_time=$SECONDS_PER_TARGET"
    -rss_limit_mb=2048
    -max_len=65536
    -timeout=10
    -print_final_stats=1
)

case "${FUZZ_TOOLCHAIN:-auto}" in
    nightly) CARGO=(cargo +nightly) ;;
    bootstrap) CARGO=(env RUSTC_BOOTSTRAP=1 cargo) ;;
    auto)
        if command -v rustup >/dev/null && rustup toolchain list | grep -q '^nightly'; then
            CARGO=(cargo +nightly)
        else
            CARGO=(env RUSTC_BOOTSTRAP=1 cargo)
        fi
        ;;
    *)
        echo "FUZZ_TOOLCHAIN must be nightly, bootstrap or auto" >&2
        exit 2
        ;;
esac
FUZZ_FLAGS=(--sanitizer "${FUZZ_SANITIZER:-address}")

if ! "${CARGO[@]}" fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

if (($# > 0)); then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <("${CARGO[@]}" fuzz list --fuzz-dir "$FUZZ_DIR")
fi

mkdir -p logs
SUMMARY=()
FAILED=0
for target in "${TARGETS[@]}"; do
    log="logs/$target.log"
    mkdir -p "corpus/$target" "artifacts/$target"
    if ! "${CARGO[@]}" fuzz build "${FUZZ_FLAGS[@]}" --fuzz-dir "$FUZZ_DIR" "$target" >"$log" 2>&1; then
        SUMMARY+=("$(printf '%-16s build failed (see %s)' "$target" "$log")")
        FAILED=1
        continue
    fi

    marker="$(mktemp)"
    seeds=()
    [[ -d "seeds/$target" ]] && seeds=("$FUZZ_DIR/seeds/$target")
    dict=()
    [[ -f "dicts/$target.dict" ]] && dict=("-dict=$FUZZ_DIR/dicts/$target.dict")
    cmd=("${CARGO[@]}" fuzz run "${FUZZ_FLAGS[@]}" --fuzz-dir "$FUZZ_DIR" "$target"
        "$FUZZ_DIR/corpus/$target" "${seeds[@]}" -- "${LIBFUZZER_FLAGS[@]}" "${dict[@]}")
    echo "+ ${cmd[*]}" | tee -a "$log"
    started=$(date +%s)
    status=0
    "${cmd[@]}" >>"$log" 2>&1 || status=$?
    elapsed=$(($(date +%s) - started))

    runs="$(sed -n 's/^Done \([0-9][0-9]*\) runs in \([0-9][0-9]*\) second.*/\1 runs in \2 s/p' "$log" | tail -n 1)"
    if [[ -z "$runs" ]]; then
        last="$(grep -o '^#[0-9][0-9]*' "$log" | tail -n 1 || true)"
        if [[ -n "$last" ]]; then
            runs="${last#\#} runs before stopping (exit $status)"
        else
            runs="stopped while replaying the corpus (exit $status)"
        fi
    fi
    mapfile -t found < <(find "artifacts/$target" -type f \( -name 'crash-*' -o -name 'oom-*' \
        -o -name 'timeout-*' -o -name 'leak-*' \) -newer "$marker")
    rm -f "$marker"
    crashes=${#found[@]}
    corpus_size="$(find "corpus/$target" -type f | wc -l)"
    SUMMARY+=("$(printf '%-16s %s, %s crash(es), corpus %s, wall %ss' \
        "$target" "$runs" "$crashes" "$corpus_size" "$elapsed")")
    if ((crashes > 0)); then
        SUMMARY+=("${found[@]/#/    }")
    fi
    if ((crashes > 0 || status != 0)); then
        FAILED=1
    fi
done

echo
echo "fuzz summary (${SECONDS_PER_TARGET}s per target, sanitizer ${FUZZ_SANITIZER:-address}, ${CARGO[*]}):"
printf '  %s\n' "${SUMMARY[@]}"
exit "$FAILED"
