# Every target does its own set-up on a fresh machine: it creates .venv and installs upweight.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
VENV_BENCH  := .venv-bench
BENCH_STAMP := $(VENV_BENCH)/.installed

.PHONY: demo test docs docs-check gpu-check example-transformers bench bench-solvers bench-hvp bench-hvp-batch bench-batch-budget bench-embedding bench-floor-bound bench-cg-stopping bench-threads bench-peers bench-peers-check bench-peers-w1 bench-peers-w2 bench-peers-w2-full bench-peers-w3-mlp bench-peers-w3-cnn bench-peers-w3-full bench-peers-w5 bench-peers-w5-k100 lint clean
.PHONY: bench-peers-w4 bench-peers-w4-k100 bench-peers-w4-full

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/upweight explain --out out/explain.png

test: $(STAMP)
	$(PY) -m pytest -q

# the documentation site (mkdocs.yml, docs/): built into site/; --strict turns every warning (a broken
# link, a docstring the API reference cannot read) into an error. tests/test_docs.py builds it too.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site

# on a machine with a CUDA GPU (and a CUDA build of torch): the device tests, then the W2 and W5
# queries on the GPU against the CPU, recorded in bench/RESULTS.md (section gpu-check; a few minutes)
gpu-check: $(STAMP)
	$(PY) -m pytest -q -rs tests/test_device.py tests/test_kfac_sampled.py tests/test_fig2.py -k "device or cuda"
	$(PY) bench/bench_gpu.py --out bench/RESULTS.md

# the docs check alone: the strict build and the code of README.md and the guide pages
docs-check: $(STAMP)
	$(PY) -m pytest -q tests/test_docs.py

# influence on a small BERT spam filter and a small GPT-2 trained here on the Enron e-mails
# (docs/transformers.md; about 13 minutes on 2 cores, ENRON=… to point elsewhere, ARGS=--tiny for a quick run)
UPWEIGHT_DATA ?= ../shared/data
ENRON ?= $(UPWEIGHT_DATA)/enron1
example-transformers: $(STAMP)
	$(PY) examples/transformers_enron.py --data $(ENRON) --out out/transformers_enron --threads 1 --pooler $(ARGS)

# all benchmark tables go to bench/RESULTS.md, each run replacing only its own section
bench: bench-solvers bench-hvp bench-hvp-batch bench-batch-budget bench-embedding bench-floor-bound bench-cg-stopping bench-peers

bench-solvers: $(STAMP)
	$(PY) bench/bench_solvers.py --out bench/RESULTS.md

bench-hvp: $(STAMP)
	$(PY) bench/bench_hvp.py --out bench/RESULTS.md

bench-hvp-batch: $(STAMP)
	$(PY) bench/bench_hvp_batch.py --out bench/RESULTS.md

bench-batch-budget: $(STAMP)
	$(PY) bench/bench_batch_budget.py --out bench/RESULTS.md

bench-embedding: $(STAMP)
	$(PY) bench/bench_embedding.py --out bench/RESULTS.md

# lower bounds of the whole query against the cost floor (W1, W2 n = 20,000 K = 10, W2 n = 55,000 K = 100),
# and upweight's queries against those bounds in the same child process (≈ 15 min)
bench-floor-bound: $(STAMP)
	$(PY) bench/bench_floor_bound.py --out bench/RESULTS.md

# W2 n = 20,000 K = 10: block CG's residual stopping rule against the ranking per iteration, in
# float64, float32 products, float32 and bfloat16 products, beside upweight's CG (about 4 min)
bench-cg-stopping: $(STAMP)
	$(PY) bench/bench_cg_stopping.py --out bench/RESULTS.md

# digits and MNIST-5k queries with 1 and 2 torch threads and upweight's default, idle, with one busy
# process per two cores and with one per core; BEFORE=path/to/other/checkout/src adds that package's
# default as a column; and CG's sampled final residual check (about 6 min)
bench-threads: $(STAMP)
	$(PY) bench/bench_threads.py --out bench/RESULTS.md $(if $(BEFORE),--before-src $(BEFORE))

