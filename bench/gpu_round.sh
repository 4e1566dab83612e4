#!/usr/bin/env bash
# One GPU round for the fused kd kernels: build (CUDA on), the `gpu` tests, the benchmarks.
# Everything (logs, JSON lines, environment) lands in OUTDIR.
#
#   bash bench/gpu_round.sh OUTDIR [STAGE ...]
#
# Stages (default: all but resources, in this order): env build test quick paths cache linear bench full
#   env    nvidia-smi, versions
#   build  pip install --no-build-isolation --no-deps -e .  (FASTKD_CUDA=ON; archs: FASTKD_CUDA_ARCHS,
#          default "80;90")
#   resources  (not in the default list: it needs no GPU, run it anywhere with nvcc)
#          bench/kernel_resources.py --triton: registers, spills and loads in flight of every
#          CUDA kernel and Triton kd config, as compiled for this GPU's architecture
#   test   pytest -m gpu: every gpu-marked test (real vocabularies, V = 50257 included)
#   quick  bench/kd_gpu.py --quick: one point (bf16, N=16384, V=128256, every divergence)
#   paths  bench/kd_gpu.py on the fused backends over every code path of the loss: training forward,
#          no-grad forward, inplace_grad, backward with grad_output 1 / 0.5 / under retain_graph
#          (bf16, N=16384, V {50257, 128256}, forward KL and JSD)
#   cache  bench/cache.py --device cuda: every capture mode (top-k, sampled i.i.d. and systematic)
#          and the sparse loss, every GPU backend (bf16, N=16384, V {128256, 50257}, k=64)
#   linear bench/linear.py --device cuda: the fused-linear loss (bf16, N=8192, H {2048,4096}, V {32000,128256})
#   bench  bench/kd.py --device cuda: the fused kd loss in a fresh process per measurement (bf16/fp32 x N x V)
#   full   bench/kd_gpu.py over its whole matrix (bf16/fp32 x N {4096,16384} x V {32000,128256,256000})
# The bench/*.py scripts run the benchmarks of fastkd.bench (the same as `fastkd bench NAME`).
# Each stage is a separate command, so a machine with a per-command time limit can run them one by one.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_round.sh OUTDIR [STAGE ...]}
shift
STAGES=${*:-env build test quick paths cache linear bench full}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
status=0

run_stage() {  # name, command...: log to OUT/name.log, remember failures, keep going
  local name=$1
  shift
  echo "=== $name: $*" | tee -a "$OUT/round.log"
  local t0=$(date +%s)
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$OUT/round.log"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /'
  [ $rc -eq 0 ] || status=1
}

for stage in $STAGES; do
  case $stage in
    env)
      run_stage env bash -c "nvidia-smi; nvcc --version; $PY -c 'import torch, sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'; $PY -c 'import triton; print(\"triton\", triton.__version__)'; $PY -c 'import liger_kernel; print(\"liger\", liger_kernel.__version__)' || true"
      ;;
    build)
      run_stage build env FASTKD_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps -e .
      run_stage build_check "$PY" -c "import fastkd, fastkd._ext as e; from fastkd._backends import registry as r; print('cuda kernels:', e.has_cuda_kernels()); print('kd backends on cuda:', r.available('kd', 'cuda')); print('sparse_kd backends on cuda:', r.available('sparse_kd', 'cuda')); assert e.has_cuda_kernels()"
      ;;
    resources)
      arch=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")' 2>/dev/null || echo 90)
      run_stage resources "$PY" bench/kernel_resources.py --triton --arch "$arch" --json "$OUT/kernel_resources.json"
      ;;
    test)
      run_stage test "$PY" -m pytest -m gpu -q -x -p no:cacheprovider --junitxml="$OUT/test_gpu.xml" tests/
      ;;
    quick)
      run_stage quick "$PY" bench/kd_gpu.py --quick --out "$OUT/kd_gpu_quick.jsonl"
      ;;
    paths)
      run_stage paths "$PY" bench/kd_gpu.py --providers fastkd-cuda fastkd-triton --dtypes bf16 --ns 16384 \
        --vs 50257 128256 --divergences forward_kl jsd \
        --modes fwd fwd_nograd fwd_inplace_grad fwd_bwd fwd_bwd_scaled fwd_bwd_retained --out "$OUT/kd_gpu_paths.jsonl"
      ;;
    cache)
      run_stage cache "$PY" bench/cache.py --device cuda --n 16384 --v 128256 50257 --dtype bfloat16 --out "$OUT/cache.jsonl"
      ;;
    linear)
      run_stage linear "$PY" bench/linear.py --device cuda --out "$OUT/linear.jsonl"
      ;;
    bench)
      if [ -f bench/kd.py ]; then
        run_stage bench "$PY" bench/kd.py --device cuda --dtype bfloat16 float32 --n 4096 16384 --v 32000 128256 --out "$OUT/kd.jsonl"
      else
        echo "=== bench: bench/kd.py not present, skipped" | tee -a "$OUT/round.log"
      fi
      ;;
    full)
      run_stage full "$PY" bench/kd_gpu.py --out "$OUT/kd_gpu_full.jsonl"
      ;;
    *)
      echo "unknown stage $stage" >&2
      status=1
      ;;
  esac
done
exit $status
