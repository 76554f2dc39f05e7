# tunepath: `make run` (set up, build the demo, run the pipeline) and `make test`.
SHELL := /bin/bash
VENV := .venv
PYTHON ?= python3
# pip extras of the install; CI adds ray: `make install EXTRAS=test,ray`
EXTRAS ?= test
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: install demo run test test-all mlflow-ui prefect-ui params clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed  ## virtual environment in .venv with tunepath and its pinned dependencies

demo: install  ## build the demo model and data when missing; track the data with DVC
	tunepath demo

run: demo  ## the whole pipeline on the demo (pass ARGS="--set train.max_steps=20" to override params)
	@start=$$(date +%s); tunepath run $(ARGS); status=$$?; echo "pipeline: $$(( $$(date +%s) - start )) s"; exit $$status

test: install  ## the fast tier: offline, CPU, the real pipeline on the tiny model
	pytest -q

test-all: install  ## every tier that runs without a GPU
	pytest -q -m "not gpu and not browser"

params:  ## regenerate params.yaml with every default and its description
	tunepath params > params.yaml

mlflow-ui:  ## the MLflow UI on the registry `make run` filled: http://127.0.0.1:5000
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

prefect-ui:  ## the Prefect UI with the runs `make run` made: http://127.0.0.1:4200
	python -m flows.server --host 127.0.0.1 --port 4200

clean:  ## remove pipeline outputs (keeps the venv, data and demo model)
	rm -rf artifacts mlflow.db mlartifacts .prefect

# Local services (tunepath up/down/status): state, PIDs and logs in .tunepath/
.PHONY: up down status
up: install  ## Prefect and MLflow servers, a worker and the deployments on 127.0.0.1; prints the two URLs (ARGS="--prefect-port 0" picks free ports)
	@start=$$(date +%s); tunepath up $(ARGS); status=$$?; echo "make up: $$(( $$(date +%s) - start )) s"; exit $$status

down:  ## stop exactly the processes `make up` started
	tunepath down

status:  ## what `make up` started: running or not, PID, URL, log
	tunepath status
