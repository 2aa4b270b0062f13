#!/usr/bin/env bash
# Make sure the headless browser the dashboard's browser test drives is installed: Debian's
# `chromium` package at /usr/bin/chromium (or $SLIMLINE_TEST_CHROMIUM). Installs it with apt when
# missing (as root, or with passwordless sudo); fails loudly otherwise. Playwright's own browser
# downloads are never used.
set -u
CHROMIUM="${SLIMLINE_TEST_CHROMIUM:-/usr/bin/chromium}"

works() { [ -x "$CHROMIUM" ] && "$CHROMIUM" --version >/dev/null 2>&1; }

if works; then
  exit 0
fi
if [ "${SLIMLINE_TEST_CHROMIUM:-}" != "" ]; then
  echo "ERROR: SLIMLINE_TEST_CHROMIUM=$CHROMIUM is not a working browser" >&2
  exit 1
fi

if [ "$(id -u)" = "0" ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  echo "ERROR: $CHROMIUM is missing and this user cannot install it; run as root:" >&2
  echo "       apt-get update && apt-get install -y chromium" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ERROR: $CHROMIUM is missing and there is no apt-get to install Debian's chromium;" >&2
  echo "       install a Chromium build and set SLIMLINE_TEST_CHROMIUM to its path" >&2
  exit 1
fi

echo "installing chromium (the dashboard's browser test drives it)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends chromium
if ! works; then
  echo "ERROR: installing chromium did not give a working $CHROMIUM" >&2
  exit 1
fi
"$CHROMIUM" --version
