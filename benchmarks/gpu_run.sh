#!/usr/bin/env bash
# GPU tests and benchmarks, a section or two per device call (a device call runs 600 s at most):
#   bash benchmarks/gpu_run.sh [SECTION ...]
#   sections: kernel_tests tests demo mlp gemm offload counters autotune
#             contract_tests fp8_tests fp8_gemm fp8_mlp fp8_parts autotune_check
# Logs and JSON go to $OUT (the device tool's output folder) or ./gpu_run_out.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-gpu_run_out}; mkdir -p "$out"
sections=${*:-kernel_tests tests demo mlp offload}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__)"
run() {  # run NAME SECONDS COMMAND...: one section under a time limit, logged
  local name=$1 limit=$2; shift 2
  echo "== $name"; local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1; echo "rc=$? in $((SECONDS - t0)) s"
  tail -n 12 "$out/$name.log"
}
for s in $sections; do case $s in
  # All GPU tests together take longer than one device call: the kernels' file (~315 s on an
  # H100) and the rest (~400-440 s) are two sections.
  kernel_tests) run gpu_kernel_tests 590 python -m pytest -m gpu tests/test_mgpu_kernels_gpu.py \
    -q -x -p no:cacheprovider -rfE --durations=10 ;;
  tests) run gpu_tests 590 python -m pytest -m gpu tests -q -x -p no:cacheprovider -rfE \
    --durations=10 --ignore=tests/test_mgpu_kernels_gpu.py ;;
  demo)
    run demo_device 150 python -m jaxmoe.demo --preset gpu --steps 30 --offload-names none
    run demo_offload 150 python -m jaxmoe.demo --preset gpu --steps 30 --hlo-out "$out/demo_offload.hlo"
    run demo_offload_nnx_scan 150 python -m jaxmoe.demo --preset gpu --steps 30 --nnx-scan
    run demo_moe_input 150 python -m jaxmoe.demo --preset gpu --steps 30 \
      --offload-names moe_input --recompute-names fc1_input ;;
  mlp) run grouped_mlp 330 python benchmarks/grouped_mlp.py --out "$out/grouped_mlp.json" ;;  # ~250 s
  counters) run hw_counters 300 python benchmarks/hw_counters.py --shapes 0,2,3,4,5 \
    --out "$out/hw_counters.json" ;;  # Nsight Compute counters (needs ncu)
  gemm) run grouped_gemm 560 python benchmarks/grouped_gemm.py --out "$out/grouped_gemm.json" \
    --log "$out/gemm.log" ;;  # ~330 s
  offload)
    # nnx.scan against jaxmoe.layer_scan (BENCHMARKS.md "Pipelined layer scan"), ~6 minutes.
    run offload 420 python benchmarks/offload.py --steps 5 --both-scans --out "$out/offload.json" \
      --shape compute_bound --shape link_bound --placement device --placement offload_default \
      --placement offload_unpermuted ;;
  autotune)
    # Block configs for this card; copy the cache into pallas_kernels/tuned_configs/ to ship it.
    run autotune 590 python -m pallas_kernels.autotune --budget-s 480 --skip-cached \
      --out "$out/tuned_configs.json" --report "$out/autotune_report.json" ;;
  contract_tests) run gpu_contract_tests 300 python -m pytest -m gpu tests/test_input_contract.py \
    -q -x -p no:cacheprovider -rfE --durations=5 ;;
  fp8_tests) run gpu_fp8_tests 400 python -m pytest -m gpu tests/test_fp8_kernels.py tests/test_tgmm_fp8.py \
    -q -x -p no:cacheprovider -rfE --durations=5 ;;
  fp8_gemm) run grouped_gemm_fp8 560 python benchmarks/grouped_gemm.py --fp8 --anchors dense \
    --no-torch --out "$out/grouped_gemm_fp8.json" --log "$out/gemm_fp8.log" ;;
  fp8_mlp)  # ~130 s a shape
    run fp8_mlp_g8 200 python benchmarks/fp8_mlp_check.py --out "$out/fp8_mlp_g8.json"
    run fp8_mlp_g64 200 python benchmarks/fp8_mlp_check.py --hidden 4096 --ffn 1024 \
      --experts 64 --out "$out/fp8_mlp_g64.json" ;;
  fp8_parts) run fp8_parts 200 python benchmarks/fp8_parts.py --out "$out/fp8_parts.json" ;;
  autotune_check)
    # The default config against the sweep's best at token counts nobody tuned.
    run autotune_check 560 python -m pallas_kernels.autotune --check --tokens 1536,6144 \
      --models "${AUTOTUNE_MODELS:-mixtral-8x7b,deepseek-v3,qwen3-30b-a3b,olmoe-1b-7b}" \
      --budget-s "${AUTOTUNE_BUDGET_S:-480}" --report "$out/autotune_check.json" ;;
  *) echo "unknown section $s" ;;
esac; done
