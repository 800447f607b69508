# clinfer — set-up and checks. `make run` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install run test lint typecheck bench models clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 (CPU) is pinned in the [train] extra; the serving install does not need it
	$(BIN)/pip install --quiet -e '.[dev,train]'
	# dcmtk (storescu, echoscu): the real DICOM peers of the DIMSE tests
	command -v storescu >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q dcmtk || \
		  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dcmtk; }; }; } || \
		echo "dcmtk is not installed: the DIMSE tests will skip (or fail with CLINFER_REQUIRE_SERVICES=1)"
	# chromium (and its driver): the real browser of the viewer's test, driven by playwright (no browser download)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver || \
		  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }; }; } || \
		echo "chromium is not installed: the viewer's browser test will skip (or fail with CLINFER_REQUIRE_SERVICES=1)"
	# promtool (Debian's prometheus): checks the alert rules, the scrape configuration and our /metrics exposition
	command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus || \
		  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus; }; }; } || \
		echo "promtool is not installed: the Prometheus tests will skip (or fail with CLINFER_REQUIRE_SERVICES=1)"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/clinfer serve

lint: install
	$(BIN)/ruff check service tests
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

test: install lint typecheck
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/clinfer bench --studies 200 --concurrency 8 --repeat 3 --json bench-results/bench.json

# retrain and export the demonstration model (deterministic with the seed; minutes on a CPU)
models: install
	$(BIN)/clinfer models train cxr-fusion --seed 0
	$(BIN)/clinfer models export cxr-fusion --out models
	$(BIN)/clinfer models evaluate cxr-fusion
	$(BIN)/clinfer models train ct-head-ich --out models --seed 0

clean:
	rm -rf $(VENV) var bench-results
