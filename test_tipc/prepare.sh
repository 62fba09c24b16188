#!/usr/bin/env bash
# Prepare the data (and, for whole_infer, the trained model) that a TIPC mode needs.
#
#   bash test_tipc/prepare.sh test_tipc/configs/PaDiM/train_infer_python.txt MODE
#
# Nothing is downloaded: the lite data is painted by the project's demo generator
# (python -m datasets.demo), in the MVTec AD layout, at ./test_tipc/data/MVTec/capsule.
#
# MODE
#   lite_train_lite_infer    8 train images, 2 good + 4 defective test images (with masks)
#   lite_train_whole_infer   8 train images, 10 good + 20 defective test images
#   whole_train_whole_infer  60 train images, 10 good + 20 defective test images
#   whole_infer              no training data; the model to export and the test images come from
#                            TIPC_MODEL_PATH (a best.pdparams) and TIPC_DATA_PATH (one category
#                            folder in the MVTec layout, e.g. /path/to/mvtec/bottle).
#                            Without TIPC_DATA_PATH the demo category (60/10/20) is generated;
#                            without TIPC_MODEL_PATH a model is trained here on the category's
#                            train/good images (mobilenet_v2, the offline ImageNet backbone,
#                            then val.py's thresholds) into ./test_tipc/data/whole_infer_model/.
#                            Both end up behind ./test_tipc/data/whole_infer/{data,best.pdparams}.
# TIPC_PYTHON overrides the config's python command (line 3).

if [ $# -lt 2 ]; then
    echo "usage: bash test_tipc/prepare.sh CONFIG MODE" >&2
    echo "MODE: lite_train_lite_infer | lite_train_whole_infer | whole_train_whole_infer | whole_infer" >&2
    exit 2
fi
FILENAME=$1
MODE=$2
if [ ! -f "${FILENAME}" ]; then
    echo "prepare.sh: config not found: ${FILENAME}" >&2
    exit 2
fi
FILENAME=$(cd "$(dirname "${FILENAME}")" && pwd)/$(basename "${FILENAME}")
# Relative paths in TIPC_DATA_PATH / TIPC_MODEL_PATH are relative to where the script was started.
if [ -n "${TIPC_DATA_PATH:-}" ] && [[ "${TIPC_DATA_PATH}" != /* ]]; then
    TIPC_DATA_PATH="$(pwd)/${TIPC_DATA_PATH}"
fi
if [ -n "${TIPC_MODEL_PATH:-}" ] && [[ "${TIPC_MODEL_PATH}" != /* ]]; then
    TIPC_MODEL_PATH="$(pwd)/${TIPC_MODEL_PATH}"
fi
# Every path in the config is relative to the repository root.
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "${REPO_ROOT}" || exit 2
source test_tipc/common_func.sh

mapfile -t lines < "${FILENAME}"
lines=("${lines[@]%$'\r'}")
model_name=$(func_parser_value "${lines[1]}")
python=$(func_parser_value "${lines[2]}")
python=${TIPC_PYTHON:-${python}}
trainer_list=$(func_parser_value "${lines[14]}")

DATA_DIR=./test_tipc/data
LITE_CATEGORY=capsule

# make_demo N_TRAIN N_TEST_GOOD N_PER_DEFECT: (re)generate ./test_tipc/data/MVTec/capsule
function make_demo(){
    rm -rf "${DATA_DIR}/MVTec" "${DATA_DIR}/__MACOSX"
    mkdir -p "${DATA_DIR}/MVTec"
    ${python} -m datasets.demo --out "${DATA_DIR}/MVTec" --category "${LITE_CATEGORY}" \
        --n_train "$1" --n_test_good "$2" --n_per_defect "$3" || exit 1
}

echo "prepare.sh: ${model_name}, mode ${MODE}, trainers ${trainer_list}, python '${python}'"
case "${MODE}" in
    lite_train_lite_infer)
        make_demo 8 2 1
        ;;
    lite_train_whole_infer)
        make_demo 8 10 5
        ;;
    whole_train_whole_infer)
        make_demo 60 10 5
        ;;
    whole_infer)
        WHOLE_DIR=${DATA_DIR}/whole_infer
        if [ -n "${TIPC_MODEL_PATH:-}" ] && [ ! -f "${TIPC_MODEL_PATH}" ]; then
            echo "prepare.sh: TIPC_MODEL_PATH is not a file: '${TIPC_MODEL_PATH}'" >&2
            exit 2
        fi
        rm -rf "${WHOLE_DIR}"
        mkdir -p "${WHOLE_DIR}"
        if [ -n "${TIPC_DATA_PATH:-}" ]; then
            category_dir=$(cd "${TIPC_DATA_PATH}" 2>/dev/null && pwd)
            if [ -z "${category_dir}" ] || [ ! -d "${category_dir}/test" ]; then
                echo "prepare.sh: TIPC_DATA_PATH must be one category folder in the MVTec layout" \
                     "(with train/ and test/), got '${TIPC_DATA_PATH}'" >&2
                exit 2
            fi
        else
            make_demo 60 10 5
            category_dir=$(cd "${DATA_DIR}/MVTec/${LITE_CATEGORY}" && pwd)
        fi
        ln -s "${category_dir}" "${WHOLE_DIR}/data"
        if [ -n "${TIPC_MODEL_PATH:-}" ]; then
            model_file=$(cd "$(dirname "${TIPC_MODEL_PATH}")" && pwd)/$(basename "${TIPC_MODEL_PATH}")
        else
            category=$(basename "${category_dir}")
            echo "prepare.sh: TIPC_MODEL_PATH not set: training a mobilenet_v2 model on ${category_dir}/train"
            ${python} train.py --data_path="$(dirname "${category_dir}")" --category "${category}" \
                --backbone mobilenet_v2 --pretrained_backbone=imagenet --val=True --save_picture=False \
                --save_path="${DATA_DIR}/whole_infer_model" --seed 7 || exit 1
            model_file=$(cd "${DATA_DIR}/whole_infer_model/${category}" && pwd)/best.pdparams
        fi
        ln -s "${model_file}" "${WHOLE_DIR}/best.pdparams"
        echo "prepare.sh: ${WHOLE_DIR}/data -> ${category_dir}"
        echo "prepare.sh: ${WHOLE_DIR}/best.pdparams -> ${model_file}"
        ;;
    klquant_whole_infer)
        echo "prepare.sh: klquant_whole_infer is not supported: PaDiM has no quantised model" >&2
        exit 2
        ;;
    *)
        echo "prepare.sh: unknown mode '${MODE}'" >&2
        echo "MODE: lite_train_lite_infer | lite_train_whole_infer | whole_train_whole_infer | whole_infer" >&2
        exit 2
        ;;
esac
echo "prepare.sh: done"
