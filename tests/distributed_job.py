"""A tiny job for tests/test_distributed.py, run under ``python -m paddle.distributed.launch``.

    distributed_job.py ok OUT       shard, sums, gather, broadcast, write on rank 0
    distributed_job.py fail OUT     rank 1 raises while streaming its shard
    distributed_job.py killed OUT   rank 1 is SIGKILLed while rank 0 writes the model
    distributed_job.py remote OUT   rank 1 (under another launcher, as on another machine) is
                                    SIGKILLed while rank 0 waits for it

The model goes to OUT/save/model.bin. Every rank writes what it computed, and when it failed
or stopped, under OUT (np.save, read back without pickle); the test compares that with its own
NumPy references. Errors end as one ``error:`` line, as utils/cli.py's run_cli does.
"""
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from models import distributed
from utils.files import temp_path_beside, write_atomically

TOTAL_ITEMS = 7
GRAM_SHAPE = (7, 5, 5)     # [P, d, d]
UNEVEN_ITEMS = [5, 1, 3]   # what rank 1 holds; rank 0 holds none


def rank_gram(rank: int) -> np.ndarray:
    return np.random.default_rng(100 + rank).standard_normal(GRAM_SHAPE)


def rank_embeddings(rank: int) -> np.ndarray:
    """[n_r, P, d] float64, a different count and offset per rank."""
    return np.random.default_rng(200 + rank).standard_normal((3 + 2 * rank, 4, 3)) + 5.0 * rank


def item_arrays(indices) -> dict:
    """Per-item results that encode the item's index, as an evaluation would produce them."""
    indices = np.asarray(indices, dtype=np.int64)
    grid = np.arange(12, dtype=np.float32).reshape(3, 4)
    return {"scores": (indices * 0.5).astype(np.float32),
            "labels": indices % 3,
            "maps": indices[:, None, None].astype(np.float32) * 100 + grid,
            "masks": (indices[:, None, None] + grid.astype(np.int64)) % 2 == 1}


def run_ok(out: Path, ctx) -> None:
    import paddle
    names = [f"good/{i:03d}.png" for i in range(TOTAL_ITEMS)]
    distributed.check_same_list(names, "test images")
    try:
        distributed.check_same_list(names[ctx.rank:], "training images")   # rank 1 misses one
        np.save(out / f"mismatch_seen_{ctx.rank}.npy", False)
    except ValueError:
        np.save(out / f"mismatch_seen_{ctx.rank}.npy", True)
    mine = distributed.shard(list(range(TOTAL_ITEMS)), ctx.rank, ctx.world_size)
    print(distributed.shard_line(len(mine), "items"), flush=True)
    np.save(out / f"shard_{ctx.rank}.npy", np.asarray(mine, dtype=np.int64))
    with distributed.step("work"):
        gram = rank_gram(ctx.rank)
        time.sleep(0.5 * ctx.rank)   # one rank arrives late: the others wait in the store
    # 3 rows of 25 float64 per chunk: chunks of 3, 3 and 1 positions
    np.save(out / f"gram_{ctx.rank}.npy", distributed.all_reduce_sum(gram, chunk_bytes=3 * 25 * 8))
    tensor = paddle.to_tensor(rank_gram(ctx.rank)[:, 0, :].astype(np.float32))        # [7, 5] float32
    np.save(out / f"tensor_{ctx.rank}.npy", distributed.all_reduce_sum(tensor, chunk_bytes=2 * 5 * 8).numpy())
    embeddings = rank_embeddings(ctx.rank)
    shift = embeddings[0]
    pooled = distributed.pooled_shift(len(embeddings), shift, (embeddings - shift).sum(axis=0))
    np.save(out / f"pooled_{ctx.rank}.npy", pooled)
    gathered = distributed.gather_to_rank0(item_arrays(mine), TOTAL_ITEMS, chunk_bytes=2 * 12 * 4)
    if ctx.rank == 0:
        for key, value in gathered.items():
            np.save(out / f"gathered_{key}.npy", value)
    else:
        assert gathered is None
    # items held unevenly (rank 0 none), out of order, along axis 1 as kept embeddings [P, k, d] are
    held = [] if ctx.rank == 0 else UNEVEN_ITEMS
    blocks = np.zeros((2, len(held), 3), np.float32) + np.asarray(held, np.float32)[None, :, None]
    uneven = distributed.gather_indexed_to_rank0({"embeddings": blocks}, held, axis=1, chunk_bytes=2 * 3 * 4)
    if ctx.rank == 0:
        np.save(out / "uneven_embeddings.npy", uneven[0]["embeddings"])
        np.save(out / "uneven_indices.npy", uneven[1])
    thresholds = distributed.broadcast_from_rank0(np.array([0.25, 4.0]) if ctx.rank == 0 else None)
    np.save(out / f"broadcast_{ctx.rank}.npy", thresholds)

    def write_slowly():
        time.sleep(1.0)   # the others wait at the step meanwhile
        write_model(out)

    distributed.finalize_on_rank0(write_slowly)
    # every rank returns only once the model is there
    np.save(out / f"model_seen_{ctx.rank}.npy", np.array([(out / "save" / "model.bin").read_bytes() == b"model"]))


def write_model(out: Path) -> None:
    write_atomically(out / "save" / "model.bin", lambda stream: stream.write(b"model"))


def run_fail(out: Path, ctx) -> None:
    with distributed.step("training shard") as progress:
        if ctx.rank == 1:
            time.sleep(1.0)
            np.save(out / "failed_at.npy", time.time())
            raise ValueError("cannot read image broken.png: not a PNG file")
        for batch in range(200):   # rank 0 streams batches and looks up between them
            progress.check()
            time.sleep(0.05)
    distributed.finalize_on_rank0(lambda: write_model(out))


def run_killed(out: Path, ctx) -> None:
    def write_slowly():
        with temp_path_beside(out / "save" / "model.bin") as temp_name:
            Path(temp_name).write_bytes(b"half a mod")
            time.sleep(60)   # the launcher's SIGTERM arrives here
            Path(temp_name).write_bytes(b"model")

    if ctx.rank == 1:
        time.sleep(1.0)
        np.save(out / "failed_at.npy", time.time())
        os.kill(os.getpid(), signal.SIGKILL)
    distributed.finalize_on_rank0(write_slowly)


def run_remote(out: Path, ctx) -> None:
    with distributed.step("training shard"):
        if ctx.rank == 1:
            time.sleep(1.0)
            np.save(out / "failed_at.npy", time.time())
            os.kill(os.getpid(), signal.SIGKILL)
    distributed.finalize_on_rank0(lambda: write_model(out))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    ctx = distributed.init(peer_silence_s=3.0 if mode == "remote" else distributed.DEFAULT_PEER_SILENCE_S)
    try:
        {"ok": run_ok, "fail": run_fail, "killed": run_killed, "remote": run_remote}[mode](out, ctx)
    except (ValueError, distributed.PeerFailure) as error:
        np.save(out / f"stopped_{ctx.rank}.npy", time.time())
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except SystemExit:   # the launcher's SIGTERM, through distributed.init's handler
        np.save(out / f"stopped_{ctx.rank}.npy", time.time())
        raise


if __name__ == "__main__":
    main()
