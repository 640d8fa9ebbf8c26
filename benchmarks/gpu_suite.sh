#!/usr/bin/env bash
# Every GPU measurement behind benchmarks/RESULTS.md, in two parts of under 10 minutes each.
#
#   bash benchmarks/gpu_suite.sh A OUTDIR   # installs carried DALI/DeepSpeed wheels if present;
#                                           # end-to-end throughput (vits16; vitb8 through DeepSpeed ZeRO-2), DALI data
#   bash benchmarks/gpu_suite.sh B OUTDIR   # GPU tests, fused loss suite, EMA/clip, attention, ViT-B/8 memory
#   bash benchmarks/gpu_suite.sh C OUTDIR   # the per-session default (~8 min): the step's CUDA-graph and
#                                           # no-sync tests, GPU kernel tests, fused loss/head, DALI, vits16
#   bash benchmarks/gpu_suite.sh D OUTDIR   # DINOv2 (~6 min, the open measurements first): its GPU tests,
#                                           # Sinkhorn-Knopp and iBOT loss rows, dinov2_vits14 throughput
#   bash benchmarks/gpu_suite.sh E OUTDIR   # new kernels (~3-4 min, after D in the same session): the Gram
#                                           # kernel's and the DINOv3 backbone's GPU tests, the Gram loss table,
#                                           # the fused residual+LayerNorm op's tests and GB/s
#   bash benchmarks/gpu_suite.sh F OUTDIR   # the next session's default (~8 min, D and E ran on 2026-11-29):
#                                           # tests of what changed since (kernels, the CUDA-graph step),
#                                           # residual-norm GB/s, the loss (targets from the logits) and the
#                                           # fused head, Sinkhorn-Knopp, the fused photometric op, ViT-S/16 end
#                                           # to end with the backbone levers and with train.cuda_graphs
#   bash benchmarks/gpu_suite.sh G OUTDIR   # after F in the same session if time is left (~6 min): the fused
#                                           # bias + GELU op (2026-11-30): its GPU tests, GB/s, ViT-S/16 end to
#                                           # end with model.fused_bias_gelu on the reference and on fastdino;
#                                           # the Gram kernel's two grad kernels (dx recompute vs accumulate)
#   bash benchmarks/gpu_suite.sh H OUTDIR   # DALI (~4 min; needs the DALI wheel parts in .whl/p*, carried in
#                                           # earlier calls): its GPU tests, 2+10 crops at batch 128 with the
#                                           # host side in a thread vs in 8 worker processes (2026-11-30),
#                                           # each with the torch and the fused Triton photometric ops
#   bash benchmarks/gpu_suite.sh I OUTDIR   # FlashAttention-4 (~6 min; needs the wheel parts .whl/fa0, fa1):
#                                           # model.attn=flash_attn_4 against the reference and the other
#                                           # kernels (its JIT compiles count), attention at the ViT-S/16 and
#                                           # ViT-B/8 shapes, ViT-S/16 end to end with it
#
# Then, on this machine: python benchmarks/record.py OUTDIR (rows into benchmarks/results.jsonl), and
# benchmarks/RESULTS.md from them.
#
# Wheels (optional): .whl/p0..p4 hold the parts of a tar of DALI and its needs (too large for one
# transfer), .whl/ds DeepSpeed and its needs; they are installed into the running Python. The DALI parts
# (prepared 2026-11-30 for the device's Python 3.12: nvidia-dali-cuda130 2.4.0, nvimgcodec, nvjpeg, nvjpeg2k,
# nvtiff, libnvcomp, libcst, optree, nvtx, makefun, gast, astunparse; 60 MiB each) travel one per call, back
# to back so the machine stays warm (`run` command `true`, carry [".whl/p0"], then p1 ... p4), then the part
# that needs them. Remake them with: pip download --only-binary=:all: --python-version 3.12 --platform
# manylinux_2_28_x86_64 (and the other manylinux tags) nvidia-dali-cuda130==2.4.0 -d DIR; copy the wheels the
# image lacks into /tmp/dali; tar cf - -C /tmp dali | split -b 60m -d - part; one part per .whl/pN.
# .whl/fa0, fa1: the same for flash-attn-4[cu13]==4.0.0b36 (setup.py's fa4 extra: flash-attn-4, quack-kernels,
# apache-tvm-ffi, torch-c-dlpack-ext, nvidia-cutlass-dsl and its libs-base, libs-core, libs-cu13), in /tmp/fa4.
set -uo pipefail
part=${1:?usage: gpu_suite.sh A|B|C|D|E|F|G|H|I OUTDIR}
out=${2:?usage: gpu_suite.sh A|B|C|D|E|F|G|H|I OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRITON_DEFAULT_FP_FUSION=1
py=python3
step() {  # step NAME TIMEOUT CMD...: run, log to OUTDIR/NAME.log, never stop the suite
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date +%T))"
    printf '%s\t%s\n' "$name" "$*" >> "$out/commands.txt"  # benchmarks/record.py reads it
    if [ -n "${GPU_SUITE_DRY:-}" ]; then return; fi  # the CPU test: the commands only
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -40
    echo "=== $name rc=${PIPESTATUS[0]}"
}
install_wheels() {
    if ls .whl/p0/part00 >/dev/null 2>&1 && ! $py -c "import nvidia.dali" 2>/dev/null; then
        cat .whl/p*/part* | tar x -C /tmp && $py -m pip install -q --no-index --no-deps --no-compile /tmp/dali/*.whl
    fi
    if ls .whl/fa0/part00 >/dev/null 2>&1 && ! $py -c "import flash_attn.cute" 2>/dev/null; then
        cat .whl/fa*/part* | tar x -C /tmp && $py -m pip install -q --no-index --no-deps --no-compile /tmp/fa4/*.whl
    fi
    if ls .whl/ds/*.whl >/dev/null 2>&1 && ! $py -c "import deepspeed" 2>/dev/null; then
        $py -m pip install -q --no-index --no-deps --no-compile .whl/ds/*.whl
    fi
    $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    $py -c "import json, torch, triton; print(json.dumps({'device': torch.cuda.get_device_name(), 'torch': torch.__version__, 'triton': triton.__version__}))" > "$out/versions.json"
    $py -c "import nvidia.dali as d; print('dali', d.__version__)" || echo "dali: not importable"
    $py -c "import deepspeed as d; print('deepspeed', d.__version__)" 2>/dev/null | tail -1 || echo "deepspeed: not importable"
}

if [ -z "${GPU_SUITE_DRY:-}" ]; then  # GPU_SUITE_DRY=1: write OUTDIR/commands.txt, run nothing
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
    install_wheels
fi
if [ "$part" = A ]; then
    step throughput_vits16 230 $py benchmarks/throughput.py --config configs/vits16.json --data.local_crops_number 10 \
        --batch-size 256 --data both --steps 8 --warmup 4 --repeats 3 --time-budget 180 --json "$out/throughput_vits16.json"
    step throughput_vitb8 200 $py benchmarks/throughput.py --config configs/vitb8.json --batch-size 64 --data both \
        --steps 5 --warmup 3 --repeats 3 --time-budget 150 --json "$out/throughput_vitb8.json"
    step data 90 $py benchmarks/data.py --backend all --device cuda --batch-size 128 --steps 20 --json "$out/data.json"
elif [ "$part" = D ]; then  # DINOv2: nothing of it was measured on a GPU yet
    step pytest_dinov2 150 $py -m pytest -q -p no:cacheprovider tests/kernels/test_sinkhorn_knopp.py tests/test_ibot.py \
        tests/test_dinov2_step.py tests/test_dinov2_models.py tests/kernels/test_soft_cross_entropy.py -k "not aot"
    step loss_sk 60 $py benchmarks/loss.py --sk --B 32 64 --dtypes bf16 fp32 --json "$out/loss_sk.json"
    step loss_ibot 60 $py benchmarks/loss.py --ibot --B 32 64 --dtypes bf16 fp32 --json "$out/loss_ibot.json"
    step throughput_dinov2_vits14 150 $py benchmarks/throughput.py --config configs/dinov2_vits14.json \
        --batch-size 128 --data synthetic --rows reference,fastdino,+compile --steps 8 --warmup 4 --repeats 3 \
        --time-budget 130 --json "$out/throughput_dinov2_vits14.json"
elif [ "$part" = E ]; then  # DINOv3: the tiled Gram loss (never measured on a GPU yet), the RoPE backbone
    step pytest_gram 90 $py -m pytest -q -p no:cacheprovider tests/kernels/test_gram_loss.py tests/test_dinov3_models.py \
        tests/test_gram.py -k "not aot and not trains and not checkpoint"
    step gram 90 $py benchmarks/gram.py --results "$out/gram.jsonl"
    # the fused residual + drop path + LayerScale + LayerNorm op (backbone issue), not yet in the ViT
    step pytest_residual_norm 45 $py -m pytest -q -p no:cacheprovider tests/kernels/test_residual_layer_norm.py \
        -k "not aot and not benchmark"
    step residual_norm 40 $py benchmarks/residual_norm.py --results "$out/residual_norm.jsonl"
elif [ "$part" = F ]; then  # the open measurements after 2026-11-29 (~8 min): tests of what changed,
    # the pipelined residual-norm backward, the loss with targets made from the teacher logits (fused) vs q
    # stored (fused_q), the cancellation-free fused head, Sinkhorn-Knopp at iBOT size and without its q
    # (sk_stats), the fused photometric op, the backbone levers end to end (the fused residual chain, the
    # bf16 residual stream), CUDA graphs
    step pytest_changed 110 $py -m pytest -q -p no:cacheprovider tests/kernels/test_residual_layer_norm.py \
        tests/kernels/test_soft_cross_entropy.py tests/kernels/test_linear_soft_cross_entropy.py \
        tests/kernels/test_softmax_center.py tests/kernels/test_sinkhorn_knopp.py tests/kernels/test_photometric.py \
        tests/kernels/test_gram_loss.py tests/test_ibot.py tests/test_dinov2_models.py tests/test_attention.py \
        tests/test_models.py tests/test_step.py -k "not aot and not compiled_arithmetic"
    step residual_norm 35 $py benchmarks/residual_norm.py --results "$out/residual_norm.jsonl"
    step loss 55 $py benchmarks/loss.py --B 64 --crops 2+10 --dtypes bf16 fp32 --json "$out/loss.json"
    step loss_head 35 $py benchmarks/loss.py --head --B 64 --crops 2+10 --dtypes bf16 --json "$out/loss_head.json"
    step loss_sk 35 $py benchmarks/loss.py --sk --B 64 2048 --dtypes bf16 --json "$out/loss_sk.json"
    step gram_tf32 40 $py benchmarks/gram.py --dtypes fp32 --tf32 --results "$out/gram_tf32.jsonl"
    step photometric 30 $py benchmarks/photometric.py --results "$out/photometric.jsonl"
    step throughput_vits16 140 $py benchmarks/throughput.py --config configs/vits16.json --data.local_crops_number 10 \
        --batch-size 256 --data synthetic --rows reference,fastdino,+residual_norm,+bf16_residual \
        --steps 8 --warmup 4 --repeats 3 --time-budget 120 --json "$out/throughput_vits16.json"
    # the same config's fastdino row with the whole step replayed from a CUDA graph (train.cuda_graphs)
    step throughput_vits16_graphs 65 $py benchmarks/throughput.py --config configs/vits16.json \
        --data.local_crops_number 10 --train.cuda_graphs true --batch-size 256 --data synthetic --rows fastdino \
        --steps 8 --warmup 4 --repeats 3 --time-budget 50 --json "$out/throughput_vits16_graphs.json"
elif [ "$part" = G ]; then  # the fused bias + GELU op (kernels/bias_gelu.py, model.fused_bias_gelu)
    step pytest_bias_gelu 75 $py -m pytest -q -p no:cacheprovider tests/kernels/test_bias_gelu.py tests/test_models.py \
        tests/kernels/test_gram_loss.py -k "(bias_gelu or deterministic or dx_modes or real_size or cuda_graph) and not aot"
    step bias_gelu 30 $py benchmarks/bias_gelu.py --results "$out/bias_gelu.jsonl"
    # the Gram grad kernel without the per-D-chunk recomputation (dx=accumulate) against the default
    step gram_dx_bf16 45 $py benchmarks/gram.py --dtypes bf16 --dx recompute accumulate --results "$out/gram_dx_bf16.jsonl"
    step gram_dx_tf32 45 $py benchmarks/gram.py --dtypes fp32 --tf32 --dx recompute accumulate \
        --results "$out/gram_dx_tf32.jsonl"
    step throughput_vits16_bias_gelu 90 $py benchmarks/throughput.py --config configs/vits16.json \
        --data.local_crops_number 10 --batch-size 256 --data synthetic --rows reference,+bias_gelu \
        --steps 8 --warmup 4 --repeats 3 --time-budget 75 --json "$out/throughput_vits16_bias_gelu.json"
    # the config's fastdino row with it (compare with F's fastdino row of the same session)
    step throughput_vits16_fastdino_bias_gelu 65 $py benchmarks/throughput.py --config configs/vits16.json \
        --data.local_crops_number 10 --model.fused_bias_gelu true --batch-size 256 --data synthetic --rows fastdino \
        --steps 8 --warmup 4 --repeats 3 --time-budget 50 --json "$out/throughput_vits16_fastdino_bias_gelu.json"
elif [ "$part" = H ]; then  # DALI: the host side in worker processes (data.num_workers) against a thread
    if [ -z "${GPU_SUITE_DRY:-}" ] && ! $py -c "import nvidia.dali" 2>/dev/null; then
        echo "H: nvidia.dali is not importable (carry the wheel parts in .whl/p0..p3 first): skipped"
    else
        step pytest_dali 90 $py -m pytest -q -p no:cacheprovider tests/test_dali.py
        step data_host_workers 240 $py benchmarks/data.py --backend dali --device cuda --batch-size 128 --steps 20 \
            --locals 10 --workers 8 --host-workers 0,8 --photometric both --json "$out/data_host_workers.json"
    fi
elif [ "$part" = I ]; then  # FlashAttention-4: model.attn=flash_attn_4 (fastdino/models/attention.py)
    if [ -z "${GPU_SUITE_DRY:-}" ] && ! $py -c "from flash_attn.cute import flash_attn_varlen_func" 2>/dev/null; then
        echo "I: flash-attn-4 is not importable (carry the wheel parts .whl/fa0, .whl/fa1 first): skipped"
    else
        # the kernels against the fp64 reference and torch's math kernel (dense and varlen, grads), the ViT
        # packed and unpacked, no attention matrix saved; bf16 only (each shape is a JIT compile)
        step pytest_fa4 240 $py -m pytest -q -p no:cacheprovider tests/test_attention.py \
            -k "flash_attn_4 and not float16 and not float32"
        step attention_fa4 120 $py benchmarks/attention.py --modes matmul,attn --archs S/16,B/8 \
            --backends flash_attn_4,flash_attn,sdpa_cudnn,sdpa_flash --json "$out/attention_fa4.json"
        step throughput_vits16_fa4 100 $py benchmarks/throughput.py --config configs/vits16.json \
            --data.local_crops_number 10 --model.attn flash_attn_4 --batch-size 256 --data synthetic \
            --rows reference,fastdino --steps 8 --warmup 4 --repeats 3 --time-budget 75 \
            --json "$out/throughput_vits16_fa4.json"
    fi
elif [ "$part" = C ]; then  # re-measure what changed after the first A/B runs (fits one 10-minute call)
    step pytest_step 120 $py -m pytest -q -p no:cacheprovider tests/test_step.py -k "cuda or synchronization"
    step pytest_gpu 80 $py -m pytest -q -p no:cacheprovider tests/kernels/test_linear_soft_cross_entropy.py \
        tests/kernels/test_soft_cross_entropy.py tests/kernels/test_softmax_center.py tests/kernels/test_ema.py
    step loss 50 $py benchmarks/loss.py --B 64 --crops 2+10 --dtypes bf16 fp32 --json "$out/loss.json"
    step loss_head 50 $py benchmarks/loss.py --head --B 64 --crops 2+10 --dtypes bf16 fp32 --json "$out/loss_head.json"
    step data 60 $py benchmarks/data.py --backend dali --device cuda --batch-size 128 --steps 20 --locals 10 \
        --json "$out/data.json"
    step throughput_vits16 130 $py benchmarks/throughput.py --config configs/vits16.json --data.local_crops_number 10 \
        --batch-size 256 --data synthetic --rows reference,fastdino,+compile --steps 8 --warmup 4 --repeats 3 \
        --time-budget 120 --json "$out/throughput_vits16.json"
else
    step pytest_gpu 170 $py -m pytest -q -x -p no:cacheprovider tests/kernels tests/test_loss_dropin.py \
        tests/test_attention.py tests/test_models.py tests/test_dali.py tests/test_step.py
    step loss_suite 200 $py benchmarks/loss.py --suite --sweep-dtypes bf16 --json "$out/loss_suite.json"
    step ema 70 $py benchmarks/ema.py --models vits16,vitb8 --no-sweep --json "$out/ema.json"
    step attention 80 $py benchmarks/attention.py --modes matmul,attn --json "$out/attention.json"
    step step_memory 90 $py benchmarks/attention.py --modes step --json "$out/step_memory.json"
fi
echo "=== done ($(date +%T))"
