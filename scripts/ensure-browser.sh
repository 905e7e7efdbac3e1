#!/usr/bin/env bash
# Install the headless browser the UI and report tests drive (Debian's chromium and chromium-driver),
# if it is missing and this machine can install packages. Without it those tests skip (or fail in CI).
set -u
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
    || echo "warning: could not install chromium and chromium-driver; the browser tests will be skipped" >&2
else
  echo "warning: chromium and chromium-driver are missing (apt-get install chromium chromium-driver); the browser tests will be skipped" >&2
fi
