#!/usr/bin/env bash
# The one prepared GPU job (a lent H100/H200 through the `device` tool: its own torch and triton, nothing
# installable, ~8 minutes of a 15-minute budget). From the repository root:
#
#     bash benchmarks/gpu_check.sh            # everything it writes goes to $OUT (default ./gpu_out)
#
# 1. build fastjac._C for sm_90 with the CUDA kernels (the toolkit found as setup.py finds it: no CUDA_HOME);
# 2. the GPU tests: CUDA kernels against the reference, the C++ chain and the one-pass frozen backward on CUDA
#    tensors, kernel launch counts, opcheck;
# 3. the GPU reports: gpu_report (op fwd+bwd+dbwd and the VGG-9-BN step, float32 and bfloat16, vs PyTorch),
#    gpu_profile (wall / host-issue / kernel time and launch counts), the per-call cost on CUDA, and the trainer's
#    own step (VGG-9-BN batch 128, float32 / bfloat16, with and without a host read per step).
# Every step has its own time limit, its output in $OUT/<step>.txt and its duration and exit status in
# $OUT/gpu_check.log; a failed step does not stop the later ones. Record device, command and numbers in
# benchmarks/RESULTS.md; never write a GPU figure that is not in these files.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
NJOBS=$(nproc)

log() { echo "[$(date +%T)] $*" | tee -a "$OUT/gpu_check.log"; }
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  log "start $name (limit ${limit} s): $*"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  log "end $name: exit $? after $((SECONDS - start)) s"
}

log "gpu_check on $(hostname), $(nproc) cores"
step machine 60 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name())'"

export FASTJAC_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$NJOBS
# The system compilers, as in session 9: that machine's default gcc (/opt/gcc/bin/gcc, also nvcc's host compiler)
# linked libstdc++ statically into _C.so, and every extension error whose message prints an integer then crashed
# the process (benchmarks/RESULTS.md, "First GPU measurements"). torch passes CC to nvcc as -ccbin.
if [ -z "${CC:-}" ] && [ -x /usr/bin/gcc ] && [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
log "compilers: CC=${CC:-default} CXX=${CXX:-default}"
step build 240 $PY setup.py build_ext --inplace
# libstdc++ must be a shared dependency (see above); the build's JSON names the toolkit and architectures.
step backends 60 bash -c "ldd fastjac/_C*.so | grep -E 'libstdc|libc10|libtorch_cuda'; $PY -c \"import fastjac, json; print(fastjac.backends()); print(json.dumps(fastjac._backend.build_info()))\""

XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n $((NJOBS > 14 ? 14 : NJOBS))"
# -k: not the CPU emulation of the CUDA kernels (tests/_cuda_emulation.py), which the real ones replace here.
step tests 180 $PY -m pytest -q $XDIST -k "not emulat" tests/test_cuda_backend.py tests/test_cuda_launches.py tests/test_cpp_chain.py \
  tests/test_frozen_backward.py tests/test_training_one_pass.py tests/test_kernels.py tests/test_kernel_opcheck.py \
  tests/test_ops_parity.py tests/test_nn_convert.py tests/test_torch_func.py tests/test_pytorch_samples.py tests/test_conv.py

step gpu_report 150 $PY -m benchmarks.gpu_report --out "$OUT/gpu_report.md"
step gpu_profile 120 $PY -m benchmarks.gpu_profile
step call_overhead_cuda 60 $PY -c "from benchmarks import call_overhead as c; print(c.markdown(c.measure(5, 'cuda')))"
# The trainer's own step, VGG-9-BN batch 128 (issue 17): float32 and bfloat16, without and with a host read per step.
for prec in float32 bfloat16; do
  for sync in "" --sync; do
    step "trainer_step_${prec}${sync:+_sync}" 90 $PY -m benchmarks.trainer_step --device cuda --models vgg9 \
      --batch-size 128 --repeats 3 --block 5 --precision "$prec" $sync
  done
done
log "done"
