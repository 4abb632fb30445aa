#!/usr/bin/env bash
# Set up (if needed), save a ResNet-18 built by compressor.zoo as a state_dict, and compress it with
# the flagship recipe. Needs nothing from ../shared. Outputs land in demo/resnet18.compressed/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p demo
.venv/bin/python -c "
import torch
from compressor import zoo
torch.manual_seed(0)
torch.save(zoo.resnet18().state_dict(), 'demo/resnet18.pt')
"
exec .venv/bin/compress --recipe recipes/mobile.yaml --arch compressor.zoo:resnet18 --force demo/resnet18.pt "$@"
