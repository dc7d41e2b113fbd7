PYTHON ?= python

.PHONY: install test test-fast train clean

install:  ## install zeroseg (editable) with the test dependencies
	$(PYTHON) -m pip install -e ".[dev]"

test:  ## the full test suite, as CI runs it
	$(PYTHON) -m pytest -q tests

test-fast:  ## everything except the multi-process and multirun tests
	$(PYTHON) -m pytest -q -m "not slow" tests

train:  ## the default job: baseline on ZSS-Synth
	$(PYTHON) -m zeroseg.train

clean:
	rm -rf outputs multirun logs .pytest_cache
