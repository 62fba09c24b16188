"""tools.performance_doc: the page shows what the logs hold, with their commands, and nothing from
a log listed as stale; both layouts of the anomalib comparison render; the README block is replaced."""
import json

import numpy as np
import pytest

from tools import performance_doc as doc

TRAIN_LOG = """# python train.py --data_path /data --category bottle --backbone resnet18
2026-01-01 00:00:00\tbackbone resnet18, weights random, 209 training images under /data/bottle
2026-01-01 00:00:05\tTrain ends, total 4.25s (features 2.00s, Gaussian 0.31s, 209 images)
2026-01-01 00:00:09\tClass:bottle:\tImage AUC: 0.971
2026-01-01 00:00:09\tClass:bottle:\tPixel AUC: 0.927
2026-01-01 00:00:09\tClass:bottle:\tPRO AUC (FPR<=0.3): 0.752
"""


# Made-up inputs for the generator (not measurements): a fresh and a stale throughput, and the
# Gaussian stage's two durations, whose ratio the page must compute.
FRESH_RATE, STALE_RATE = 12.3, 99.9
VECTORISED_S, LOOP_S = 0.25, 5.0


def rate(value: float) -> str:
    return f"{value} img/s"


def benchmark(value: str) -> dict:
    return {"config": {"category": "bottle", "backbone": "resnet18", "d": 100, "n_train": 209, "n_test": 83},
            "machine": {"cpu": "Test CPU", "cpus_available": 2, "threads": 2},
            "results": {"gaussian": {"vectorised_seconds": VECTORISED_S, "loop_seconds": LOOP_S,
                                     "speedup": LOOP_S / VECTORISED_S,
                                     "max_relative_difference": 2e-5}},
            "table": [{"section": "fit", "measurement": "train.py fit", "value": value, "target": "", "status": ""}]}


@pytest.fixture
def logs(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "benchmark_bottle_resnet18.json").write_text(json.dumps(benchmark(rate(FRESH_RATE))))
    (folder / "benchmark_bottle_resnet18.log").write_text("# python -m tools.benchmark --category bottle\nrest\n")
    (folder / "benchmark_demo_resnet18.json").write_text(json.dumps(benchmark(rate(STALE_RATE))))
    (folder / "bottle_resnet18_random_train.log").write_text(TRAIN_LOG)
    (folder / "stale.txt").write_text("# comment\nlogs/benchmark_demo_resnet18.json recorded by removed code\n")
    return folder


def page(folder) -> str:
    return doc.performance_page(doc.Logs(folder))


def test_fresh_rows_with_their_command_and_nothing_from_stale_logs(logs):
    text = page(logs)
    assert rate(FRESH_RATE) in text
    assert "`python -m tools.benchmark --category bottle`" in text
    assert str(STALE_RATE) not in text
    assert "`logs/benchmark_demo_resnet18.json` is to be regenerated (recorded by removed code)" in text
    # the ratio computed from the logged durations
    assert f"{VECTORISED_S * 1e3:.1f} ms vs {LOOP_S:.2f} s, {LOOP_S / VECTORISED_S:.1f}×" in text


def test_results_table_hides_the_fit_time_of_a_stale_train_log(logs):
    text = "\n".join(doc.results_table(doc.Logs(logs)))
    assert "| resnet18 (random weights) | 0.971 | 0.927 | 0.752 | 4.25 s (209 images) |" in text
    assert "`python train.py --data_path /data --category bottle --backbone resnet18`" in text
    (logs / "stale.txt").write_text("logs/bottle_resnet18_random_train.log older code\n")
    text = "\n".join(doc.results_table(doc.Logs(logs)))
    assert "| 0.971 | 0.927 | 0.752 | to be regenerated |" in text
    assert "4.25" not in text


# Made-up inputs of the anomalib comparison (not measurements): its fit, its Gaussian stage and
# model calls, whose renderings the page must derive (ours: VECTORISED_S from the benchmark).
ANOMALIB_FIT_S, ANOMALIB_GAUSSIAN_S, EAGER_B32, OPENVINO_B32 = 8.0, 1.5, 50.0, 64.0


