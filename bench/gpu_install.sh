#!/usr/bin/env bash
# Install, on a machine with no package index (the GPU machine), the packages of DIR/wheels.txt from the
# wheels in DIR alone (bench/gpu_wheels.sh made both):
#   - a package whose module is importable already is skipped (the image's version stays);
#   - the others are installed with --no-deps from DIR (pip picks each one's wheel for this Python);
#     one that cannot be is named, and the rest still go in;
#   - then every listed module is imported, and the listed packages' requirements are checked
#     against what is installed (a note, not a failure: Snakemake lists pulp, which only its ILP
#     scheduler imports).
# Prints what it could not install or import and exits 1 if anything, 0 if everything imports.
# Usage: bench/gpu_install.sh DIR      PYTHON selects the interpreter (python3)
set -uo pipefail
dir=${1:?usage: bench/gpu_install.sh DIR}
py=${PYTHON:-python3}
list="$dir/wheels.txt"
[ -f "$list" ] || { echo "gpu_install: no $list (make DIR with bench/gpu_wheels.sh)"; exit 1; }

specs=()
modules=()
while read -r spec module _; do
    [ -z "$spec" ] || [ "${spec:0:1}" = "#" ] && continue
    specs+=("$spec")
    modules+=("$module")
done <"$list"
echo "gpu_install: ${#specs[@]} packages in $list, $(ls "$dir"/*.whl 2>/dev/null | wc -l) wheels;" \
     "$("$py" -V 2>&1) at $(command -v "$py")"

# which modules this interpreter finds already: one process for all
absent=$("$py" - "${modules[@]}" <<'EOF'
import importlib.util
import sys

for module in sys.argv[1:]:
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        print(module)
EOF
)
todo=()
for i in "${!specs[@]}"; do
    if grep -qxF "${modules[$i]}" <<<"$absent"; then
        todo+=("${specs[$i]}")
    else
        echo "gpu_install: skip ${specs[$i]}: ${modules[$i]} is importable already"
    fi
done

pip=("$py" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check -q --find-links "$dir")
missing=()
if [ ${#todo[@]} -gt 0 ]; then
    echo "gpu_install: installing ${#todo[@]}: ${todo[*]}"
    if ! "${pip[@]}" "${todo[@]}" 2>/dev/null; then
        # one at a time, so that one missing wheel does not keep the others out
        for spec in "${todo[@]}"; do
            if ! err=$("${pip[@]}" "$spec" 2>&1); then
                echo "gpu_install: could not install $spec: $(grep -m1 -i error <<<"$err" || tail -n 1 <<<"$err")"
                missing+=("$spec")
            fi
        done
    fi
fi

# every module imported (GitPython, which Snakemake imports on use, wants a git executable at import)
broken=$(GIT_PYTHON_REFRESH=quiet "$py" - "$list" <<'EOF'
import importlib
import importlib.metadata
import sys

listed = []
for line in open(sys.argv[1]):
    words = line.split()
    if words and not words[0].startswith("#"):
        listed.append((words[0].split("==")[0], words[1]))
for dist, module in listed:
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - each failure is reported, the next module still checked
        print(f"{dist} ({module}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip's own copy, in an environment without it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
installed = {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
env = {"extra": ""}
for dist, _ in listed:
    try:
        requires = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        continue
    for text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        have = installed.get(canonicalize_name(req.name))
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            print(f"note: {dist} requires {req}, installed: {have or 'none'}")
EOF
)
check_rc=$?
status=0
if [ $check_rc -ne 0 ]; then
    echo "gpu_install: the import check itself ended with exit $check_rc (a module crashed the interpreter?)"
    status=1
fi
while read -r line; do
    case $line in
        "") ;;
        note:*) echo "gpu_install: $line" ;;
        *) echo "gpu_install: does not import: $line"; status=1 ;;
    esac
done <<<"$broken"
if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu_install: could not install: ${missing[*]}"
    status=1
fi
[ $status -eq 0 ] && echo "gpu_install: every listed module imports"
exit $status
