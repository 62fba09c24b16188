#!/usr/bin/env bash
# Re-create every log and picture that README.md and docs/ show, from real runs of the committed
# code, then regenerate docs/flags.md, docs/performance.md and the README's results table:
#
#   bash tools/reproduce_readme.sh [MVTEC_ROOT]      (default ../shared/data/mvtec, needs bottle/)
#
# Run it on a quiet machine: the benchmarks time wall-clock. Optional parts, by environment:
#   ANOMALIB_PYTHON=/path/to/python   a Python with torch, anomalib, onnxscript, openvino and
#                                     onnxruntime: the comparison with anomalib (see the docstring
#                                     of tools/compare_anomalib.py)
#   BASELINE=<git revision>           train.py's fit timed in alternation against that revision
#   PYTHON=python3.11                 the Python with this project's requirements
# Every log starts with the command that wrote it ("# <command>"); a log this script rewrites is
# removed from logs/stale.txt. Models and other outputs go to output/readme (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/mvtec}
OUT=output/readme
PY=${PYTHON:-python}
mkdir -p logs asserts "$OUT"

fresh() {   # fresh PATH...: the logs were just rewritten by the current code
    local path
    for path in "$@"; do
        if [ -f logs/stale.txt ]; then
            awk -v path="$path" '$1 != path' logs/stale.txt > logs/stale.txt.new
            mv logs/stale.txt.new logs/stale.txt
        fi
    done
}

logged() {   # logged LOG COMMAND...: COMMAND's output (stdout and stderr) in LOG, after a "# COMMAND" line
    local log=$1
    shift
    { echo "# $*"; "$@"; } > "$log" 2>&1
    fresh "$log"
}

logged_copy() {   # logged_copy LOG FILE COMMAND...: run COMMAND, then LOG = "# COMMAND" + the FILE it wrote
    local log=$1 file=$2
    shift 2
    "$@"
    { echo "# $*"; cat "$file"; } > "$log"
    fresh "$log"
}

# 1. Quick start on the synthetic demo category (offline ImageNet MobileNetV2).
rm -rf "$OUT/demo"
logged_copy logs/demo_mobilenet_v2_train.log "$OUT/demo/train.log" \
    $PY train.py --backbone mobilenet_v2 --save_path "$OUT" --save_picture False
logged logs/demo_mobilenet_v2_predict.log $PY predict.py --save_path "$OUT" --save_picture False

# 2. Real data: bottle with the ImageNet MobileNetV2 (the one real backbone available offline).
MODEL="$OUT/mobilenet_v2/bottle/best.pdparams"
rm -rf "$OUT/mobilenet_v2"
logged_copy logs/bottle_mobilenet_v2_train.log "$OUT/mobilenet_v2/bottle/train.log" \
    $PY train.py --data_path "$DATA" --category bottle --backbone mobilenet_v2 --save_path "$OUT/mobilenet_v2" \
    --save_picture True
cp "$OUT/mobilenet_v2/bottle/metrics.json" logs/bottle_mobilenet_v2_metrics.json
fresh logs/bottle_mobilenet_v2_metrics.json
# The val figure of a defective bottle: broken_large/000.png is test image 0.
cp "$OUT/mobilenet_v2/bottle/bottle_0.png" asserts/bottle_val.png
cp "$OUT/mobilenet_v2/bottle/roc_curve.png" asserts/bottle_roc_curve.png
# Single pictures: a .png --save_path is the picture's own name; predictions.csv lands beside it.
$PY predict.py --model_path "$MODEL" --picture_path "$DATA/bottle/test/good/000.png" \
    --save_path asserts/bottle_predict_good.png
$PY predict.py --model_path "$MODEL" --picture_path "$DATA/bottle/test/broken_small/000.png" \
    --save_path asserts/bottle_predict_broken_small.png
rm -f asserts/predictions.csv

# Deployment: export the bottle model, compare the runtimes with the dynamic model, run infer.py.
$PY export_model.py --model_path "$MODEL" --save_dir "$OUT/mobilenet_v2/export" --onnx True
logged logs/bottle_mobilenet_v2_parity.log $PY -m tools.check_parity --model_path "$MODEL" \
    --export_dir "$OUT/mobilenet_v2/export" --data_path "$DATA" --category bottle
logged logs/bottle_mobilenet_v2_infer.log $PY infer.py --model_file "$OUT/mobilenet_v2/export/model.json" \
    --use_gpu False --enable_mkldnn True --input_file "$DATA/bottle/test/broken_small/000.png" \
    --save_path asserts/bottle_infer_broken_small.png --category bottle
rm -f asserts/predictions.csv
logged logs/bottle_mobilenet_v2_infer_test_folder.log $PY infer.py --model_file "$OUT/mobilenet_v2/export/model.json" \
    --use_gpu False --enable_mkldnn True --input_file "$DATA/bottle/test" --batch_size 8 --save_picture False \
    --save_path "$OUT/mobilenet_v2/infer" --category bottle --enable_benchmark True

