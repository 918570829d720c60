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
# The first run downloads about 4 GB of wheels (torch's CUDA libraries among them); later runs
# reuse the environment while kaggle/image.txt is unchanged. KAGGLE_REPLICA_PYTHON names the
# Python to build it from (default: python3.12 on PATH, else pyenv's).
set -euo pipefail
cd "$(dirname "$0")/.."

image=kaggle/image.txt
dest="${KAGGLE_REPLICA_DIR:-.ci/kaggle-replica}"
venv="$dest/venv"
pinned() { awk -v name="$1" '$1 == name { print $2 }' "$image"; }
minor="$(pinned python | cut -d. -f1-2)"

# A Python of Kaggle's major.minor version.
base_python() {
    local candidate
    for candidate in "${KAGGLE_REPLICA_PYTHON:-}" "python$minor" \
            "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$minor".*/bin/"python$minor"; do
        [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 || continue
        if [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' \
                2>/dev/null)" = "$minor" ]
        then
            echo "$candidate"
            return 0
        fi
    done
    echo "replica: no Python $minor found (kaggle/image.txt); set KAGGLE_REPLICA_PYTHON" >&2
    return 1
}

stamp="$(sha256sum "$image" | cut -d' ' -f1)"
if [ "$(cat "$venv/.image-sha256" 2>/dev/null)" != "$stamp" ]; then
    python="$(base_python)"
    echo "replica: building $venv from $image with $python ($("$python" --version))"
    rm -rf "$venv"
    mkdir -p "$dest"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "pip==$(pinned pip)"
    # Every distribution pinned, none resolved: the environment holds what the file says.
    awk '!/^#/ && NF >= 2 && $1 != "python" && $1 != "pip" { print $1 "==" $2 }' "$image" \
        > "$dest/pins.txt"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: -r "$dest/pins.txt"
    echo "$stamp" > "$venv/.image-sha256"
fi

# This checkout, its requirements not installed: Kaggle's versions must meet them (pip check).
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --no-build-isolation --force-reinstall .
"$venv/bin/python" -m pip check
KAGGLE_REPLICA=1 "$venv/bin/python" -m pytest -q -s -p no:cacheprovider \
    tests/test_kaggle_replica.py "$@"
echo "replica: done in ${SECONDS} s"
