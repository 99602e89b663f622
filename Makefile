# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRAS ?= test,bench

.PHONY: demo test build venv rust-test lint pytest bench bench-quick bench-qemu wheel clean fuzz soak

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.9.4,<2"
	touch $@

venv: $(VENV)/.ready

# Build the extension in release mode and install it (with its extras) into .venv.
build: venv
	$(VENV)/bin/maturin develop --release -q -E $(EXTRAS)
	$(PY) -m compileall -q python/cprfast  # bytecode even under PYTHONDONTWRITEBYTECODE: a cpr-exec successor must not compile on its pause path

demo: build
	$(VENV)/bin/cprfast info
	$(VENV)/bin/cprfast demo

rust-test:
	cargo test -p cprfast-core --release

lint:
	cargo clippy --workspace --all-targets --release -- -D warnings
	$(PY) -m mypy --strict python/cprfast
	$(PY) -m mypy.stubtest cprfast._core --allowlist .stubtest-allowlist

pytest: build
	$(PY) -m pytest -q

test: build rust-test lint pytest

# Live-update the reference VMM SOAK_UPDATES times in a row across the modes (stopping after
# SOAK_MINUTES); fails if fds, mappings or RSS grow or a heartbeat gap passes its mode's floor.
SOAK_UPDATES ?= 1000
SOAK_MINUTES ?= 14
soak: build
	$(VENV)/bin/cprfast soak --updates $(SOAK_UPDATES) --minutes $(SOAK_MINUTES)

# Micro-benchmarks and live-update scenarios; JSON and plots in bench/results/ (about 5 min here).
bench: build
	$(VENV)/bin/cprfast bench

bench-quick: build
	$(VENV)/bin/cprfast bench --quick

# Install QEMU 10.x (Debian bookworm-backports) for the side-by-side QEMU benchmark and
# the conformance test against a real QEMU cpr stream. Idempotent; needs root.
BACKPORTS_SOURCES := /etc/apt/sources.list.d/cprfast-bookworm-backports.sources
bench-qemu:
	@if qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 10\.'; then \
		qemu-system-x86_64 --version | head -1; \
	else \
		printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
			'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' > $(BACKPORTS_SOURCES) && \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm-backports qemu-system-x86 && \
		qemu-system-x86_64 --version | head -1; \
	fi

wheel: venv
	$(VENV)/bin/maturin build --release -o dist

clean:
	rm -rf $(VENV) target dist

# Coverage-guided fuzzing (atheris) of every parser fed from outside, FUZZ_SECONDS per target.
# New inputs go to fuzz/work/<target>/ (not committed); crashes to fuzz/work/crash-*.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= $(notdir $(wildcard fuzz/corpus/*))
fuzz: build
	@set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/work/$$t; echo "== $$t ($(FUZZ_SECONDS) s)"; \
		$(PY) fuzz/run.py $$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
			-artifact_prefix=fuzz/work/ -print_final_stats=1 fuzz/work/$$t fuzz/corpus/$$t 2>&1 \
			| grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss)|crash|Error|==" || true; \
		test -z "$$(ls fuzz/work | grep -E '^(crash|timeout|oom|leak)-')" || { echo "findings in fuzz/work"; exit 1; }; \
	done
