# fedseg: `make run` (set up, then a simulated federation) and `make test` (set up, then the tests).
#
# Set-up creates .venv with Python 3.11 and installs the pinned dependencies of
# requirements.txt. torch is pinned through a constraints file so that no other
# package can pull a different build:
#   - TORCH_SPEC, if you set it (e.g. TORCH_SPEC='torch==2.13.0+cpu'), wins;
#   - else a CPU wheel found in pip's configured find-links is used (no CUDA download);
#   - else the plain range, and pip picks the build for your platform (GPU users).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.fedseg-installed
RUN_ARGS ?=
PYTEST_ARGS ?=

LOCAL_CPU_TORCH := $(firstword $(foreach dir,$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null),$(wildcard $(dir)/torch-*+cpu-cp311-*.whl)))
ifneq ($(LOCAL_CPU_TORCH),)
TORCH_SPEC ?= torch==$(word 2,$(subst -, ,$(notdir $(LOCAL_CPU_TORCH))))
else
TORCH_SPEC ?= torch>=2.6
endif

.PHONY: setup run test clean

setup: $(STAMP)

$(STAMP): requirements.txt Makefile
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	@echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	@echo "installing dependencies into $(VENV) ($(TORCH_SPEC))"
	$(VPY) -m pip install --quiet --disable-pip-version-check \
		-c $(VENV)/torch-constraint.txt "$(TORCH_SPEC)" -r requirements.txt
	@touch $(STAMP)

run: $(STAMP)
	$(VPY) -m simulations $(RUN_ARGS)

test: $(STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
