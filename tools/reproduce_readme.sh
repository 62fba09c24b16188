#!/usr/bin/env bash
# Re-create every number and picture the README shows from real runs of the committed code:
#   bash tools/reproduce_readme.sh [MVTEC_ROOT]      (default ../shared/data/mvtec, needs bottle/)
# Writes logs/*.log and asserts/*.png; the model files go to output/readme (not committed).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/mvtec}
OUT=output/readme
mkdir -p logs asserts "$OUT"
PY=${PYTHON:-python}

# 1. Quick start on the synthetic demo category (offline ImageNet MobileNetV2).
rm -rf "$OUT/demo"
$PY train.py --backbone mobilenet_v2 --save_path "$OUT" --save_picture False
cp "$OUT/demo/train.log" logs/demo_mobilenet_v2_train.log
$PY predict.py --save_path "$OUT" --save_picture False > logs/demo_mobilenet_v2_predict.log

# 2. Real data: bottle with the ImageNet MobileNetV2 (the one real backbone available offline).
rm -rf "$OUT/mobilenet_v2/bottle"
$PY train.py --data_path "$DATA" --category bottle --backbone mobilenet_v2 --save_path "$OUT/mobilenet_v2" \
    --save_picture True
cp "$OUT/mobilenet_v2/bottle/train.log" logs/bottle_mobilenet_v2_train.log
cp "$OUT/mobilenet_v2/bottle/metrics.json" logs/bottle_mobilenet_v2_metrics.json
# The val figure of a defective bottle: broken_large/000.png is test image 0.
cp "$OUT/mobilenet_v2/bottle/bottle_0.png" asserts/bottle_val.png
cp "$OUT/mobilenet_v2/bottle/roc_curve.png" asserts/bottle_roc_curve.png
$PY predict.py --model_path "$OUT/mobilenet_v2/bottle/best.pdparams" \
    --picture_path "$DATA/bottle/test/good/000.png" --save_path asserts/bottle_predict_good.png
$PY predict.py --model_path "$OUT/mobilenet_v2/bottle/best.pdparams" \
    --picture_path "$DATA/bottle/test/broken_small/000.png" --save_path asserts/bottle_predict_broken_small.png

# Deployment: export the bottle model and run the static graph (oneDNN) on the same defective image.
$PY export_model.py --model_path "$OUT/mobilenet_v2/bottle/best.pdparams" --save_dir "$OUT/mobilenet_v2/export" \
    --onnx True
$PY -m tools.check_parity --model_path "$OUT/mobilenet_v2/bottle/best.pdparams" --export_dir "$OUT/mobilenet_v2/export" \
    --data_path "$DATA" --category bottle > logs/bottle_mobilenet_v2_parity.log
$PY infer.py --model_file "$OUT/mobilenet_v2/export/model.json" --use_gpu False --enable_mkldnn True \
    --input_file "$DATA/bottle/test/broken_small/000.png" --save_path "$OUT/mobilenet_v2/infer" --category bottle \
    > logs/bottle_mobilenet_v2_infer.log 2>&1
cp "$OUT/mobilenet_v2/infer/bottle/infer/000.png" asserts/bottle_infer_broken_small.png
$PY infer.py --model_file "$OUT/mobilenet_v2/export/model.json" --use_gpu False --enable_mkldnn True \
    --input_file "$DATA/bottle/test" --batch_size 8 --save_picture False --save_path "$OUT/mobilenet_v2/infer" \
    --category bottle --enable_benchmark True > logs/bottle_mobilenet_v2_infer_test_folder.log 2>&1

# 3. Lower bound: the faithful ResNet18 configuration with random weights (no ImageNet ResNet offline).
rm -rf "$OUT/resnet18_random/bottle"
$PY train.py --data_path "$DATA" --category bottle --backbone resnet18 --pretrained_backbone random \
    --save_path "$OUT/resnet18_random" --save_picture False
cp "$OUT/resnet18_random/bottle/train.log" logs/bottle_resnet18_random_train.log
cp "$OUT/resnet18_random/bottle/metrics.json" logs/bottle_resnet18_random_metrics.json

# 4. WR50-Rd550 memory and time (random weights: memory and time do not depend on them).
rm -rf "$OUT/wide_resnet50_2_random/bottle"
/usr/bin/time -v $PY train.py --data_path "$DATA" --category bottle --backbone wide_resnet50_2 \
    --pretrained_backbone random --save_path "$OUT/wide_resnet50_2_random" --save_picture False \
    > logs/bottle_wide_resnet50_2_random_time.log 2>&1
cp "$OUT/wide_resnet50_2_random/bottle/train.log" logs/bottle_wide_resnet50_2_random_train.log