def test_anomalib_old_layout(logs):
    old = {"anomalib": "2.7.0", "threads": 2, "n_train": 209, "n_test": 83, "gaussian_seconds": ANOMALIB_GAUSSIAN_S,
           "fit": {"n_images": 209, "seconds": ANOMALIB_FIT_S, "gaussian_seconds": 1.2, "peak_rss": 2 ** 30},
           "fit_large": {"n_images": 836, "peak_rss": 2 ** 31},
           "eager_latency_b1_ms": 31.25, "eager_throughput_b32": EAGER_B32}
    (logs / "anomalib_bottle_resnet18.json").write_text(json.dumps(old))
    text = "\n".join(doc.anomalib_section(doc.Logs(logs)))
    assert "| bottle, ResNet18 | ours | anomalib eager |" in text   # no OpenVINO or ONNX runs in that layout
    assert f"| fit, 209 images, decode included |  | {ANOMALIB_FIT_S:.2f} s ({209 / ANOMALIB_FIT_S:.1f} img/s) |" in text
    assert "2.00× for 836 vs 209 images" in text
    assert (f"| Gaussian fit + scoring alone, 209 train / 83 test | {VECTORISED_S * 1e3:.1f} ms | "
            f"{ANOMALIB_GAUSSIAN_S:.2f} s |") in text
    assert f"| model call, batch 32 |  | {1e3 / EAGER_B32:.1f} ms/img ({EAGER_B32:.1f} img/s) |" in text
    assert "OpenVINO" not in text.split("\n", 4)[-1]


def test_anomalib_new_layout(logs):
    call = {"latency_b1_ms": 10.0, "latency_b1_mean_ms": 12.0, "throughput_b32": 100.0}
    new = {"anomalib": "2.7.0", "openvino": "2025.1", "threads": 2, "repeats": 3, "batch_size": 8,
           "fit": {"n_images": 209, "seconds": 8.0, "process_seconds": 20.0, "peak_rss": 2 ** 31},
           "fit_large": {"n_images": 836, "peak_rss": 3 * 2 ** 30},
           "ours_fit": {"seconds": 9.5, "peak_rss": 2 ** 30},
           "scoring": {"n_train": 209, "n_test": 83, "gaussian_seconds": 2.5, "eager": call,
                       "openvino": dict(call, throughput_b32=OPENVINO_B32, inference_precision="bf16"),
                       "onnxruntime": call},
           "whole": {"anomalib_openvino": {"seconds": 3.0}, "anomalib_onnxruntime": {"seconds": 3.5},
                     "ours_infer": {"seconds": 4.5, "n_images": 83}, "ours_infer_pictures": {"seconds": 6.0}}}
    (logs / "anomalib_bottle_resnet18.json").write_text(json.dumps(new))
    text = "\n".join(doc.anomalib_section(doc.Logs(logs)))
    assert "| bottle, ResNet18 | ours | anomalib eager | anomalib OpenVINO | anomalib ONNX |" in text
    assert "the median of 3 interleaved runs" in text
    assert "| fit, whole process / peak RSS | 9.50 s / 1.00 GiB | 20.00 s / 2.00 GiB |" in text
    assert f"{1e3 / OPENVINO_B32:.1f} ms/img ({OPENVINO_B32:.1f} img/s)" in text
    assert "| 4.50 s (infer.py) |  | 3.00 s | 3.50 s |" in text
    assert "| same, with pictures | 6.00 s (infer.py fp32, 1.33× the time without) |" in text
    story = "\n".join(doc.story(doc.Logs(logs)))
    assert "took 4.50 s; a lean process running anomalib's OpenVINO export 3.00 s (1.50×)" in story


