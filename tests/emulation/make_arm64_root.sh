#!/usr/bin/env bash
# An aarch64 Python 3.11 with TVM's runtime and onnxruntime, run on this x86-64 machine through
# qemu-user-static: what hwprune uses to run the aarch64 artifacts it cross-compiles for the jetson and
# rpi5 targets (never to time them: emulated time means nothing).
#
#   bash tests/emulation/make_arm64_root.sh [ROOT]      # default ~/.cache/hwprune/arm64-root
#
# Needs: Debian's apt (to add the arm64 architecture and download its packages; run as root) and PyPI.
# Nothing is installed for aarch64 system-wide: the packages are unpacked into ROOT, the wheels into
# ROOT/opt/site. onnxruntime is 1.19.2: the aarch64 wheels of 1.32 crash under qemu-user at import.
set -euo pipefail
ROOT="${1:-${HWPRUNE_ARM64_ROOT:-$HOME/.cache/hwprune/arm64-root}}"
PIP="${PIP:-python3 -m pip}"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
command -v qemu-aarch64-static >/dev/null || $SUDO apt-get install -y -q qemu-user-static >/dev/null
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -q >/dev/null
fi
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT; chmod 755 "$work"  # apt downloads as user _apt
pkgs="libc6 libgcc-s1 libstdc++6 gcc-12-base zlib1g libbz2-1.0 liblzma5 libexpat1 libffi8 libssl3 libsqlite3-0
      libncursesw6 libtinfo6 libreadline8 libuuid1 libcrypt1 libdb5.3 libnsl2 libtirpc3 libgssapi-krb5-2
      libk5crypto3 libkeyutils1 libkrb5-3 libkrb5support0 libcom-err2 libpython3.11-minimal libpython3.11-stdlib
      python3.11-minimal"
(cd "$work" && apt-get download -q $(for p in $pkgs; do echo "$p:arm64"; done) >/dev/null)
mkdir -p "$ROOT/opt/site"
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
$PIP download -q --no-deps --only-binary=:all: --python-version 3.11 --dest "$work/wheels" \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64 \
  apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 onnxruntime==1.19.2 "numpy>=2,<3" \
  typing-extensions packaging protobuf flatbuffers coloredlogs humanfriendly sympy mpmath
for whl in "$work"/wheels/*.whl; do python3 -m zipfile -e "$whl" "$ROOT/opt/site/"; done
qemu-aarch64-static -L "$ROOT" "$ROOT/usr/bin/python3.11" -c \
  "import sys; sys.path.insert(0, '$ROOT/opt/site'); import platform, numpy, tvm, onnxruntime; \
   print('aarch64 root ready:', platform.machine(), 'python', platform.python_version(), '| tvm', tvm.__version__, '| onnxruntime', onnxruntime.__version__)"
