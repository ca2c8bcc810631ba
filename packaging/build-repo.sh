#!/usr/bin/env bash
# Builds the Debian packages and lays out a signed apt repository:
#
#   packaging/build-repo.sh OUT_DIR KEY_ID [--version 0.1.1-1] [--no-build]
#
#   OUT_DIR/dists/stable/{Release,InRelease,Release.gpg}
#   OUT_DIR/dists/stable/main/binary-amd64/Packages{,.gz}
#   OUT_DIR/pool/main/s/sensei-*/…deb
#   OUT_DIR/sensei-archive-keyring.gpg   (the public key, for /usr/share/keyrings/)
#
# KEY_ID names a secret key in the GnuPG keyring ($GNUPGHOME): the operator's release key in
# production, a throwaway one in tests (packaging/test-apt.sh). Needs cargo-deb, apt-utils
# (apt-ftparchive) and gnupg.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: build-repo.sh OUT_DIR KEY_ID [--version V] [--no-build]}
key=${2:?usage: build-repo.sh OUT_DIR KEY_ID [--version V] [--no-build]}
shift 2
version=""
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "build-repo: unknown option $1" >&2; exit 2 ;;
  esac
done

deb_args=()
[ -z "$version" ] || deb_args+=(--deb-version "$version")
# Reproducible enough to compare: no build paths in the binaries, fixed archive times.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export RUSTFLAGS="${RUSTFLAGS:-} --remap-path-prefix=$PWD=/build/sensei --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo"

if [ "$build" = 1 ]; then
  cargo build --release --locked -p sensei-agent -p sensei-control-plane -p sensei-cli
fi
# The agent reports the package's upstream version (`--version`, its hello): the version is
# stamped into the binary that is packaged (docs/packaging.md), so a --version build needs
# no second compilation.
agent_version=${version:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)}
target/release/sensei-agent stamp-version --version "$agent_version" \
  --input target/release/sensei-agent --output target/release/sensei-agent
# The man pages and shell completions, made by each binary from its own command definitions
# (clap_mangen, clap_complete), so they cannot drift from the options it accepts.
rm -rf target/man target/completions
for bin in sensei-agent sensei-control-plane sensei; do
  "target/release/$bin" man "target/man/$bin"
  gzip -9n "target/man/$bin"/*.1
done
mkdir -p target/completions
target/release/sensei completions bash > target/completions/sensei.bash
target/release/sensei completions zsh > target/completions/_sensei
target/release/sensei completions fish > target/completions/sensei.fish

debs=()
for pkg in sensei-agent sensei-control-plane sensei-cli; do
  path=$(cargo deb -p "$pkg" --no-build "${deb_args[@]}" | tail -n 1)
  [ -f "$path" ] || { echo "build-repo: cargo deb did not produce $pkg" >&2; exit 1; }
  debs+=("$path")
done

mkdir -p "$out"
out=$(cd "$out" && pwd)
for deb in "${debs[@]}"; do
  name=$(dpkg-deb -f "$deb" Package)
  mkdir -p "$out/pool/main/s/$name"
  cp "$deb" "$out/pool/main/s/$name/"
done

dist="$out/dists/stable"
mkdir -p "$dist/main/binary-amd64"
rm -f "$dist/Release" "$dist/InRelease" "$dist/Release.gpg"
(cd "$out" && apt-ftparchive packages pool) > "$dist/main/binary-amd64/Packages"
gzip -9nkf "$dist/main/binary-amd64/Packages"
apt-ftparchive \
  -o APT::FTPArchive::Release::Origin=Sensei \
  -o APT::FTPArchive::Release::Label=Sensei \
  -o APT::FTPArchive::Release::Suite=stable \
  -o APT::FTPArchive::Release::Codename=stable \
  -o APT::FTPArchive::Release::Architectures=amd64 \
  -o APT::FTPArchive::Release::Components=main \
  release "$dist" > "$out/.Release.tmp"
mv "$out/.Release.tmp" "$dist/Release"
gpg --batch --yes --local-user "$key" --clearsign -o "$dist/InRelease" "$dist/Release"
gpg --batch --yes --local-user "$key" --armor --detach-sign -o "$dist/Release.gpg" "$dist/Release"
gpg --batch --yes --export "$key" > "$out/sensei-archive-keyring.gpg"
echo "build-repo: $out signed by $key"
for deb in "${debs[@]}"; do
  echo "  $(basename "$deb")  sha256 of /usr/bin/$(dpkg-deb -f "$deb" Package): $(dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/bin/$(dpkg-deb -f "$deb" Package)" | sha256sum | cut -d' ' -f1)"
done
