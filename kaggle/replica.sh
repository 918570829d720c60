#!/usr/bin/env bash
# A replica of the Python of a Kaggle notebook: a virtual environment with Kaggle's Python
# version and exactly the package versions its image ships (kaggle/image.txt, each with its
# source), this package installed with --no-deps, then both notebooks run in it as Kaggle runs
# them, offline (tests/test_kaggle_replica.py): the submission from an exported experiment,
# byte for byte what submit.py writes; one epoch of the training notebook's SMOKE setting; a
# requirement the image lacks named with the wheels to attach, fetched by the command the
# notebook prints (the one step with network) and installed offline.
#
#   bash kaggle/replica.sh [pytest arguments]
#
# The first run downloads about 4 GB of wheels (torch's CUDA libraries among them) into an
# environment of about 8 GB; later runs reuse it while kaggle/image.txt is unchanged, its
# Python still runs and it holds exactly the pinned distributions.
# KAGGLE_REPLICA_PYTHON names the Python to build it from (default: python3.12 on PATH, else
# pyenv's); one that is missing or of another version is an error. Runs on one checkout take
# turns (a lock beside the environment); the package is installed from a clean copy of the
# checkout's files, never from a build/ folder an earlier build left.
set -euo pipefail
cd "$(dirname "$0")/.."

image=kaggle/image.txt
dest="${KAGGLE_REPLICA_DIR:-.ci/kaggle-replica}"
venv="$dest/venv"
pinned() { awk -v name="$1" '$1 == name { print $2 }' "$image"; }
minor="$(pinned python | cut -d. -f1-2)"

version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

# A Python of Kaggle's major.minor version: KAGGLE_REPLICA_PYTHON's, or the first found.
base_python() {
    local candidate
    if [ -n "${KAGGLE_REPLICA_PYTHON:-}" ]; then
        echo "$KAGGLE_REPLICA_PYTHON"
        return 0
    fi
    for candidate in "python$minor" \
            "${PYENV_ROOT:-${HOME:-}/.pyenv}"/versions/"$minor".*/bin/"python$minor"; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if [ "$(version_of "$candidate")" = "$minor" ]; then
            echo "$candidate"
            return 0
        fi
    done
    echo "replica: no Python $minor found (kaggle/image.txt); set KAGGLE_REPLICA_PYTHON" >&2
    return 1
}

if [ -n "${KAGGLE_REPLICA_PYTHON:-}" ]; then  # named, so never passed over
    if ! command -v "$KAGGLE_REPLICA_PYTHON" >/dev/null 2>&1; then
        echo "replica: KAGGLE_REPLICA_PYTHON=$KAGGLE_REPLICA_PYTHON: not found" >&2
        exit 2
    fi
    found="$(version_of "$KAGGLE_REPLICA_PYTHON" || true)"
    if [ "$found" != "$minor" ]; then
        echo "replica: KAGGLE_REPLICA_PYTHON=$KAGGLE_REPLICA_PYTHON: Python" \
            "${found:-(it did not run)}, not $minor (kaggle/image.txt)" >&2
        exit 2
    fi
fi

# One run at a time per environment: another would delete or fill the venv under this one.
mkdir -p "$dest"
exec 9>"$dest/.lock"
if ! flock -n 9; then
    echo "replica: waiting for another run on $dest to finish"
    flock 9
fi

stamp="$(sha256sum "$image" | cut -d' ' -f1)"
stamped() { [ "$(cat "$venv/.image-sha256" 2>/dev/null)" = "$stamp" ]; }
if stamped && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "replica: $venv/bin/python no longer runs (its base Python moved or went): rebuilding"
    rm -f "$venv/.image-sha256"
