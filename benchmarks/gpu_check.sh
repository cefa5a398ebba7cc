#!/usr/bin/env bash
# On a CUDA machine, in under 8 minutes: the gpu tests, the numerics table and the MeZO step figures, all printed.
#   bash benchmarks/gpu_check.sh            # from the repository root, with zobench importable
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device')"
python -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

echo "== pytest -m gpu"
timeout 180 python -m pytest -q -m gpu -s tests/test_gpu_precision.py tests/test_devices.py

echo "== benchmarks/numerics.py (fp16/bf16, reference vs zobench; ZO and FO optimizers)"
timeout 150 python benchmarks/numerics.py --device cuda --model opt-125m --steps 5 \
    --only mezo,sparse_mezo,adamezo,zo_adam,zo_sgd_momentum,zo_sgd_sign,sgd,adam,ip_sgd

echo "== benchmarks/zo_step.py (both zo_update modes, fp16 weights on CUDA)"
timeout 120 python benchmarks/zo_step.py --device cuda --model opt-125m --repeats 5

echo "== benchmarks/zo_generator.py (portable z: drawn on the host and copied, against CUDA's generator)"
timeout 90 python benchmarks/zo_generator.py --device cuda --model opt-125m --repeats 3