# peers (pyDVL, captum, kronfluence, dattri) live in their own environment (pyDVL needs numpy<2)
$(BENCH_STAMP): bench/peers/requirements.txt bench/peers/constraints.txt pyproject.toml
	VENV_BENCH=$(CURDIR)/$(VENV_BENCH) PYTHON=python3.11 bash bench/peers/setup.sh; test -f $(BENCH_STAMP)

PEERS := $(VENV_BENCH)/bin/python bench/peers/bench_peers.py --out bench/RESULTS.md

# the benchmark's own reference checked against an explicit float64 Hessian before any peer runs
bench-peers-check: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider bench/peers/test_reference.py

bench-peers: bench-peers-check bench-peers-w1 bench-peers-w2 bench-peers-w2-full bench-peers-w3-mlp bench-peers-w3-cnn bench-peers-w5

bench-peers-w1: $(BENCH_STAMP)
	$(PEERS) --workloads W1 --n-test 100 --timeout 120

bench-peers-w2: $(BENCH_STAMP)
	$(PEERS) --workloads W2:20000 --n-test 10 --timeout 240

# the issue's full W2 query: n = 55,000, 100 test points; the fastest accurate method of each library
# at n = 20,000 (and K-FAC, the fast approximate one), each up to 400 s
bench-peers-w2-full: $(BENCH_STAMP)
	$(PEERS) --workloads W2:55000 --n-test 100 --timeout 400 \
	  --methods uw-cg-1e-3,uw-bcg-1e-3,uw-bcg-1e-2,uw-bcg-bf16-1e-2,uw-pcg-kfac4096-1e-3,uw-bpcg-kfac4096-1e-3,uw-pcg-nystrom-1e-3,uw-pbcg-nystrom-1e-3,uw-kfac,pydvl-cg-block,kron-kfac,dattri-cg-100

# W3: the untimed float64 CG reference dominates (MLP n = 1,000: 117 iterations, 190 s on 2 cores);
# the CNN gets the paper's damping 0.01 (§4.2) so that its reference converges within the cap.
# θ̂ and the reference are kept in bench/.cache and reused by a rerun with the same settings.
bench-peers-w3-mlp: $(BENCH_STAMP)
	$(PEERS) --workloads W3-mlp:1000 --n-test 10 --timeout 60 --ref-max-seconds 600 --cache bench/.cache

bench-peers-w3-cnn: $(BENCH_STAMP)
	$(PEERS) --workloads W3-cnn:1000 --n-test 10 --timeout 60 --damping 0.01 --ref-max-seconds 600 --cache bench/.cache

# the issue's full W3 query: 100 test points; each library's fastest accurate method at K = 10 (and
# K-FAC), up to 30 min each; set-up kept in bench/.cache (θ̂ and the float64 reference: MLP ≈ 40 min,
# CNN 55–66 min on 2 cores — its H + δI is ill-conditioned (≈ 660), so its block-CG reference is also
# Nyström-preconditioned: 27 iterations to 5.5e-11). Not part of `make bench` (≈ 4 h on 2 cores).
W3_FULL := --n-test 100 --timeout 1800 --ref-max-seconds 5400 --cache bench/.cache
bench-peers-w3-full: $(BENCH_STAMP)
	$(PEERS) --workloads W3-mlp:1000 $(W3_FULL) \
	  --methods uw-cg-1e-3,uw-bcg-1e-3,uw-pcg-nystrom-1e-3,uw-pbcg-nystrom-1e-3,uw-kfac,pydvl-cg-block,pydvl-ekfac,kron-kfac,dattri-cg-10
	$(PEERS) --workloads W3-cnn:1000 $(W3_FULL) --damping 0.01 --ref-precond-rank 100 \
	  --methods uw-bcg-1e-3,uw-pbcg-nystrom-1e-3,uw-kfac,uw-ekfac,pydvl-cg-block,kron-kfac,kron-ekfac,dattri-cg-10

