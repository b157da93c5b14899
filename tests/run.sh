#!/usr/bin/env bash
# The test command (README "Tests"): bash tests/run.sh [pytest arguments]
#
# After the set-up line (pip install torch==2.13.0 && pip install -e ".[dev,postgres,ray,pyro]"),
# on a fresh Debian or Ubuntu machine:
# 1. what pip cannot install: Chromium and ChromeDriver (browser tests), PostgreSQL's server
#    binaries (a throw-away server), iproute2's ss and util-linux's unshare (network tests),
#    pdflatex with booktabs (texlive-latex-base and -recommended, without their recommends:
#    report --format latex compiled);
#    installed with apt-get as root or with password-less sudo, otherwise named with the
#    command that installs them, and the script stops;
# 2. MNIST: $VAEBENCH_DATA if set, else the shared copy ../shared/data beside the repository
#    where it holds MNIST/raw, else ./data, where `python -m vaebench data` fetches the files
#    and checks their md5;
# 3. ruff, the import-linter contracts and pytest (every test, slow ones too).
set -euo pipefail
cd "$(dirname "$0")/.."

# --- 1. system packages -------------------------------------------------------------------
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    missing+=(postgresql)
fi
command -v ss >/dev/null || missing+=(iproute2)
command -v unshare >/dev/null || missing+=(util-linux)
lean=()  # installed without their recommended packages (much more of TeX Live)
if ! command -v pdflatex >/dev/null || ! kpsewhich booktabs.sty >/dev/null 2>&1; then
    lean+=(texlive-latex-base texlive-latex-recommended)
fi
if [ $((${#missing[@]} + ${#lean[@]})) -gt 0 ]; then
    apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq)
    if [ "$(id -u)" = 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo=(sudo)
    else
        echo "tests/run.sh: the tests need ${missing[*]} ${lean[*]}; install them, e.g." >&2
        [ ${#missing[@]} -eq 0 ] || echo "    sudo apt-get install ${missing[*]}" >&2
        [ ${#lean[@]} -eq 0 ] || echo "    sudo apt-get install --no-install-recommends ${lean[*]}" >&2
        exit 2
    fi
    echo "tests/run.sh: installing ${missing[*]} ${lean[*]}"
    "${sudo[@]}" apt-get update -qq
    [ ${#missing[@]} -eq 0 ] || "${sudo[@]}" "${apt[@]}" "${missing[@]}" >/dev/null
    [ ${#lean[@]} -eq 0 ] || "${sudo[@]}" "${apt[@]}" --no-install-recommends "${lean[@]}" >/dev/null
fi

# --- the Python side: the set-up line's packages -------------------------------------------
if ! python -c "import vaebench, selenium, hypothesis, importlinter, psycopg, ray, pyro" 2>/dev/null \
    || ! command -v ruff >/dev/null || ! command -v lint-imports >/dev/null \
    || ! command -v mkdocs >/dev/null
then
    echo "tests/run.sh: run the set-up line first:" >&2
    echo '    pip install torch==2.13.0 && pip install -e ".[dev,postgres,ray,pyro]"' >&2
    exit 2
fi

# --- 2. MNIST ------------------------------------------------------------------------------
if [ -z "${VAEBENCH_DATA:-}" ]; then
    if [ -d ../shared/data/MNIST/raw ]; then
        VAEBENCH_DATA="$(cd ../shared/data && pwd)"
    else
        VAEBENCH_DATA="$(pwd)/data"
    fi
fi
export VAEBENCH_DATA
python -m vaebench data --dataset mnist --data-root "$VAEBENCH_DATA"

# --- 3. lint and tests ---------------------------------------------------------------------
export MPLBACKEND=Agg
ruff check vaebench tests
lint-imports
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$(mktemp -d)"
python -m pytest "$@"
