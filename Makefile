# Fluidity developer tasks (GNU make). The platform files include this one and add what differs:
#   make -f Makefile.linux run-server-local     make -f Makefile.macos test
#   make -f Makefile.win docker-build-server
#
# Tools come from the project virtualenv (.venv) when it exists, otherwise from PATH.
# Create it with: make venv

PYTHON ?= python3
VENV_BIN ?= .venv/bin/
BIN := $(if $(wildcard $(VENV_BIN)python*),$(VENV_BIN),)
PY := $(if $(BIN),$(BIN)python,$(PYTHON))

CERT_DIR ?= certs
IMAGE ?= fluidity-server
IMAGE_TAG ?= latest
# Fargate runs the task as X86_64 (server/cloudformation.yaml); build that even on Apple silicon.
DOCKER_PLATFORM ?= linux/amd64
DOCKER ?= docker
TEMPLATES := server/cloudformation.yaml lambdas/cloudformation.yaml
PYTEST_ARGS ?=
DEPLOY_ARGS ?=
DOCTOR_ARGS ?=
# `make build` writes launchers here: the runbook's ./build/fluidity-agent and ./build/fluidity-server.
BUILD_DIR ?= build

.DEFAULT_GOAL := help
.PHONY: help venv build test lint format certs run-server-local run-agent-local docker-build-server \
        deploy secrets outputs destroy doctor

help:
	@echo "Fluidity make targets:"
	@echo "  venv                 create .venv and install Fluidity with its test tools"
	@echo "  build                launchers in $(BUILD_DIR)/ (./$(BUILD_DIR)/fluidity-agent, ./$(BUILD_DIR)/fluidity-server, ...)"
	@echo "  doctor               check the set-up: fluidity doctor (DOCTOR_ARGS=\"--config configs/agent.yaml --aws\")"
	@echo "  test                 run the test suite (PYTEST_ARGS=... to pass options)"
	@echo "  lint                 ruff, mypy and cfn-lint"
	@echo "  certs                create the CA, server and client certificates in $(CERT_DIR)/"
	@echo "  run-server-local     tunnel server on 127.0.0.1:8443 (configs/server.local.yaml)"
	@echo "  run-agent-local      agent and proxy on 127.0.0.1:8080 (configs/agent.local.yaml)"
	@echo "  docker-build-server  build the $(IMAGE):$(IMAGE_TAG) image ($(DOCKER_PLATFORM))"
	@echo "  deploy               create/update the fluidity-fargate and fluidity-lambda stacks"
	@echo "  secrets              store $(CERT_DIR)/ca.crt, server.crt, server.key for the Fargate task"
	@echo "  outputs              show both stacks' outputs (API URL, API key, ...) and the server's public IP"
	@echo "  destroy              delete fluidity-lambda, then fluidity-fargate"

venv:
	$(PYTHON) -m venv .venv
	$(VENV_BIN)python -m pip install -e ".[test]"

build:
	$(PY) installer/launchers.py --out $(BUILD_DIR) --bin "$(BIN)"

test:
	$(PY) -m pytest $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(BIN)cfn-lint $(TEMPLATES)

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

certs: $(CERT_DIR)/server.crt

$(CERT_DIR)/server.crt:
	$(BIN)fluidity-certs init --dir $(CERT_DIR)

run-server-local: $(CERT_DIR)/server.crt
	$(BIN)fluidity-server --config configs/server.local.yaml

run-agent-local: $(CERT_DIR)/server.crt
	$(BIN)fluidity-agent --config configs/agent.local.yaml

docker-build-server:
	$(DOCKER) build --platform $(DOCKER_PLATFORM) -f server/Dockerfile -t $(IMAGE):$(IMAGE_TAG) .

deploy:
	$(BIN)fluidity-deploy deploy $(DEPLOY_ARGS)

secrets: $(CERT_DIR)/server.crt
	$(BIN)fluidity-deploy secrets --cert-dir $(CERT_DIR)

outputs:
	$(BIN)fluidity-deploy outputs

destroy:
	$(BIN)fluidity-deploy destroy $(DEPLOY_ARGS)

doctor:
	$(BIN)fluidity doctor $(DOCTOR_ARGS)