fi
# name==version, one a line, names in one spelling (a verbose pip's location after the
# version dropped): what image.txt pins, what the venv holds.
canonical() {
    awk -F'==' 'NF == 2 { name = tolower($1); gsub(/[-_.]+/, "-", name); split($2, v, " ")
                          print name "==" v[1] }' | LC_ALL=C sort
}
# Every distribution image.txt pins, name==version (pip among them, Python not).
pins() { awk '!/^#/ && NF >= 2 && $1 != "python" { print $1 "==" $2 }' "$image"; }
expected() { pins | canonical; }
held() {  # -I: neither PYTHONPATH nor the user's site-packages is the venv's
    "$venv/bin/python" -I -m pip list --format=freeze --disable-pip-version-check \
        --exclude jaguar-reid 2>/dev/null
}
# The first differences, "has a==1, lacks b==2, ..." (empty when there are none).
differences() {
    diff <(expected) <(canonical) | sed -n 's/^< /lacks /p; s/^> /has /p' \
        | awk 'NR <= 3 { printf "%s%s", (NR > 1 ? ", " : ""), $0 } NR == 4 { printf ", ..." }'
}
if stamped; then
    if ! listed="$(held)"; then
        drift="its pip list failed"
    else
        drift="$(differences <<<"$listed" || true)"
    fi
    if [ -n "$drift" ]; then  # something installed or removed by hand since the build
        echo "replica: $venv no longer holds exactly kaggle/image.txt ($drift): rebuilding"
        rm -f "$venv/.image-sha256"
    fi
fi

GB=$((1 << 20))  # in df's 1-kB blocks
free_kb() { { df -k --output=avail "$1" 2>/dev/null || true; } | tail -n 1 | tr -d ' '; }
# Room for the environment (about 8 GB; an old one's space counts, it goes first) and for the
# wheels pip downloads into the temporary folder before it installs them (about 4 GB).
check_room() {
    local tmp="${TMPDIR:-/tmp}" free tmp_free old=0 need=$((8 * GB)) tmp_need=$((4 * GB))
    free="$(free_kb "$dest")"
    tmp_free="$(free_kb "$tmp")"
    if ! [[ "$free" =~ ^[0-9]+$ && "$tmp_free" =~ ^[0-9]+$ ]]; then
        echo "replica: df cannot tell the free space on $dest or $tmp; building regardless" >&2
        return 0
    fi
    if [ -d "$venv" ]; then
        old="$(du -sk "$venv" 2>/dev/null | cut -f1)"
    fi
    free=$((free + ${old:-0}))
    if [ "$(stat -c %d "$dest")" = "$(stat -c %d "$tmp" 2>/dev/null)" ]; then
        need=$((need + tmp_need))
        tmp_need=0
    fi
    if [ "$free" -lt "$need" ]; then
        local counted=""
        if [ "${old:-0}" -gt 0 ]; then
            counted=" (the old environment's space counted)"
        fi
        echo "replica: building $venv needs about $((need / GB)) GB free on its disk; it has" \
            "$((free / GB)) GB$counted: free some, or set KAGGLE_REPLICA_DIR to another disk" >&2
        exit 2
    fi
    if [ "$tmp_free" -lt "$tmp_need" ]; then
        echo "replica: pip downloads about 4 GB of wheels into $tmp, which has" \
            "$((tmp_free / GB)) GB free: free some, or set TMPDIR to another disk" >&2
        exit 2
    fi
}
if ! stamped; then
    check_room
    python="$(base_python)"
    echo "replica: building $venv from $image with $python ($("$python" --version))"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "pip==$(pinned pip)"
    # Every distribution pinned, none resolved: the environment holds what the file says.
    pins | grep -v '^pip==' > "$dest/pins.txt"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --no-cache-dir --only-binary=:all: -r "$dest/pins.txt"
    echo "$stamp" > "$venv/.image-sha256"
fi

# This checkout, its requirements not installed: Kaggle's versions must meet them (pip check).
# From a copy of its files (tracked, or new and not ignored): setuptools would reuse a build/
# folder here, and a module since deleted from src/ would stay installed.
copy="$dest/checkout"
rm -rf "$copy"
mkdir -p "$copy"
git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$copy"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --force-reinstall "$copy"
rm -rf "$copy"
"$venv/bin/python" -m pip check
KAGGLE_REPLICA=1 "$venv/bin/python" -m pytest -q -s -p no:cacheprovider \
    tests/test_kaggle_replica.py "$@"
echo "replica: done in ${SECONDS} s"