def test_anomalib_layout_with_precisions_and_startup(logs):
    """Our model calls in fp32 and bf16, OpenVINO's default (bf16) and f32, the bf16 differences,
    the whole-process runs in both precisions and predict.py against import paddle."""
    call = {"latency_b1_ms": 10.0, "latency_b1_mean_ms": 12.0, "throughput_b32": 100.0}
    data = {"anomalib": "2.7.0", "openvino": "2025.1", "threads": 2, "repeats": 3, "batch_size": 8,
            "scoring": {"n_train": 209, "n_test": 83,
                        "openvino": dict(call, inference_precision="bf16"),
                        "openvino_fp32": dict(call, latency_b1_ms=20.0, inference_precision="f32"),
                        "ours": {"fp32": dict(call, precision="fp32", latency_b1_ms=16.0),
                                 "bf16": dict(call, precision="bf16", latency_b1_ms=8.0, throughput_b32=250.0,
                                              score_max_relative_difference=0.0296,
                                              map_max_difference_over_peak=0.2555)}},
            "whole": {"anomalib_openvino": {"seconds": 2.0}, "anomalib_openvino_fp32": {"seconds": 2.5},
                      "ours_infer": {"seconds": 3.0, "n_images": 83}, "ours_infer_bf16": {"seconds": 2.2},
                      "ours_infer_pictures": {"seconds": 4.5}},
            "startup": {"import_paddle": {"seconds": 1.0}, "predict_one": {"seconds": 1.5}}}
    (logs / "anomalib_bottle_resnet18.json").write_text(json.dumps(data))
    table = "\n".join(doc.anomalib_section(doc.Logs(logs)))
    story = "\n".join(doc.story(doc.Logs(logs)))
    expected_in_table = [
        "| bottle, ResNet18 | ours | anomalib OpenVINO |",            # columns without a number are left out
        "| model call, batch 1 (median / mean) | fp32: 16.0 / 12.0 ms; bf16: 8.0 / 12.0 ms | "
        "bf16: 10.0 / 12.0 ms; f32: 20.0 / 12.0 ms |",
        "bf16: 4.0 ms/img (250.0 img/s)", "| 2.96% / 25.55% |",
        "| fp32 3.00 s; bf16 2.20 s (infer.py) | bf16 2.00 s; f32 2.50 s |", "| 1.50 s / 1.00 s (1.50×) |"]
    expected_in_story = [
        "took 3.00 s; a lean process running anomalib's OpenVINO export 2.00 s (1.50×)",
        "asked for f32, OpenVINO took 2.50 s (1.20× for infer.py)", "took 2.20 s (1.10×)",
        "took 1.50 s as a whole process", "took 1.00 s (1.50×)",
        "differed from fp32's by up to 3.0%", "up to 25.6% of its peak"]
    assert [line for line in expected_in_table if line not in table] == []
    assert [line for line in expected_in_story if line not in story] == []


