# ibm-fms: set-up, tests and benchmarks. `make install && make test` on a fresh machine.
PYTHON ?= python3
# torch is installed before everything else so that requirements.txt's range never pulls a
# multi-GB CUDA build onto a CPU-only machine. Override e.g. TORCH_SPEC="torch --index-url ..."
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
TOKENIZER_DIR ?= tokenizers/llama-2
TOKENIZER_REPO ?= meta-llama/Llama-2-7b-hf
RESULTS ?= results

# Benchmark knobs (see README): empty values mean "the script's default for this device".
MODEL_PATH ?=
TOKENIZER ?=
VARIANT ?=
BATCH_SIZES ?=
CONTEXT_LENGTHS ?=
MAX_NEW_TOKENS ?=
WANDB ?= 0
# decode in windows of DECODE_WINDOW steps (e.g. 16); CUDA_GRAPHS=1 replays them from graphs, COMPILE=1 compiles
DECODE_WINDOW ?=
CUDA_GRAPHS ?= 0
COMPILE ?= 0
BENCH = $(PYTHON) scripts/benchmark_inference.py --results_dir $(RESULTS) \
	$(if $(MODEL_PATH),--model_path $(MODEL_PATH)) $(if $(TOKENIZER),--tokenizer $(TOKENIZER)) \
	$(if $(BATCH_SIZES),--batch_sizes $(BATCH_SIZES)) $(if $(CONTEXT_LENGTHS),--context_lengths $(CONTEXT_LENGTHS)) \
	$(if $(MAX_NEW_TOKENS),--max_new_tokens $(MAX_NEW_TOKENS)) $(if $(filter 1,$(WANDB)),--wandb) \
	$(if $(DECODE_WINDOW),--decode_window $(DECODE_WINDOW)) $(if $(filter 1,$(CUDA_GRAPHS)),--cuda_graphs) \
	$(if $(filter 1,$(COMPILE)),--compile)

.PHONY: install test test-paged-attention check-torch download-tokenizer \
	bench-llama bench-llama-paged bench-llama-t4 bench-llama-paged-t4 bench-granite bench-granite-paged \
	bench-compare bench-gpt2 bench-serving serve bench-server-vs-offline bench-startup bench-targets

install:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') already installed"; \
	else \
		$(PYTHON) -m pip install "$(TORCH_SPEC)"; \
	fi
	$(PYTHON) -m pip install -e ".[hf,test]"

test:
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-paged-attention:
	$(PYTHON) -m pytest -q -m paged $(PYTEST_ARGS)

check-torch:
	@$(PYTHON) -c "import torch; print(f'PyTorch version: {torch.__version__}'); print(f'CUDA available: {torch.cuda.is_available()}'); print(f'GPU device: {torch.cuda.get_device_name(0)}' if torch.cuda.is_available() else 'GPU device: none (CPU only)')"

download-tokenizer:
	$(PYTHON) scripts/download_tokenizer.py --repo $(TOKENIZER_REPO) --out $(TOKENIZER_DIR)

bench-llama:
	$(BENCH) --architecture llama --variant $(or $(VARIANT),auto-llama) --attn_name sdpa --profile standard

bench-llama-paged:
	$(BENCH) --architecture llama --variant $(or $(VARIANT),auto-llama) --attn_name paged --profile standard

bench-llama-t4:
	$(BENCH) --architecture llama --variant $(or $(VARIANT),auto-llama) --attn_name sdpa --profile light

bench-llama-paged-t4:
	$(BENCH) --architecture llama --variant $(or $(VARIANT),auto-llama) --attn_name paged --profile light

bench-granite:
	$(BENCH) --architecture $(or $(GRANITE_ARCH),granite_hybrid) --variant $(or $(VARIANT),auto-granite) --attn_name sdpa --profile standard

bench-granite-paged:
	$(BENCH) --architecture $(or $(GRANITE_ARCH),granite_hybrid) --variant $(or $(VARIANT),auto-granite) --attn_name paged --profile standard

bench-compare:
	$(BENCH) --architecture llama --variant $(or $(VARIANT),auto-llama) --attn_name sdpa,paged --profile standard

bench-gpt2:
	$(PYTHON) scripts/benchmark_variants.py --results_dir $(RESULTS)

bench-serving:
	$(PYTHON) scripts/benchmark_serving.py --results_dir $(RESULTS) $(if $(MODEL_PATH),--model_path $(MODEL_PATH))

# the OpenAI-compatible server (`fms serve`): a checkpoint folder / hub id in MODEL_PATH, else random weights
PORT ?= 8000
serve:
	$(PYTHON) -m fms.entrypoints.cli serve $(if $(MODEL_PATH),$(MODEL_PATH),--architecture llama --variant $(or $(VARIANT),micro)) --port $(PORT)

# server throughput at saturation vs the offline engine on one workload (CUDA: llama 3.2-1b, 128 requests)
bench-server-vs-offline:
	$(PYTHON) scripts/bench_server_vs_offline.py --output $(RESULTS)/server_vs_offline.json $(if $(VARIANT),--variant $(VARIANT))

# engine start-up by phase, cold and warm, each in fresh processes (CUDA: llama 3.2-1b, 3.1-8b, granite 4.0-h-1b;
# CPU: llama micro). STARTUP_MODELS="llama:3.1-8b" picks models, STARTUP_TIMEOUT the seconds per process
STARTUP_MODELS ?=
STARTUP_TIMEOUT ?=
bench-startup:
	$(PYTHON) scripts/bench_startup.py --output $(RESULTS)/startup.json $(if $(STARTUP_MODELS),--models $(STARTUP_MODELS)) \
		$(if $(STARTUP_TIMEOUT),--timeout $(STARTUP_TIMEOUT))

bench-targets:
	$(PYTHON) scripts/bench_targets.py --output $(RESULTS)/targets.json $(if $(TARGET_ROWS),--rows $(TARGET_ROWS)) \
		$(if $(TARGETS_TIMEOUT),--timeout $(TARGETS_TIMEOUT)) $(if $(REPEATS),--repeats $(REPEATS))
