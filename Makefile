# effnet entry points. `make demo` and `make test` are the README's two commands; each does
# its own set-up (project-local .venv with libtorch from the PyPI torch wheel).
#
#   make build        release binary at target/release/effnet (rpath finds libtorch; no env needed)
#   make build CUDA=1 same, linked against libtorch_cuda (installs torch's CUDA wheels first)
#   make demo         the main job
#   make test         fmt, clippy, all tests (installs the Python reference stack for parity tests)
#   make bench        benchmarks against PyTorch (model step, input pipeline, training) and the
#                     coordinator under 1,000 heartbeating workers; figures in docs/benchmarks.md
#   make soak         the reliability soak: 10,000 steps with faults, memory and files watched
#                     (~8 min; docs/reliability.md, results in docs/soak/)
#   make device-bundle the CUDA build stripped and packed for a GPU machine without build tools:
#                     target/device/effnet-device.tar.xz, run there by scripts/device-check.sh (docs/gpu.md)

SHELL := /bin/bash
CARGO ?= cargo
CUDA ?=
ifeq ($(CUDA),1)
  export EFFNET_TORCH := cuda
  CARGO_FEATURES := --features cuda
endif

.PHONY: venv venv-reference build demo test lint bench soak device-bundle clean-venv

venv:
	@scripts/bootstrap.sh

venv-reference:
	@scripts/bootstrap.sh reference

build: venv
	$(CARGO) build --release -p effnet-cli $(CARGO_FEATURES)

demo: build
	@scripts/demo.sh

lint: venv
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: venv-reference lint
	$(CARGO) test --workspace

bench: venv-reference
	@scripts/bench-model.sh
	@scripts/bench-loader.sh
	@scripts/bench-train.sh
	@scripts/bench-precision.sh
	@scripts/bench-distributed.sh
	@scripts/bench-coordinator.sh
	@scripts/bench-checkpoint.sh

soak: build
	@scripts/soak.sh

device-bundle:
	@EFFNET_TORCH=cuda CARGO=$(CARGO) scripts/device-bundle.sh

clean-venv:
	rm -rf .venv
