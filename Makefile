# `make run` and `make test` install what they need into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch first and pinned: pip takes it from the machine's local wheel store instead of
# downloading several GB (see README, "Development").
TORCH := torch==2.14.1 torchvision==0.29.1
# The planner's person segmentation model (stages/people.py) is a file inside this wheel, the last
# mediapipe that bundles its models and accepts numpy 2; LiteRT (pyproject.toml) runs it and
# nothing imports mediapipe. Without its declared dependencies: they would put
# opencv-contrib-python over ultralytics' opencv-python, and bring jax.
MEDIAPIPE := mediapipe==0.10.14
APT_PACKAGES := tesseract-ocr tesseract-ocr-kor tesseract-ocr-eng fonts-nanum

.PHONY: install system-deps test-deps run test soak bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[ml,dev,console]"
	$(PY) -m pip install -q --no-deps $(MEDIAPIPE) || echo "note: $(MEDIAPIPE) did not install (no wheel for this \
	  Python?); the planner then sees people only through faces and detections, and says so (person_finder: none)"
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

# Test-only tools: the report test opens an HTML report in headless Chromium, and the pooler test
# runs a real PgBouncer. Installed as root on Debian (the tests skip with a reason otherwise), so
# that `make test` is the whole suite on a fresh machine, as in CI.
TEST_APT_PACKAGES := chromium pgbouncer
test-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	{ command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; } || missing="$$missing pgbouncer"; \
	if [ -z "$$missing" ]; then \
	  true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  (systemctl stop pgbouncer || service pgbouncer stop) >/dev/null 2>&1 || true; \
	else \
	  echo "note: please install$$missing (sudo apt-get install ...); the tests that need them are skipped"; \
	fi

test: install system-deps test-deps
	$(PY) -m pytest -q

# The fault suite (tests/faults, also part of `make test`) in its long form: five times the jobs
# and fault rounds. See docs/reliability.md.
soak: install
	FAULTS_SOAK=1 $(PY) -m pytest tests/faults tests/test_supervisor.py tests/test_outside_writers.py -q

# Benchmarks: procrastinate is a benchmark-only dependency (the `bench` extra).
bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/engine_throughput.py
	$(PY) bench/claim_history.py
	$(PY) bench/cli_startup.py
	$(PY) bench/cpu_stages.py
	$(PY) bench/creative_quality.py
	$(PY) bench/guided_decoding.py
	$(PY) bench/hop_profile.py

clean:
	rm -rf $(VENV) .adflow
