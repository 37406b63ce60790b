#!/usr/bin/env bash
# The checks that need a CUDA device, phase by phase, each under its own time limit, so one slow phase
# cannot take the others' figures with it. Logs go to LOGS (default runs/gpu), one file per phase.
#
#   bash bench/gpu_checks.sh [tests] [data] [coco] [train] [profile] [batches] [convergence] [job] [eval] [suite]
#
#   tests        the CUDA tests (graphed steps against eager ones, pinned buffers, side-stream copy, CPU/CUDA equality, nvJPEG, losses equal torchvision's
#                on the batched heads' path, bench.syncs against torch.cuda.set_sync_debug_mode, pinned checkpoint
#                snapshots, masks pasted as torchvision pastes them)
#   data         the data benchmark, the Loader on CUDA and the host-to-device copy included
#   coco         the COCO photos benchmark (COCO_IMAGES of them), the Loader on CUDA decoding JPEGs by nvJPEG included
#   train        the training benchmark at the tutorial's sizes (800/1333), Mask R-CNN and Faster R-CNN: the seed,
#                lean's CUDA default, lean with torchvision's per-image heads, and lean without or with each of its
#                CUDA settings (TRAIN_ARGS adds flags: --inductor times inductor too)
#   profile      where lean's step spends its time at 800/1333, by operator, how often the host waits and where
#   batches      lean's step at 800/1333 with 2, 4, 8, 16 images (BATCH_SIZES): images/s, peak memory, GPU busy share,
#                host syncs a step by set_sync_debug_mode and by bench.syncs
#   convergence  the convergence command in fp32 eager and with lean's fastest CUDA settings (bf16, canvases,
#                fused SGD, CUDA graphs)
#   job          the tutorial's whole job, 10 epochs on Penn-Fudan at 800/1333 with evaluation after each: lean's
#                cache build and lean.train (its defaults, then with 2 canvas levels a side, then also with the
#                backbone and RPN head replayed as CUDA graphs per canvas: --compile graphs), then the tutorial's
#                script (bench.seed_job), each process timed whole
#   eval         the 50 test images on the device, predicting included: the tutorial's evaluation and lean.evaluate
#   suite        the whole test suite
#
# PENNFUDAN (default data/PennFudanPed) is the dataset folder; PYTHON (default python3) the interpreter; RUNS
# (default LOGS) holds the training runs' folders and the cache builds' logs.
set -u
root=${PENNFUDAN:-data/PennFudanPed}
logs=${LOGS:-runs/gpu}
runs=${RUNS:-$logs}
python=${PYTHON:-python3}
mkdir -p "$logs" "$runs"
export PYTHONUNBUFFERED=1

phase() {  # phase NAME SECONDS COMMAND...: run under a limit, log to LOGS/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$logs/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s (limit $limit s)"
    tail -n "${TAIL:-15}" "$logs/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$python -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"

convergence=(--cache cache/synthetic.h5 --backbone resnet18_fpn --weights none --min-size 128 --max-size 224
             --batch-size 4 --optimizer adamw --lr 1e-3 --epochs 24 --lr-step-epochs 17 --eval-every 8 --device cuda)
cache=cache/gpu_pennfudan.h5  # the profiling phases' one cache, built when first needed
case " $* " in *" profile "*|*" batches "*|*" job "*|*" eval "*)
    [ -f "$cache" ] || TAIL=2 phase build_pennfudan 120 $python -m lean.cache build --root "$root" --out "$cache" ;;
esac
for what in "$@"; do
    case $what in
    tests) phase tests "${TESTS_LIMIT:-150}" $python -m pytest -q -p no:cacheprovider tests/test_loader.py tests/test_model.py \
               tests/test_heads.py tests/test_syncs.py tests/test_background.py tests/test_paste.py \
               tests/test_graphs.py -k "cuda or gpu or graphed" ;;
    data) phase data 150 $python -m bench.throughput --root "$root" --sections data --repeats 3 --json "$logs/data.json" ;;
    coco) phase coco "${COCO_LIMIT:-150}" $python -m bench.throughput --sections coco --coco-images "${COCO_IMAGES:-100}" \
              --repeats 3 --json "$logs/coco.json" ;;
    train) phase train "${TRAIN_LIMIT:-300}" $python -m bench.throughput --root "$root" --sections train \
               --min-size 800 --max-size 1333 --train-steps 20 --train-warmup 10 --json "$logs/train.json" --no-inductor ${TRAIN_ARGS:-} ;;
    profile) TAIL=70 phase profile "${PROFILE_LIMIT:-120}" $python -m bench.profile_step --cache "$cache" --rows 30 ${PROFILE_ARGS:-} ;;
    batches) TAIL=60 phase batches "${BATCHES_LIMIT:-180}" $python -m bench.profile_step --cache "$cache" --rows 0 --sites 8 --warmup 5 \
                 --steps 8 --count-syncs --batch-size ${BATCH_SIZES:-2 4 8 16} ${PROFILE_ARGS:-} ;;
    convergence)
        [ -f cache/synthetic.h5 ] || $python -m lean.cache build --source synthetic --num-images 200 --seed 0 >"$runs/build_synthetic.log" 2>&1
        # Both on the GPU at once: the figures compared are the two runs' AP, not their times.
        TAIL=8 phase convergence_fp32_eager "${CONVERGENCE_LIMIT:-420}" $python -m lean.train "${convergence[@]}" \
            --amp off --no-compile --out "$runs/fp32_eager" &
        TAIL=8 phase convergence_fastest "${CONVERGENCE_LIMIT:-420}" $python -m lean.train "${convergence[@]}" \
            --compile cudagraphs --out "$runs/fastest" &
        wait ;;
    job) TAIL=6 phase job_lean "${JOB_LIMIT:-300}" $python -m lean.train --cache "$cache" --weights none --device cuda \
             --out "$runs/job"
         TAIL=6 phase job_lean_2_levels "${JOB_LIMIT:-300}" $python -m lean.train --cache "$cache" --weights none \
             --device cuda --canvas-levels 2 --out "$runs/job_2_levels"
         TAIL=6 phase job_lean_graphs "${JOB_LIMIT:-300}" $python -m lean.train --cache "$cache" --weights none \
             --device cuda --canvas-levels 2 --compile graphs --out "$runs/job_graphs"
         TAIL=4 phase job_seed "${JOB_LIMIT:-300}" $python -m bench.seed_job --root "$root" --device cuda ;;
    eval) phase eval "${EVAL_LIMIT:-150}" $python -m bench.throughput --root "$root" --sections eval --repeats 2 \
              --json "$logs/eval.json" ;;
    suite) phase suite "${SUITE_LIMIT:-300}" $python -m pytest -q -p no:cacheprovider -x tests ;;
    *) echo "unknown phase: $what (tests, data, coco, train, profile, batches, convergence, job, eval, suite)"; exit 2 ;;
    esac
done
