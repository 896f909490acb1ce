#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels of bench/gpu-wheels.txt into DIR for a GPU
# machine that has none (bench/gpu_install.sh installs them there; docs/gpu.md says how they travel):
#   - pure-Python packages as their py3-none-any wheel, one for every Python;
#   - those marked `compiled` once per CPython version of CMT_GPU_PYTHONS (3.10 3.11 3.12 3.13: the GPU
#     machine's is not known in advance), for x86-64 manylinux up to glibc 2.28; a version a package
#     has no wheel for is named in the manifest, and the rest still come.
# DIR gets the wheels, wheels.txt (the list) and MANIFEST.txt (every wheel's size and sha256, the total).
# The total must stay under CMT_GPU_WHEELS_MAX_MIB (50): the device tool carries 64 MiB with the tree.
# Usage: bench/gpu_wheels.sh [DIR]   (default .gpu-wheels, which .gitignore keeps out of git)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu-wheels}
py=${PYTHON:-python3}
read -r -a pythons <<<"${CMT_GPU_PYTHONS:-3.10 3.11 3.12 3.13}"
max_mib=${CMT_GPU_WHEELS_MAX_MIB:-50}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done

pure=()
compiled=()
while read -r spec _ kind; do
    [ -z "$spec" ] || [ "${spec:0:1}" = "#" ] && continue
    if [ "${kind:-}" = compiled ]; then compiled+=("$spec"); else pure+=("$spec"); fi
done <bench/gpu-wheels.txt

# a fresh folder: two versions of one package in DIR would stop the install
new="$dir.new"
rm -rf "$new"
mkdir -p "$new"
download=("$py" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check -q -d "$new")
gaps=()
echo "gpu_wheels: ${#pure[@]} pure-Python packages"
any=(--python-version 3.12 --implementation py --abi none --platform any)
if ! "${download[@]}" "${any[@]}" "${pure[@]}" 2>/dev/null; then
    for spec in "${pure[@]}"; do
        "${download[@]}" "${any[@]}" "$spec" 2>/dev/null && continue
        # published as a source archive only (connection-pool): build its wheel here, pure Python or refused
        echo "gpu_wheels: $spec has no wheel on the index: building it"
        "$py" -m pip wheel --no-deps --disable-pip-version-check -q -w "$new" "$spec" || gaps+=("$spec: no wheel")
        name=${spec%%==*}
        if ls "$new" | grep -i "^${name//-/_}-" | grep -qv -- '-none-any\.whl$'; then
            echo "gpu_wheels: $spec built as a compiled wheel: mark it compiled in bench/gpu-wheels.txt" >&2
            exit 1
        fi
    done
fi
for version in "${pythons[@]}"; do
    echo "gpu_wheels: ${#compiled[@]} compiled packages for CPython $version"
    tag=(--python-version "$version" --implementation cp "${platforms[@]}")
    if ! "${download[@]}" "${tag[@]}" "${compiled[@]}" 2>/dev/null; then
        for spec in "${compiled[@]}"; do
            "${download[@]}" "${tag[@]}" "$spec" 2>/dev/null || gaps+=("$spec: no wheel for CPython $version")
        done
    fi
done
cp bench/gpu-wheels.txt "$new/wheels.txt"

"$py" - "$new" "$max_mib" "${gaps[@]}" <<'EOF' || { rm -rf "$new"; exit 1; }
import hashlib
import sys
from pathlib import Path

folder, max_mib, gaps = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
wheels = sorted(folder.glob("*.whl"))
total = sum(w.stat().st_size for w in wheels)
lines = [f"# {len(wheels)} wheels, {total / 2**20:.1f} MiB (bench/gpu_wheels.sh from bench/gpu-wheels.txt)",
         "# file  bytes  sha256"]
lines += [f"{w.name}  {w.stat().st_size}  {hashlib.sha256(w.read_bytes()).hexdigest()}" for w in wheels]
lines += [f"# missing: {gap}" for gap in gaps]
(folder / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
for gap in gaps:
    print(f"gpu_wheels: {gap}")
print(f"gpu_wheels: {len(wheels)} wheels, {total / 2**20:.1f} MiB")
if total > max_mib * 2**20:
    sys.exit(f"gpu_wheels: {total / 2**20:.1f} MiB is over CMT_GPU_WHEELS_MAX_MIB={max_mib:g}: the device tool "
             "carries 64 MiB with the tree; list fewer CPython versions (CMT_GPU_PYTHONS) or packages")
EOF
rm -rf "$dir"
mv "$new" "$dir"
echo "gpu_wheels: $dir (MANIFEST.txt lists them)"
