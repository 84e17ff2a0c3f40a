# Quick start:  `make demo`  (set up .venv and run the default job)   `make test`  (set up and run every test)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch's CPU build where there is no CUDA GPU; with a GPU, pip's default (CUDA) build
TORCH  ?= torch==2.13.0

.PHONY: demo test test-fast test-latest lint format setup system-deps browser docs clean

# setuptools says of every editable install through its import finder (which the package-dir mapping needs) to
# beware of folders named like the package; no folder here is named lora_launch, so the notice is left out
EDITABLE_QUIET = PYTHONWARNINGS="ignore:Editable installation"
# pytest keeps the test modules it rewrites (assert messages) in __pycache__ only where bytecode may be written:
# under PYTHONDONTWRITEBYTECODE=1, which some images set, every worker rewrites them again on each run (a few
# seconds). The test targets let it write.
TEST_ENV = env -u PYTHONDONTWRITEBYTECODE HF_HUB_OFFLINE=1

setup: $(VENV)/.installed

# constraints.txt: the versions the tests last passed with (pyproject.toml keeps ranges for users)
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(EDITABLE_QUIET) $(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/lora-launch $(ARGS)

# As root on Debian/Ubuntu, also installs what the multi-node and Slurm tests run on
# (iproute2, slurm, munge); elsewhere those tests are skipped with the reason.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -f .ci/setup-system.sh ]; then \
		bash .ci/setup-system.sh; \
	else echo "system-deps: not root or no apt-get: netns/Slurm tests will be skipped"; fi

# the report's test opens the page in headless Chromium and fails without it: as root with apt-get,
# installed here; otherwise the command to run is printed
browser:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "browser: installing chromium for the HTML report's test (apt-get install chromium)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	else echo "browser: chromium is missing and the report's test will fail; install it: sudo apt-get install -y chromium"; fi

# every tier on three workers (pytest-xdist): runs of two ranks take turns on one of them, and the tests sharing a
# module's fixture stay together (tests/conftest.py). Three on the CI machine's two cores: most tests wait on
# processes they started, at times all at once, and a third worker fills those gaps (bench/README.md, "The test
# suite's time"); `make test ARGS="-n 0"` runs them one at a time
test: setup system-deps browser
	$(TEST_ENV) $(BIN)/python -m pytest -q -rfEs -n 3 --dist loadgroup tests $(ARGS)

# the fast tier: unit tests only (no subprocesses), in-process and independent, so on two workers; the few
# marked slow (a flex_attention compile on the CPU, packing a million samples) run in `make test`
test-fast: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -rfEs -n 2 --dist loadgroup -m "not slow" tests/unit $(ARGS)

# ruff's lint and format checks (pyproject.toml's [tool.ruff]); `make format` applies what they can fix
lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

# the documentation site (mkdocs.yml, docs/); --strict: a broken link or an unlisted page fails the build
SITE ?= build/site
docs: setup
	HF_HUB_OFFLINE=1 NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(SITE)

# what users get from `pip install`: the newest versions pyproject.toml's ranges allow (no constraints.txt),
# in a venv of its own, running the bad-input catalogue (one `error:` line, no traceback, for every refusal)
LATEST ?= .venv-latest
BAD_INPUTS = tests/integration/test_bad_inputs.py tests/integration/test_bad_inputs_rundir.py \
	tests/integration/test_bad_inputs_injection.py tests/integration/test_bad_inputs_serve.py \
	tests/unit/test_values_never_code.py tests/unit/test_serve_requests.py tests/unit/test_studio_hardening.py \
	tests/unit/test_studio_confinement.py
$(LATEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q "$(TORCH)"
	$(EDITABLE_QUIET) $(LATEST)/bin/python -m pip install -q --upgrade -e ".[dev]"
	touch $@

test-latest: $(LATEST)/.installed
	$(TEST_ENV) $(LATEST)/bin/python -m pytest -q -rs $(BAD_INPUTS) $(ARGS)

clean:
	rm -rf $(VENV) $(LATEST) runs sweeps $(SITE)
