# Sourced by .ci/run and .ci/run-minimum: pip without its location warnings, stopping the script with pip's own exit
# status when it fails (piping pip into grep with `|| true` had hidden a full disk until the import check after it).
pip_quiet() {
    local log rc=0
    log=$(mktemp)
    python -m pip "$@" >"$log" 2>&1 || rc=$?
    grep -v "^WARNING: Location" "$log" || true
    rm -f "$log"
    if [ "$rc" -ne 0 ]; then
        echo "error: 'pip $*' failed with exit status $rc (its output is above)" >&2
        exit "$rc"
    fi
}
