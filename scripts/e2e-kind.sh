#!/usr/bin/env bash
# End-to-end on a local kind cluster: build the images, install the chart, run examples/kind-cpu.yaml,
# wait for it to finish and show its status. For users with Docker; CI does not run it (no container
# engine there: the operator is tested against the KMock emulator instead).
#
# Needs: docker, kind, kubectl, helm on PATH (or KIND=..., KUBECTL=..., HELM=...).
#
#   scripts/e2e-kind.sh                 # create cluster "dcmdp" (if missing), build, install, run
#   CLUSTER=x TAG=dev scripts/e2e-kind.sh
#   SKIP_BUILD=1 scripts/e2e-kind.sh    # reuse images built before
#   CLEANUP=1 scripts/e2e-kind.sh       # delete the kind cluster at the end
#
# On kind the CPU trainer image also serves the rollout pools: it holds the whole dcmdp package,
# including the `dcmdp-rollout` worker and its Hugging Face engine (the vLLM image needs GPUs).
set -euo pipefail

CLUSTER=${CLUSTER:-dcmdp}
TAG=${TAG:-dev}
NAMESPACE=${NAMESPACE:-dcmdp-system}      # where the operator runs
RUN_NAMESPACE=${RUN_NAMESPACE:-default}   # where the run goes
TIMEOUT=${TIMEOUT:-1800}                  # seconds to wait for the run to finish
KIND=${KIND:-kind}
KUBECTL=${KUBECTL:-kubectl}
HELM=${HELM:-helm}
RUN=kind-cpu
OPERATOR_IMAGE=dcmdp/operator:${TAG}
TRAINER_IMAGE=dcmdp/trainer:${TAG}-cpu

cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }
need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is not on PATH" >&2; exit 2; }
  done
}
need docker "$KIND" "$KUBECTL" "$HELM"

if ! "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "creating kind cluster $CLUSTER"
  "$KIND" create cluster --name "$CLUSTER" --wait 120s
fi
"$KUBECTL" config use-context "kind-$CLUSTER" >/dev/null

if [ -z "${SKIP_BUILD:-}" ]; then
  log "building $OPERATOR_IMAGE and $TRAINER_IMAGE"
  docker build -f operator/Dockerfile -t "$OPERATOR_IMAGE" .
  docker build -f trainer_image/Dockerfile.cpu -t "$TRAINER_IMAGE" .
fi
log "loading the images into the cluster"
"$KIND" load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$TRAINER_IMAGE"

log "installing the chart (CRD, RBAC, operator) into $NAMESPACE"
"$HELM" upgrade --install dcmdp helm/dcmdp \
  --namespace "$NAMESPACE" --create-namespace \
  --set image.repository=dcmdp/operator \
  --set image.tag="$TAG" \
  --set image.pullPolicy=Never \
  --set runImages.trainer="$TRAINER_IMAGE" \
  --set runImages.rollout="$TRAINER_IMAGE" \
  --set runImages.pullPolicy=Never \
  --set pollSeconds=5 \
  --wait --timeout 5m

log "applying examples/kind-cpu.yaml in $RUN_NAMESPACE"
"$KUBECTL" -n "$RUN_NAMESPACE" delete dcmdprun "$RUN" --ignore-not-found --wait=true
"$KUBECTL" -n "$RUN_NAMESPACE" apply -f examples/kind-cpu.yaml

log "waiting for the run to finish (up to ${TIMEOUT}s)"
deadline=$(( $(date +%s) + TIMEOUT ))
phase=""
while :; do
  phase=$("$KUBECTL" -n "$RUN_NAMESPACE" get dcmdprun "$RUN" -o jsonpath='{.status.phase}' 2>/dev/null || true)
  "$KUBECTL" -n "$RUN_NAMESPACE" get dcr "$RUN" --no-headers 2>/dev/null || true
  case "$phase" in
    Succeeded|Failed) break ;;
  esac
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "error: the run did not finish within ${TIMEOUT}s (phase: ${phase:-none})" >&2
    break
  fi
  sleep 15
done

log "status"
"$KUBECTL" -n "$RUN_NAMESPACE" get dcr "$RUN" -o wide || true
"$KUBECTL" -n "$RUN_NAMESPACE" get dcmdprun "$RUN" -o jsonpath='{.status}' || true
echo
"$KUBECTL" -n "$RUN_NAMESPACE" get jobs,deployments,services,secrets,configmaps -l "dcmdp.io/run=$RUN" || true
"$KUBECTL" -n "$RUN_NAMESPACE" get events --field-selector "involvedObject.name=$RUN" || true

if [ -n "${CLEANUP:-}" ]; then
  log "deleting kind cluster $CLUSTER"
  "$KIND" delete cluster --name "$CLUSTER"
fi
[ "$phase" = "Succeeded" ]
