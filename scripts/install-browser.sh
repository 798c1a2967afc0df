#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver, for the dashboard's browser test
# (tests/test_dashboard_browser.py). `make test` runs this; without a browser that test skips
# and says why. Needs root (or passwordless sudo) and Debian's package mirror.
set -u
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "note: chromium/chromedriver are not installed and this user cannot install them;" \
         "the dashboard's browser test will be skipped (apt-get install chromium chromium-driver)" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "note: no apt-get here; install Chromium and ChromeDriver by hand for the dashboard's browser test" >&2
  exit 0
fi
echo "installing chromium and chromium-driver from Debian (for the dashboard's browser test; ~2 min once)" >&2
log=$(mktemp)
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        chromium chromium-driver; } >"$log" 2>&1; then
  echo "warning: installing chromium failed (last lines below); the dashboard's browser test will be skipped" >&2
  tail -5 "$log" >&2
fi
rm -f "$log"
exit 0
