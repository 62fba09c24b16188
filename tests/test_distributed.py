"""models/distributed.py under Paddle's own launcher: 2 processes on the CPU (gloo).

Each scenario is one launch of tests/distributed_job.py; the launches start together (a
launch is mostly process start-up and waiting) and each test waits for its own. The expected
values come from NumPy here, never from the code under test.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distributed_job import GRAM_SHAPE, TOTAL_ITEMS, UNEVEN_ITEMS, item_arrays, rank_embeddings, rank_gram
from models import distributed

ROOT = Path(__file__).resolve().parent.parent
JOB = Path(__file__).resolve().parent / "distributed_job.py"
LAUNCH_TIMEOUT_S = 180


def launcher_env() -> dict:
    # a PADDLE_* variable inherited from an outer launcher would point the job at that job's store
    env = {key: value for key, value in os.environ.items() if not key.startswith("PADDLE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_launch(script_and_args: list, log_dir: Path, machine_flags=("--nproc_per_node", "2")) -> subprocess.Popen:
    """``python -m paddle.distributed.launch`` of a script from the repository root, in the
    background; each rank's output goes to ``log_dir``/workerlog.N."""
    return subprocess.Popen([sys.executable, "-m", "paddle.distributed.launch", *machine_flags, "--log_dir", str(log_dir),
                             *map(str, script_and_args)],
                            cwd=ROOT, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Launch:
    """One scenario: its launcher processes (one per simulated machine), its output folder."""

    def __init__(self, mode: str, root: Path):
        self.mode, self.out = mode, root / mode
        (self.out / "save").mkdir(parents=True)
        self.logs = []
        if mode == "remote":   # two launchers, as two machines: the job's ranks 0 and 1
            port = free_port()
            machines = [["--master", f"127.0.0.1:{port}", "--nnodes", "2", "--rank", str(node),
                         "--nproc_per_node", "1"] for node in (0, 1)]
        else:
            machines = [["--nproc_per_node", "2"]]
        self.processes = []
        for node, flags in enumerate(machines):
            log_dir = root / f"{mode}_log{node}"
            self.logs.append(log_dir)
            self.processes.append(start_launch([JOB, mode, self.out], log_dir, flags))

    def wait(self) -> list[int]:
        return [process.wait(timeout=LAUNCH_TIMEOUT_S) for process in self.processes]

    def worker_log(self, rank: int) -> str:
        """What rank ``rank`` printed (the launcher names its logs by local rank)."""
        log_dir, local = (self.logs[rank], 0) if self.mode == "remote" else (self.logs[0], rank)
        return (log_dir / f"workerlog.{local}").read_text(errors="replace")

    def seconds_to_stop(self, rank: int) -> float:
        return float(np.load(self.out / f"stopped_{rank}.npy")) - float(np.load(self.out / "failed_at.npy"))

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    started = {mode: Launch(mode, root) for mode in ("ok", "fail", "killed", "remote")}
    yield started
    for launch in started.values():
        launch.kill()


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error:")]


def test_context_without_the_launcher_is_rank_0_of_1(monkeypatch):
    for name in ("PADDLE_TRAINERS_NUM", "PADDLE_TRAINER_ID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.context() == (0, 1, False)
    assert distributed.init() == (0, 1, False)
    data = np.arange(6.0).reshape(2, 3)
    assert distributed.all_reduce_sum(data) is data and np.array_equal(data, np.arange(6.0).reshape(2, 3))
    with distributed.step("alone") as progress:
        progress.check()
    assert distributed.finalize_on_rank0(lambda: 42) == 42
    items = np.array([[20.0, 0.0, 10.0]])   # [1, 3]: items along axis 1, out of order
    arrays, indices = distributed.gather_indexed_to_rank0({"items": items}, [2, 0, 1], axis=1)
    assert indices.tolist() == [0, 1, 2] and arrays["items"].tolist() == [[0.0, 10.0, 20.0]]
    assert distributed.round_robin(["b", "a"], str.upper, "alone") == {"a": "A", "b": "B"}


def test_shards_are_disjoint_round_robin_and_cover_the_list():
    items = [f"image_{i:03d}.png" for i in range(11)]
    shards = [distributed.shard(items, rank, 3) for rank in range(3)]
    assert shards[1] == ["image_001.png", "image_004.png", "image_007.png", "image_010.png"]
    assert sorted(sum(shards, [])) == items
    assert [len(s) for s in shards] == [distributed.shard_size(11, rank, 3) for rank in range(3)] == [4, 4, 3]
    with pytest.raises(ValueError):
        distributed.shard(items, 3, 3)


def test_two_processes_sum_gather_and_write_once(launches):
    launch = launches["ok"]
    assert launch.wait() == [0], launch.worker_log(0)[-3000:]
    out = launch.out
    shards = [np.load(out / f"shard_{rank}.npy").tolist() for rank in (0, 1)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    assert "rank 1 of 2: 3 items" in launch.worker_log(1)
    # differing lists of images are refused on every rank
    assert [bool(np.load(out / f"mismatch_seen_{rank}.npy")) for rank in (0, 1)] == [True, True]
    # the float64 sum of two [P, d, d] arrays, in three chunks, is exactly NumPy's a + b
    expected = rank_gram(0) + rank_gram(1)
    for rank in (0, 1):
        gram = np.load(out / f"gram_{rank}.npy")
        assert gram.shape == GRAM_SHAPE and gram.dtype == np.float64
        assert np.array_equal(gram, expected)
    # a float32 Paddle tensor: summed in float64, rounded once
    pair = [rank_gram(rank)[:, 0, :].astype(np.float32).astype(np.float64) for rank in (0, 1)]
    assert np.array_equal(np.load(out / "tensor_1.npy"), (pair[0] + pair[1]).astype(np.float32))
    # the pooled shift is the mean of both ranks' embeddings (3 and 5 images)
    everything = np.concatenate([rank_embeddings(0), rank_embeddings(1)])
    for rank in (0, 1):
        np.testing.assert_allclose(np.load(out / f"pooled_{rank}.npy"), everything.mean(axis=0), rtol=0, atol=1e-12)
    # the per-item results come back in the original order, dtypes kept
    for key, value in item_arrays(range(TOTAL_ITEMS)).items():
        gathered = np.load(out / f"gathered_{key}.npy", allow_pickle=False)
        assert gathered.dtype == value.dtype and np.array_equal(gathered, value), key
    # any number of items per rank, sorted by their index; here along axis 1
    assert np.load(out / "uneven_indices.npy").tolist() == sorted(UNEVEN_ITEMS)
    expected = np.zeros((2, 3, 3), np.float32) + np.array(sorted(UNEVEN_ITEMS), np.float32)[None, :, None]
    assert np.array_equal(np.load(out / "uneven_embeddings.npy"), expected)
    for rank in (0, 1):
        assert np.array_equal(np.load(out / f"broadcast_{rank}.npy"), [0.25, 4.0])
        assert np.load(out / f"model_seen_{rank}.npy").all()


def assert_stopped_cleanly(launch, survivor_line: str, bound_s: float) -> None:
    log = launch.worker_log(0)
    assert error_lines(log) == [survivor_line], log[-3000:]
    assert "Traceback" not in log
    assert launch.seconds_to_stop(0) < bound_s
    assert not list((launch.out / "save").iterdir())   # no model, no temp file


def test_a_failing_rank_stops_the_other_with_its_message(launches):
    launch = launches["fail"]
    assert all(code != 0 for code in launch.wait())
    assert error_lines(launch.worker_log(1)) == ["error: cannot read image broken.png: not a PNG file"]
    # the survivor looks at the store between its batches (the job's poll interval), so it stops soon after
    assert_stopped_cleanly(launch, "error: rank 0 of 2: stopping, rank 1 failed during training shard: "
                                   "cannot read image broken.png: not a PNG file", bound_s=3.0)


def test_a_killed_rank_stops_the_writer_and_leaves_no_temp_file(launches):
    launch = launches["killed"]
    assert all(code != 0 for code in launch.wait())
    # the launcher polls its processes every second, then sends SIGTERM
    assert_stopped_cleanly(launch, "error: rank 0 of 2: stopped by the launcher (another rank failed, "
                                   "or the job was cancelled)", bound_s=5.0)


def test_a_rank_lost_on_another_machine_is_noticed_by_its_silence(launches):
    launch = launches["remote"]
    codes = launch.wait()
    assert codes[0] != 0 and codes[1] != 0
    # no launcher tells this one: the heartbeat (3 s of silence here, checked every second) does
    assert_stopped_cleanly(launch, "error: rank 0 of 2: stopping, rank 1 stopped responding during "
                                   "training shard (no heartbeat for 3 s)", bound_s=3.0 + 4.0)


class FakeStore:
    """The launcher's key-value store, in memory: counters by ``add``, no other rank behind it."""

    def __init__(self):
        self.counts = {}

    def add(self, key, amount):
        self.counts[key] = self.counts.get(key, 0) + amount
        return self.counts[key]


def test_a_rank_that_never_beat_is_given_up_after_the_silence(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(distributed, "_store", FakeStore)
    monkeypatch.setattr(distributed.time, "monotonic", lambda: clock[0])
    monkeypatch.setitem(distributed._STATE, "peer_silence_s", 3.0)
    monkeypatch.setattr(distributed, "_HEARTBEATS", {})
    waiting = distributed._Step("training shard", distributed.Context(0, 2, True), None)
    for elapsed in (0.0, 1.5, 3.0):   # rank 1 has not reported and its beat count stays 0
        clock[0] = 1000.0 + elapsed
        waiting.check_alive()
    clock[0] = 1004.5
    with pytest.raises(distributed.PeerFailure, match="rank 1 sent no heartbeat during training shard"):
        waiting.check_alive()


def test_the_fit_is_finalized_inside_a_step_so_other_ranks_learn_why_it_failed(demo_root, monkeypatch):
    """Rank 0's finalize and calibration run in ``finalize_on_rank0`` (whose failure the other
    ranks report with rank 0's message), not after the ranks have parted."""
    from datasets.mvtec import MVTecDataset
    from models import padim, pipeline

    inside = []
    real_finalize_on_rank0 = distributed.finalize_on_rank0

    def recording_finalize_on_rank0(work, name="writing the model", timeout_s=None, ranks=None):
        inside.append(name)
        try:
            return real_finalize_on_rank0(work, name, timeout_s, ranks)
        finally:
            inside.pop()

    def failing_finalize(self, eps=padim.DEFAULT_EPS):
        raise RuntimeError(f"finalize ran within: {inside}")

    monkeypatch.setattr(distributed, "finalize_on_rank0", recording_finalize_on_rank0)
    monkeypatch.setattr(padim.GaussianFit, "finalize", failing_finalize)
    train = MVTecDataset(demo_root, "demo", "train", 40, 32)
    train.samples = train.samples[:3]
    with pytest.raises(RuntimeError, match=r"finalize ran within: \['finalizing the fit'\]"):
        pipeline.fit_padim(train, "mobilenet_v2", "imagenet", d=8, batch_size=3, num_workers=1, progress=False,
                           print_freq=0, static_graph=False, ranks=distributed.SINGLE)
