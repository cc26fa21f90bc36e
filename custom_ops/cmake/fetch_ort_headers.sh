#!/bin/sh
# Fetch the onnxruntime C/C++ headers from Debian trixie's libonnxruntime-dev into $1,
# without installing anything system-wide: a private apt sources list, lists and cache
# under $1, then `apt-get download` and `dpkg -x`. Prints the include folder on success.
# The mirror is the one this machine's own Debian sources use (DESIGN.md section 4).
set -eu
dest="$1"
mkdir -p "$dest/apt/lists/partial" "$dest/apt/cache/archives/partial" "$dest/root"
command -v apt-get >/dev/null 2>&1 || { echo "fetch_ort_headers: apt-get not found (not a Debian-like system); set ORT_INCLUDE_DIR" >&2; exit 1; }

uri=""
for f in /etc/apt/sources.list.d/debian.sources; do
  [ -r "$f" ] && uri=$(awk '/^URIs:/ {print $2; exit}' "$f")
done
if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
  uri=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' /etc/apt/sources.list)
fi
[ -n "$uri" ] || uri="http://deb.debian.org/debian"

keyring=/usr/share/keyrings/debian-archive-keyring.gpg
signed=""
[ -r "$keyring" ] && signed="[signed-by=$keyring] "
echo "deb ${signed}${uri} trixie main" > "$dest/apt/sources.list"

apt_opts="-o Dir::State::Lists=$dest/apt/lists -o Dir::Etc::SourceList=$dest/apt/sources.list \
 -o Dir::Etc::SourceParts=/dev/null -o Dir::Cache=$dest/apt/cache -o Debug::NoLocking=1 \
 -o APT::Sandbox::User=$(id -un) -q"
# shellcheck disable=SC2086
apt-get $apt_opts update >&2
cd "$dest"
rm -f libonnxruntime-dev_*.deb
# shellcheck disable=SC2086
apt-get $apt_opts download libonnxruntime-dev >&2
dpkg -x libonnxruntime-dev_*.deb "$dest/root"
inc="$dest/root/usr/include/onnxruntime"
[ -f "$inc/onnxruntime_cxx_api.h" ] || { echo "fetch_ort_headers: onnxruntime_cxx_api.h missing from the package" >&2; exit 1; }
echo "$inc"