# Scale out: 2 processes under paddle.distributed.launch against 1, on bottle.
logged logs/distributed_bottle_mobilenet_v2.log $PY -m tools.compare_distributed --data_path "$DATA" \
    --category bottle --backbone mobilenet_v2 --out "$OUT/distributed"

# 3. Lower bound: the faithful ResNet18 configuration with random weights (no ImageNet ResNet offline).
rm -rf "$OUT/resnet18_random"
logged_copy logs/bottle_resnet18_random_train.log "$OUT/resnet18_random/bottle/train.log" \
    $PY train.py --data_path "$DATA" --category bottle --backbone resnet18 --pretrained_backbone random \
    --save_path "$OUT/resnet18_random" --save_picture False
cp "$OUT/resnet18_random/bottle/metrics.json" logs/bottle_resnet18_random_metrics.json
fresh logs/bottle_resnet18_random_metrics.json

# 4. WR50-Rd550 memory and time (random weights: memory and time do not depend on them).
WR50="$OUT/wide_resnet50_2_random"
WR50_FIT=($PY train.py --data_path "$DATA" --category bottle --backbone wide_resnet50_2 --pretrained_backbone random
          --save_path "$WR50" --save_picture False)
rm -rf "$WR50"
logged logs/bottle_wide_resnet50_2_random_time.log /usr/bin/time -v "${WR50_FIT[@]}"
echo "model file: $(stat -c %s "$WR50/bottle/best.pdparams") bytes" >> logs/bottle_wide_resnet50_2_random_time.log
{ echo "# ${WR50_FIT[*]}"; cat "$WR50/bottle/train.log"; } > logs/bottle_wide_resnet50_2_random_train.log
fresh logs/bottle_wide_resnet50_2_random_train.log
rm -rf "$WR50"   # a few GB

# 5. The TIPC lite chain; its AutoLog reports are tabled in docs/performance.md.
bash test_tipc/prepare.sh test_tipc/configs/PaDiM/train_infer_python.txt lite_train_lite_infer
bash test_tipc/test_train_inference_python.sh test_tipc/configs/PaDiM/train_infer_python.txt lite_train_lite_infer
rm -rf logs/tipc_lite
mkdir -p logs/tipc_lite
cp test_tipc/output/PaDiM/results_python.log test_tipc/output/PaDiM/python_infer_*.log logs/tipc_lite/
fresh logs/tipc_lite

# 6. Benchmarks (ResNet18 and MobileNetV2 with random weights: speed does not depend on them).
logged logs/benchmark_demo_resnet18.log $PY -m tools.benchmark --json logs/benchmark_demo_resnet18.json
fresh logs/benchmark_demo_resnet18.json
logged logs/benchmark_demo_mobilenet_v2.log $PY -m tools.benchmark --backbone mobilenet_v2 \
    --json logs/benchmark_demo_mobilenet_v2.json
fresh logs/benchmark_demo_mobilenet_v2.json
logged logs/benchmark_bottle_resnet18.log $PY -m tools.benchmark --data_path "$DATA" --category bottle \
    --json logs/benchmark_bottle_resnet18.json
fresh logs/benchmark_bottle_resnet18.json
# train.py's fit with the malloc thresholds that utils/memory.py sets for inference (why train.py keeps glibc's)
logged logs/benchmark_demo_resnet18_fit_malloc_kept.log env MALLOC_MMAP_THRESHOLD_=268435456 \
    MALLOC_TRIM_THRESHOLD_=536870912 $PY -m tools.benchmark --skip gemm,gaussian,eager,static \
    --json logs/benchmark_demo_resnet18_fit_malloc_kept.json
fresh logs/benchmark_demo_resnet18_fit_malloc_kept.json

# 7. Optional: beside anomalib, on the same images (our model: ResNet18 with random weights, as theirs).
if [ -n "${ANOMALIB_PYTHON:-}" ]; then
    rm -rf "$OUT/anomalib_ours"
    $PY train.py --data_path "$DATA" --category bottle --backbone resnet18 --pretrained_backbone random \
        --val False --save_path "$OUT/anomalib_ours"
    $PY export_model.py --model_path "$OUT/anomalib_ours/bottle/best.pdparams" --save_dir "$OUT/anomalib_ours/export"
    # Its log starts with its own command line.
    "$ANOMALIB_PYTHON" -m tools.compare_anomalib --data_path "$DATA" --category bottle \
        --ours_model "$OUT/anomalib_ours/export" --ours_python "$($PY -c 'import sys; print(sys.executable)')" \
        --json logs/anomalib_bottle_resnet18.json --log logs/anomalib_bottle_resnet18.log
    fresh logs/anomalib_bottle_resnet18.log logs/anomalib_bottle_resnet18.json
fi

# 8. Optional: the speed floor of the fit, alternated against a baseline revision.
if [ -n "${BASELINE:-}" ]; then
    $PY -m tools.alternate_fit --old "$BASELINE" --data_path "$DATA" --category bottle --rounds 3 \
        > logs/fit_alternation_bottle_resnet18.log
    fresh logs/fit_alternation_bottle_resnet18.log
fi

# 9. The generated pages.
$PY -m tools.flag_tables
$PY -m tools.performance_doc
