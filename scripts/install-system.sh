#!/usr/bin/env bash
# Install the system packages fiji-bridge needs, only those missing:
#   a JDK (java), ImageJ 1 (Debian's libij-java: /usr/share/java/ij.jar),
#   Xvfb (ImageJ 1 needs a display for most commands),
#   ImageMagick's `import` (the live-window tests take screenshots of the Xvfb),
#   a C++ toolchain with libssl/libbz2 headers (to build zeroc-ice for omero-py),
#   python3-venv when the Python has no venv/ensurepip.
# Without root or apt-get it only reports what is missing.
set -euo pipefail
need=()
command -v java >/dev/null 2>&1 || [ -n "${JAVA_HOME:-}" ] || need+=(default-jdk-headless)
[ -f /usr/share/java/ij.jar ] || [ -n "${FIJI_BRIDGE_IJ_JAR:-}" ] || need+=(libij-java)
command -v Xvfb >/dev/null 2>&1 || need+=(xvfb xauth)
command -v import >/dev/null 2>&1 || need+=(imagemagick)
command -v g++ >/dev/null 2>&1 || need+=(g++)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
[ -f /usr/include/bzlib.h ] || need+=(libbz2-dev)
"${PYTHON:-python3}" -c "import ensurepip, venv" >/dev/null 2>&1 || need+=(python3-venv)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "missing system packages: ${need[*]} (install them as root: apt-get install ${need[*]})" >&2
  exit 1
fi
