"""Print the TIPC results table from a driver run's logs:
`python -m tools.tipc_table [test_tipc/output/PaDiM]` (docs/performance.md shows it for logs/tipc_lite)."""
import re
import sys
from pathlib import Path

FIELDS = {"runtime_device": "device", "enable_mkldnn": "oneDNN", "cpu_math_library_num_threads": "threads",
          "data_num": "images"}


def parse(log: Path) -> dict:
    values = {}
    for line in log.read_text(errors="replace").splitlines():
        for key in FIELDS:
            match = re.search(rf"\b{key}: (\S+)", line)
            if match:
                values[key] = match.group(1)
        for key in ("preprocess_time", "inference_time", "postprocess_time", "cpu_rss", "total time spent"):
            match = re.search(rf"{key}\((?:ms|MB|s)\): ([\d.]+)", line)
            if match:
                values[key] = match.group(1)
        if "no CUDA" in line:
            values["fallback"] = True
    return values


def succeeded(status: str, log: Path) -> bool:
    """Whether results_python.log reports the command that wrote ``log`` as a success."""
    lines = [line for line in status.splitlines() if f"{log.name} 2>&1" in line]
    return bool(lines) and "Run successfully" in lines[0]


def table_lines(folder: Path) -> list:
    """The table's Markdown lines, one row per python_infer_*.log in ``folder`` (the GPU line first)."""
    status_file = folder / "results_python.log"
    status = status_file.read_text(errors="replace") if status_file.is_file() else ""
    lines = ["| log | device | oneDNN | threads | images | preprocess (ms) | inference (ms) | postprocess (ms) "
             "| total (s) | cpu_rss (MB) | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for log in sorted(folder.glob("python_infer_*.log"), key=lambda p: ("gpu" not in p.name, p.name)):
        v = parse(log)
        device = v.get("runtime_device", "?") + (" (--use_gpu=True, no CUDA: fallback)" if v.get("fallback") else "")
        ok = "Run successfully" if succeeded(status, log) else "Run failed"
        lines.append(f"| {log.stem} | {device} | {v.get('enable_mkldnn')} | {v.get('cpu_math_library_num_threads')} | "
                     f"{v.get('data_num')} | {v.get('preprocess_time')} | {v.get('inference_time')} | "
                     f"{v.get('postprocess_time')} | {v.get('total time spent')} | {v.get('cpu_rss')} | {ok} |")
    return lines


def main():
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "test_tipc/output/PaDiM")
    print("\n".join(table_lines(folder)))


if __name__ == "__main__":
    main()
