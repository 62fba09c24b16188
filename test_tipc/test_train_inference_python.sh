#!/usr/bin/env bash
# TIPC driver: train -> eval -> export -> Paddle Inference, as listed in a 51-line config.
#
#   bash test_tipc/test_train_inference_python.sh test_tipc/configs/PaDiM/train_infer_python.txt MODE
#
# MODE: lite_train_lite_infer | lite_train_whole_infer | whole_train_whole_infer | whole_infer
# (run test_tipc/prepare.sh with the same MODE first).
#
# Every command gets one line in ./test_tipc/output/<model_name>/results_python.log:
#   "Run successfully with command - <cmd>!" or "Run failed with command - <cmd>!".
# That file (and the python_infer_*.log files) are cleared at the start of each run.
# The exit status is 0 only when every command succeeded, 1 otherwise, 2 for a usage error.
# TIPC_PYTHON overrides the config's python command (line 3).

if [ $# -lt 2 ]; then
    echo "usage: bash test_tipc/test_train_inference_python.sh CONFIG MODE" >&2
    exit 2
fi
FILENAME=$1
MODE=$2
case "${MODE}" in
    lite_train_lite_infer|lite_train_whole_infer|whole_train_whole_infer|whole_infer) ;;
    klquant_whole_infer)
        echo "klquant_whole_infer is not supported: PaDiM has no quantised model" >&2
        exit 2 ;;
    *)
        echo "unknown mode '${MODE}'; use lite_train_lite_infer, lite_train_whole_infer," \
             "whole_train_whole_infer or whole_infer" >&2
        exit 2 ;;
esac
if [ ! -f "${FILENAME}" ]; then
    echo "config not found: ${FILENAME}" >&2
    exit 2
fi
FILENAME=$(cd "$(dirname "${FILENAME}")" && pwd)/$(basename "${FILENAME}")
# Every path in the config is relative to the repository root.
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "${REPO_ROOT}" || exit 2
source test_tipc/common_func.sh

mapfile -t lines < "${FILENAME}"
lines=("${lines[@]%$'\r'}")
if [ "${#lines[@]}" -lt 51 ]; then
    echo "${FILENAME}: expected 51 lines, found ${#lines[@]}" >&2
    exit 2
fi
# line k of the config is lines[k-1]
value_of(){ func_parser_value "${lines[$(($1 - 1))]}"; }
key_of(){ func_parser_key "${lines[$(($1 - 1))]}"; }

# ---- train_params (lines 1-22)
model_name=$(value_of 2)
python=$(value_of 3)
python=${TIPC_PYTHON:-${python}}
gpu_list=$(value_of 4)
autocast_list=$(value_of 6)
# Lines 5 and 7-12 (use_gpu, epochs, save dir, batch size, pretrained, train model name, data
# dir) are informational: as in the original, a single-card training command is line 16 as is.
trainer_list=$(value_of 15)
norm_trainer=$(value_of 16)
pact_trainer=$(value_of 17)
fpgm_trainer=$(value_of 18)
distill_trainer=$(value_of 19)
# ---- eval_params (line 24)
eval_py=$(value_of 24)
# ---- infer_params (lines 28-51)
norm_export=$(value_of 30)
pact_export=$(value_of 31)
fpgm_export=$(value_of 32)
distill_export=$(value_of 33)
infer_model=$(value_of 37)
infer_export=$(value_of 38)
inference_py=$(value_of 40)
use_gpu_key=$(key_of 41);       use_gpu_list=$(value_of 41)
use_mkldnn_key=$(key_of 42);    use_mkldnn_list=$(value_of 42)
cpu_threads_key=$(key_of 43);   cpu_threads_list=$(value_of 43)
batch_size_key=$(key_of 44);    batch_size_list=$(value_of 44)
use_trt_key=$(key_of 45);       use_trt_list=$(value_of 45)
precision_key=$(key_of 46);     precision_list=$(value_of 46)
model_file_key=$(key_of 47);    model_file=$(value_of 47)
input_key=$(key_of 48);         infer_input=$(func_parser_params "${lines[47]}")
benchmark_key=$(key_of 50);     benchmark_value=$(value_of 50)
params_file_key=$(key_of 51);   params_file=$(value_of 51)

