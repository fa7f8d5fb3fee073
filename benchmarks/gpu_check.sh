#!/usr/bin/env bash
# GPU check: the device-parametrised tests on CUDA, then a short GPU benchmark (under 5 minutes).
# On a machine without CUDA it says so and exits 0 after the tests have skipped.
# Usage: benchmarks/gpu_check.sh   (from the repository root; uses .venv if present)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PATH="$(dirname "$PY"):$PATH"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; the CUDA tests skip:"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py -k "cuda and (empty_batch or parity)" -rs | tail -3
  exit 0
fi

"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py -k "cuda" -rs | tail -5

timeout 120 "$PY" - <<'PY'
import time, torch, torch.nn.functional as F
from kanvolution.models import create_model

def bench(model, steps=20, autocast=None):
    x = torch.rand(128, 1, 28, 28, device="cuda") * 2 - 1
    y = torch.randint(0, 10, (128,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=autocast, enabled=autocast is not None):
            loss = F.nll_loss(model(x).float(), y)
        loss.backward()
        opt.step()
    start = time.perf_counter(); step(); torch.cuda.synchronize(); first = time.perf_counter() - start
    for _ in range(3): step()
    torch.cuda.synchronize(); start = time.perf_counter()
    for _ in range(steps): step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3, first

for name in ("cnn_medium", "kanc_mlp_medium"):
    for label, autocast, compiled in (("fp32 eager", None, False), ("bf16 eager", torch.bfloat16, False),
                                      ("fp16 eager", torch.float16, False), ("fp32 compiled", None, True)):
        torch.manual_seed(0)
        model = create_model(name).cuda()
        run = torch.compile(model) if compiled else model
        ms, first = bench(run, autocast=autocast)
        print(f"{name:16s} {label:14s} step {ms:7.2f} ms  (first step {first:5.1f} s)")
PY
