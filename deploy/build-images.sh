#!/usr/bin/env bash
# Builds the three ENBD CSI images from the repo root with deploy/Dockerfile.
#   deploy/build-images.sh [PREFIX] [TAG]     (defaults: ghcr.io/enbd-csi/ and the chart's appVersion)
# Needs Docker with BuildKit (Docker 23+ has it on by default).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX="${1:-ghcr.io/enbd-csi/}"
TAG="${2:-$(awk -F'"' '/^appVersion:/{print $2}' "$ROOT/charts/enbd-csi/Chart.yaml")}"
for target in enbd-server enbd-csi-driver enbd-node; do
  echo "build-images: ${PREFIX}${target}:${TAG}"
  DOCKER_BUILDKIT=1 docker build -f "$ROOT/deploy/Dockerfile" --target "$target" \
    -t "${PREFIX}${target}:${TAG}" "$ROOT"
done
