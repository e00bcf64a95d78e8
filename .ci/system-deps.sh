#!/usr/bin/env bash
# System packages for the profile/report tests (run as root by scripts/test.sh; idempotent):
#   arm:     qemu-user-static + debootstrap (the emulated arm64 sandbox; built once, cached in ~/.cache/edgefuse)
#   ssh:     openssh-server + openssh-client (the tests start their own sshd on 127.0.0.1 with throwaway keys)
#   browser: chromium (+ a font) to render the HTML report headless
set -euo pipefail
need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null && command -v scp >/dev/null || need+=(openssh-client)
command -v chromium >/dev/null || need+=(chromium)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ "${#need[@]}" -gt 0 ]; then
  echo "edgefuse: installing system packages: ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# sshd refuses to start without its privilege-separation folder; the package's service would create it.
mkdir -p /run/sshd
chmod 0755 /run/sshd