LOG_PATH=./test_tipc/output/${model_name}
mkdir -p "${LOG_PATH}"
status_log="${LOG_PATH}/results_python.log"
# A run starts from an empty results log, so lines of an older run never mix in.
: > "${status_log}"
rm -f "${LOG_PATH}"/python_infer_*.log

n_run=0
n_failed=0
# run_step COMMAND: run it, log its status, and return its exit code
function run_step(){
    local command=$1
    local start=${SECONDS}
    local status
    echo "[tipc] ${command}"
    eval "${command}"
    status=$?
    n_run=$((n_run + 1))
    [ "${status}" -ne 0 ] && n_failed=$((n_failed + 1))
    status_check "${status}" "${command}" "${status_log}"
    echo "[tipc] exit ${status} after $((SECONDS - start))s"
    return "${status}"
}

function is_true(){
    case "$1" in True|true|TRUE|t|T|1|yes) return 0 ;; *) return 1 ;; esac
}

# func_inference INPUT: one Paddle Inference run per combination of lines 41-46
function func_inference(){
    local input=$1
    local use_gpu use_trt use_mkldnn threads precision batch_size log_file command
    local set_input set_model set_params set_benchmark set_precision set_batch set_threads
    set_input=$(func_set_params "${input_key}" "${input}")
    set_model=$(func_set_params "${model_file_key}" "${model_file}")
    set_params=$(func_set_params "${params_file_key}" "${params_file}")
    set_benchmark=$(func_set_params "${benchmark_key}" "${benchmark_value}")
    for use_gpu in ${use_gpu_list//|/ }; do
        if is_true "${use_gpu}"; then
            if [ -z "${HAS_CUDA}" ]; then
                HAS_CUDA=$(${python} -c "import paddle; print(paddle.is_compiled_with_cuda())" 2>/dev/null | tail -n 1)
            fi
            if [ "${HAS_CUDA}" != "True" ]; then
                echo "[tipc] note: this Paddle build has no CUDA; infer.py runs the ${use_gpu_key}=True lines on the CPU (it logs a warning)"
            fi
            for use_trt in ${use_trt_list//|/ }; do
                for precision in ${precision_list//|/ }; do
                    if ! is_true "${use_trt}" && [ "${precision}" != "fp32" ]; then
                        echo "[tipc] skip: ${precision_key}=${precision} on GPU needs ${use_trt_key}=True"
                        continue
                    fi
                    for batch_size in ${batch_size_list//|/ }; do
                        log_file="${LOG_PATH}/python_infer_gpu_usetrt_${use_trt}_precision_${precision}_batchsize_${batch_size}.log"
                        set_precision=$(func_set_params "${precision_key}" "${precision}")
                        set_batch=$(func_set_params "${batch_size_key}" "${batch_size}")
                        command="${python} ${inference_py} ${use_gpu_key}=${use_gpu} $(func_set_params "${use_trt_key}" "${use_trt}") ${set_precision} ${set_model} ${set_batch} ${set_input} ${set_benchmark} ${set_params} > ${log_file} 2>&1"
                        run_step "${command}"
                        cat "${log_file}"
                    done
                done
            done
        else
            for use_mkldnn in ${use_mkldnn_list//|/ }; do
                for threads in ${cpu_threads_list//|/ }; do
                    for precision in ${precision_list//|/ }; do
                        if [ "${precision}" = "int8" ] || { ! is_true "${use_mkldnn}" && [ "${precision}" != "fp32" ]; }; then
                            echo "[tipc] skip: ${precision_key}=${precision} on CPU needs ${use_mkldnn_key}=True (bf16; no int8)"
                            continue
                        fi
                        for batch_size in ${batch_size_list//|/ }; do
                            log_file="${LOG_PATH}/python_infer_cpu_usemkldnn_${use_mkldnn}_threads_${threads}_precision_${precision}_batchsize_${batch_size}.log"
                            set_threads=$(func_set_params "${cpu_threads_key}" "${threads}")
                            set_precision=$(func_set_params "${precision_key}" "${precision}")
                            set_batch=$(func_set_params "${batch_size_key}" "${batch_size}")
                            command="${python} ${inference_py} ${use_gpu_key}=${use_gpu} $(func_set_params "${use_mkldnn_key}" "${use_mkldnn}") ${set_threads} ${set_model} ${set_batch} ${set_input} ${set_benchmark} ${set_precision} ${set_params} > ${log_file} 2>&1"
                            run_step "${command}"
                            cat "${log_file}"
                        done
                    done
                done
            done
        fi
    done
}

HAS_CUDA=""
echo "[tipc] ${model_name}, mode ${MODE}, python '${python}', results in ${status_log}"
if [ -z "${infer_input}" ]; then
    echo "[tipc] line 48 (${input_key}) has no input for mode ${MODE}" >&2
    exit 2
fi

if [ ! -d ./test_tipc/data ]; then
    echo "[tipc] warning: ./test_tipc/data does not exist; run test_tipc/prepare.sh ${FILENAME#${REPO_ROOT}/} ${MODE} first"
fi

if [ "${MODE}" = "whole_infer" ]; then
    # No training: export the model prepare.sh put in place (line 38), then run inference.
    export_ok=0
    if [ "${infer_export}" != "null" ] && [ -n "${infer_export}" ]; then
        run_step "${python} ${infer_export}" || export_ok=1
    fi
    if [ "${export_ok}" -eq 0 ]; then
        func_inference "${infer_input}"
    else
        echo "[tipc] export failed: inference skipped (${infer_model} would be stale or missing)"
    fi
else
    for gpu in ${gpu_list//|/ }; do
        if [ "${gpu}" = "-1" ]; then
            export CUDA_VISIBLE_DEVICES=""
        elif [[ "${gpu}" == *","* || "${gpu}" == *";"* ]]; then
            echo "[tipc] skip gpu_list entry '${gpu}': PaDiM trains on a single device"
            continue
        else
            export CUDA_VISIBLE_DEVICES=${gpu}
        fi
        for autocast in ${autocast_list//|/ }; do
            if [ "${autocast}" != "fp32" ] && [ "${autocast}" != "null" ]; then
                echo "[tipc] skip auto_cast '${autocast}': PaDiM fits its Gaussian in fp32/fp64"
                continue
            fi
            for trainer in ${trainer_list//|/ }; do
                case "${trainer}" in
                    norm_train)    run_train=${norm_trainer};    run_export=${norm_export} ;;
                    pact_train)    run_train=${pact_trainer};    run_export=${pact_export} ;;
                    fpgm_train)    run_train=${fpgm_trainer};    run_export=${fpgm_export} ;;
                    distill_train) run_train=${distill_trainer}; run_export=${distill_export} ;;
                    *)             run_train=null;               run_export=null ;;
                esac
                if [ "${run_train}" = "null" ] || [ -z "${run_train}" ]; then
                    echo "[tipc] skip trainer '${trainer}': no command in the config"
                    continue
                fi
                # Later steps read what earlier ones wrote; after a failure they would run on
                # stale files, so they are skipped (the failure is already logged).
                if ! run_step "${python} ${run_train}"; then
                    echo "[tipc] training failed: eval, export and inference skipped"
                    continue
                fi
                if [ "${eval_py}" != "null" ] && [ -n "${eval_py}" ]; then
                    run_step "${python} ${eval_py}"
                fi
                if [ "${run_export}" != "null" ] && [ -n "${run_export}" ]; then
                    if ! run_step "${python} ${run_export}"; then
                        echo "[tipc] export failed: inference skipped"
                        continue
                    fi
                fi
                func_inference "${infer_input}"
            done
        done
    done
fi

echo
if [ "${n_run}" -eq 0 ]; then
    echo "[tipc] no command ran: nothing to check" >&2
    exit 1
fi
if [ "${n_failed}" -ne 0 ]; then
    echo "[tipc] ${n_failed} of ${n_run} commands FAILED, see ${status_log}"
    exit 1
fi
echo "[tipc] all ${n_run} commands ran successfully, see ${status_log}"
exit 0