# W4: ResNet-18 on MNIST (n = 2,000, every parameter, Gauss–Newton curvature, δ = 0.01, θ̂ by 300
# SGD steps). Its float64 GGN block-CG reference does not fit at full width on 2 cores
# (bench-peers-w4-full measures one float64 GGN product and writes the reference's cost into its
# section), so there are two runs. bench-peers-w4: the same network at width 8 (widths
# 8-16-32-64) with the reference (block CG to rtol 1e-6, at most 150 iterations) and the accuracy
# table; most of its time is the reference, kept in bench/.cache. bench-peers-w4-full: ResNet-18
# itself, time and peak memory of upweight's K-FAC/EK-FAC and kronfluence's K-FAC/EK-FAC, no
# reference (each row's agreement with kronfluence's EK-FAC instead, labelled as such).
# Neither is part of `make bench-peers`: each takes tens of minutes on 2 cores.
W4 := --timeout 900 --setup-threads 1 --cache bench/.cache
W4_FULL_EXACT := uw-kfac-unchecked,uw-ekfac-unchecked
W4_FULL_SAMPLED := uw-kfac-sampled-unchecked,uw-ekfac-sampled-unchecked
W4_FULL_METHODS := $(W4_FULL_EXACT),$(W4_FULL_SAMPLED),kron-kfac,kron-ekfac
bench-peers-w4: $(BENCH_STAMP)
	$(PEERS) --workloads W4:2000 --w4-width 8 --n-test 10 --w4-ref-rtol 1e-6 --ref-maxiter 150 $(W4)

# the same width-8 network with 100 test points: block CG on 100 right-hand sides costs about ten
# times the K = 10 reference per iteration, so it is capped at 14 iterations (the section prints its
# residual; its first 10 test points are the K = 10 ones). The rows without the residual check.
W4_K100_METHODS := uw-kfac-unchecked,uw-ekfac-unchecked,uw-kfac-sampled-unchecked,uw-ekfac-sampled-unchecked,kron-kfac,kron-ekfac
bench-peers-w4-k100: $(BENCH_STAMP)
	$(PEERS) --workloads W4:2000 --w4-width 8 --n-test 100 --w4-ref-rtol 1e-6 --ref-maxiter 14 $(W4) \
	  --methods $(W4_K100_METHODS)

bench-peers-w4-full: $(BENCH_STAMP)
	$(PEERS) --workloads W4:2000 --n-test 10 --no-reference --ref-max-seconds 1800 $(W4) \
	  --methods $(W4_FULL_METHODS)

# W5: a 2-layer BERT-style classifier on Enron spam/ham (n = 1,000, every parameter, Gauss–Newton curvature,
# δ = 0.01): upweight's K-FAC/EK-FAC/GGN block CG against kronfluence's K-FAC/EK-FAC. Set-up on one thread
# (the machine is shared), kept in bench/.cache; the float64 GGN block-CG reference (one GGN product per
# right-hand side and iteration) is most of it, then upweight's block CG; the times are in bench/RESULTS.md.
# K = 100 (not in `make bench`): ten times the products per reference iteration; the K-FAC/EK-FAC rows
# (upweight's GGN block CG, its exact method, is timed at K = 10).
W5_K100_UW := uw-kfac,uw-ekfac,uw-kfac-unchecked,uw-ekfac-unchecked
W5_K100_METHODS := $(W5_K100_UW),uw-kfac-linear-unchecked,uw-ekfac-linear-unchecked,kron-kfac,kron-ekfac,pydvl,captum,dattri
W5 := --workloads W5 --timeout 900 --setup-threads 1 --cache bench/.cache
bench-peers-w5: $(BENCH_STAMP)
	$(PEERS) $(W5) --n-test 10

bench-peers-w5-k100: $(BENCH_STAMP)
	$(PEERS) $(W5) --n-test 100 --methods $(W5_K100_METHODS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples tools
	$(VENV)/bin/ruff format --check src tests bench examples tools

clean:
	rm -rf $(VENV) $(VENV_BENCH) out .pytest_cache
