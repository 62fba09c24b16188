#!/usr/bin/env bash
# Helpers shared by test_tipc/prepare.sh and test_tipc/test_train_inference_python.sh.
#
# A config line is "key:value". The key is the text before the first ':' and the value the text
# between the first and the second ':' (a value cannot contain ':'). "|" separates alternatives,
# and a value may be a list of "mode=value" entries, one per TIPC mode.

# func_parser_key "key:value" -> key
function func_parser_key(){
    local line=$1
    printf '%s\n' "${line%%:*}"
}

# func_parser_value "key:value" -> value
function func_parser_value(){
    local line=$1
    local rest
    if [[ "${line}" != *:* ]]; then
        printf '\n'
        return
    fi
    rest=${line#*:}
    printf '%s\n' "${rest%%:*}"
}

# func_set_params key value -> "key=value", or " " when the key or the value is null/empty
function func_set_params(){
    local key=$1
    local value=$2
    if [ "${key}" = "null" ] || [ -z "${key}" ] || [ "${value}" = "null" ] \
        || [ -z "${value// /}" ]; then
        printf ' \n'
    else
        printf '%s=%s\n' "${key}" "${value}"
    fi
}

# func_parser_params "key:mode1=v1|mode2=v2" -> the value for the current $MODE (empty if none).
# A value without any "mode=" entry is returned unchanged, for every mode.
function func_parser_params(){
    local line=$1
    local value
    local entry
    value=$(func_parser_value "${line}")
    if [[ "${value}" != *=* ]]; then
        printf '%s\n' "${value}"
        return
    fi
    local IFS='|'
    for entry in ${value}; do
        if [ "${entry%%=*}" = "${MODE}" ]; then
            printf '%s\n' "${entry#*=}"
            return
        fi
    done
    printf '\n'
}

# status_check exit_code command log_file
# Appends "Run successfully with command - <cmd>!" or "Run failed with command - <cmd>!"
# (yellow, as the original) to log_file and prints it.
function status_check(){
    local last_status=$1
    local run_command=$2
    local run_log=$3
    if [ "${last_status}" -eq 0 ]; then
        printf '\033[33m Run successfully with command - %s!  \033[0m\n' "${run_command}" | tee -a "${run_log}"
    else
        printf '\033[33m Run failed with command - %s!  \033[0m\n' "${run_command}" | tee -a "${run_log}"
    fi
}
