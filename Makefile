# Two commands on a fresh machine: `make reports` (the main job) and `make test`.
PY ?= .venv/bin/python
MODE ?= full
# JOBS: train the notebooks' fine-tuning runs first, in that many parallel workers (1 thread each, cut to the
# cores); auto: one per core in full mode; 1: the notebooks train them one by one
JOBS ?= auto

.PHONY: install test test-browser reports reports-plan reports-smoke reports-strong bench clean-cache

$(PY):
	bash .ci/install.sh

install: $(PY)

test: $(PY)
	$(PY) -m pytest -q

# the end-to-end JupyterLab test in headless Chromium (installs Chromium via apt); its screenshot replaces
# reports/browser/05_interactive.png (`make test` leaves that one alone)
test-browser: $(PY)
	bash .ci/install.sh --browser
	L2P_SCREENSHOT_DIR=reports/browser $(PY) -m pytest -q -m browser

reports: $(PY)
	$(PY) -m l2p.reports --mode $(MODE) --jobs $(JOBS)

# what `make reports` would train, and how long that should take (from the cache, else the reference machine)
reports-plan: $(PY)
	$(PY) -m l2p.reports --mode $(MODE) --plan

reports-smoke: $(PY)
	$(PY) -m l2p.reports --mode smoke --out reports-smoke

# notebooks 00 and 03 on the "strong" world (VAE and source trained longer; its source passes 0.80): the world
# builds in ~1 h on 2 cores, then 03 trains three 6000-step runs and the same architecture from scratch, one by one,
# ~1.3 h each
reports-strong: $(PY)
	$(PY) -m l2p.reports --only 00 03 --out reports/strong -p mode=strong

bench: $(PY)
	$(PY) bench/bench_load.py
	$(PY) bench/bench_convert.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_head_layout.py
	$(PY) bench/bench_toyworld.py
	$(PY) bench/bench_oversubscription.py
	$(PY) bench/bench_vae_precision.py

clean-cache:
	rm -rf .cache/l2p
