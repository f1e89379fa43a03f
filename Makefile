# `make run` and `make test` install what they need into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch first and pinned: pip takes it from the machine's local wheel store instead of
# downloading several GB (see README, "Development").
TORCH := torch==2.14.1 torchvision==0.29.1
APT_PACKAGES := tesseract-ocr tesseract-ocr-kor tesseract-ocr-eng fonts-nanum

.PHONY: install system-deps run test soak bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[ml,dev]"
	touch $(STAMP)

# Tesseract with Korean data and a Korean font. Installed with apt-get when we are root on a
# Debian-like machine; otherwise we say what is missing and carry on (the stages that need
# them report a clear error).
system-deps:
	@if command -v tesseract >/dev/null 2>&1 && tesseract --list-langs 2>/dev/null | grep -qx kor \
	    && ls /usr/share/fonts/truetype/nanum/NanumGothic.ttf >/dev/null 2>&1; then \
	  true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $(APT_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	else \
	  echo "note: please install $(APT_PACKAGES) (sudo apt-get install ...); OCR and Korean text need them"; \
	fi

# The demo: embedded PostgreSQL, migrations, sample images, workers, one live job, an HTML report.
# Extra flags: make run DEMO_ARGS="--workers 3 --plain".
DEMO_ARGS ?=
run: install system-deps
	$(PY) cli.py demo $(DEMO_ARGS)

test: install system-deps
	$(PY) -m pytest -q

# The fault suite (tests/faults, also part of `make test`) in its long form: five times the jobs
# and fault rounds. See docs/reliability.md.
soak: install
	FAULTS_SOAK=1 $(PY) -m pytest tests/faults -q

# Benchmarks: procrastinate is a benchmark-only dependency (the `bench` extra).
bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/engine_throughput.py
	$(PY) bench/claim_history.py

clean:
	rm -rf $(VENV) .adflow