def test_readme_block_replaced_and_check(logs, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{doc.README_BEGIN}\nold table\n{doc.README_END}\noutro\n")
    out = tmp_path / "docs" / "performance.md"
    arguments = ["--logs", str(logs), "--out", str(out), "--readme", str(readme)]
    assert doc.main(arguments + ["--check"]) == 1
    assert doc.main(arguments) == 0
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith(f"{doc.README_END}\noutro\n")
    assert "| 0.971 | 0.927 | 0.752 |" in text
    assert doc.main(arguments + ["--check"]) == 0


def test_commands_name_no_revision():
    assert doc.shown_command("python -m tools.alternate_fit --old 4d90727 --rounds 3") == \
        "python -m tools.alternate_fit --old <baseline revision> --rounds 3"


def test_compare_anomalib_result_renders_in_its_table_and_on_the_page(logs):
    """One result as tools.compare_anomalib builds it (worker records carry their process's time
    and peak RSS beside the timings) renders in the tool's own table and on the page."""
    from argparse import Namespace

    from tools import compare_anomalib
    call = {"latency_b1_ms": 10.0, "latency_b1_mean_ms": 12.0, "throughput_b32": 100.0}
    process = {"process_seconds": 7.5, "process_peak_rss": 2 ** 30}
    fit = {"n_images": 209, "seconds": 8.0, "extraction_seconds": 6.0, "gaussian_seconds": 1.0, "peak_rss": 2 ** 31,
           **process}
    result = {
        "anomalib": "2.7.0", "threads": 2, "repeats": 3, "batch_size": 8, "fit": fit,
        "fit_large": dict(fit, n_images=836), "ours_fit": {"seconds": 9.0, "peak_rss": 2 ** 30},
        "scoring": {"n_train": 209, "n_test": 83, "gaussian_fit_seconds": 1.0, "gaussian_score_seconds": 0.1,
                    "gaussian_seconds": 1.1, "eager": call, "onnxruntime": dict(call, precision="fp32"),
                    "openvino": dict(call, inference_precision="bf16", score_max_relative_difference=0.0125,
                                     map_max_difference_over_peak=0.0875),
                    "openvino_fp32": dict(call, inference_precision="f32"), **process,
                    "ours": {"fp32": dict(call, precision="fp32"),
                             "bf16": dict(call, precision="bf16", score_max_relative_difference=0.03,
                                          map_max_difference_over_peak=0.25), **process}},
        "whole": {name: {"seconds": 2.0 + i, "peak_rss": 2 ** 29} for i, name in enumerate(compare_anomalib.WHOLE_RUNS)},
        "startup": {"import_paddle": {"seconds": 1.0, "peak_rss": 2 ** 28},
                    "predict_one": {"seconds": 1.4, "peak_rss": 2 ** 29}}}
    rows = dict(compare_anomalib.table_rows(result, Namespace(batch_size=8)))
    assert rows["ours: Paddle Inference, oneDNN, bf16 (bf16): batch 1 median / mean, batch 32"] == \
        "10.0 / 12.0 ms, 10.0 ms/img (100.0 img/s)"
    assert rows["ratio: predict.py one image / import paddle"] == "1.40x"
    largest = "largest difference: scores (relative) / maps (over the map's peak)"
    assert rows[f"ours: bf16 against fp32, {largest}"] == "3.00% / 25.00%"
    assert rows[f"anomalib OpenVINO export: default (bf16) against f32 asked, {largest}"] == "1.25% / 8.75%"
    assert rows["ratio: ours: infer.py fp32, pictures on / ours: infer.py fp32, pictures off"] == "1.40x"   # 7 s / 5 s
    (logs / "anomalib_bottle_resnet18.json").write_text(json.dumps(result))
    table = "\n".join(doc.anomalib_section(doc.Logs(logs)))
    assert "fp32: 10.0 / 12.0 ms; bf16: 10.0 / 12.0 ms" in table and "| 1.40 s / 1.00 s (1.40×) |" in table
    assert "| bf16 against fp32: largest score difference / largest map difference over its peak | 3.00% / 25.00% |" \
           "  | 1.25% / 8.75% |  |" in table
    story = "\n".join(doc.story(doc.Logs(logs)))
    assert "OpenVINO export in its default precision (bf16) moved its scores on the same images by up to 1.2% " \
           "and each map by up to 8.8% of its peak against f32 asked" in story


def test_precision_differences_take_each_map_over_its_own_peak():
    """Two maps with peaks 10 and 2, off by 1 and 0.5 at a low pixel: over their own peaks 10% and
    25% (over the largest peak, 10% and 5%; elementwise, up to 100%), and scores 4 vs 5, 1 vs 1."""
    from tools.compare_anomalib import precision_differences
    reference = np.array([[[10.0, 1.0]], [[2.0, 1.0]]]), np.array([5.0, 1.0])
    lower = np.array([[[10.0, 2.0]], [[2.0, 0.5]]]), np.array([4.0, 1.0])
    assert precision_differences(lower, reference) == pytest.approx(
        {"map_max_difference_over_peak": 0.25, "score_max_relative_difference": 0.2})
