#!/usr/bin/env bash
# Download, here (where a registry is reachable), the wheels that the device machine lacks into the ignored
# folder .whl/ (default), for its Python 3.12 x86-64. scripts/gpu_check.sh installs them there with
# `pip install --no-index --no-deps`. Never torch: the device's own torch 2.11 is used.
#
# Which packages: the project's runtime imports that the device image does not have (hydra-core, omegaconf,
# diffusers, wandb, webdataset, streaming-community), plus what those import when loaded, found by
# importing them in the project venv and keeping what the image's package list (KINDS.md) lacks. Versions
# are the project's pins (pyproject.toml) and the versions its venv resolved; the cloud-storage clients
# that streaming imports only inside its download functions (boto3, azure, google-cloud, oci, paramiko)
# are left out: the bench reads local files.
set -euo pipefail
DEST="${1:-.whl}"
PY="${PYTHON:-python3}"
PKGS=(
  hydra-core==1.3.8 omegaconf==2.3.1
  diffusers==0.42.1 importlib-metadata==10.2.0 lazy-importer==0.1.0
  webdataset==1.0.2 braceexpand==0.1.7
  streaming-community==0.14.2 catalogue==2.0.10 python-snappy==0.7.3 cramjam==2.14.0 zstd==1.5.7.3 brotli==1.2.1
  wandb==0.25.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  platformdirs==4.14.9 sentry-sdk==2.76.0 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3
)
mkdir -p "$DEST"
PLATFORMS=()
for n in 28 27 24 17; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for spec in "${PKGS[@]}"; do
  name="${spec%%==*}"
  # one version of each: an old wheel of the same name would stop the whole install there
  if ls "$DEST" | grep -qi "^$(echo "$name" | tr '-' '_')-" ; then continue; fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$spec" \
  || "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_35_x86_64 \
    "${PLATFORMS[@]}" -d "$DEST" "$spec"
done
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 / hydra 1.3 need) is published as an sdist only: build its
# pure-Python wheel here.
if ! ls "$DEST" | grep -qi '^antlr4_python3_runtime-'; then
  "$PY" -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
fi
du -sh "$DEST"
ls "$DEST"
