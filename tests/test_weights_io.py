"""Reading weight files: every format, and every way a file can be bad or unsafe."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest

from lipnorm.weights_io import WeightFileError, load_weights

RNG = np.random.default_rng(0)
FC = RNG.standard_normal((4, 3)).astype(np.float32)
BIAS = RNG.standard_normal(4)
CONV = RNG.standard_normal((2, 3, 3, 3)).astype(np.float32)


class RunsCode:
    """An object whose unpickling would run code: a marker file is written if it ever is."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_npy_is_named_after_the_file(tmp_path):
    path = tmp_path / "fc.npy"
    np.save(path, FC)
    tensors = load_weights(path)
    assert list(tensors) == ["fc"]
    np.testing.assert_array_equal(tensors["fc"], FC)
    assert tensors["fc"].dtype == np.float32
    np.testing.assert_array_equal(load_weights(path, key="fc")["fc"], FC)


def test_npz_reads_all_arrays_in_order_or_one_by_key(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(path, fc=FC, bias=BIAS, conv=CONV)
    tensors = load_weights(path)
    assert list(tensors) == ["fc", "bias", "conv"]
    np.testing.assert_array_equal(tensors["conv"], CONV)
    only = load_weights(path, key="bias")
    assert list(only) == ["bias"]
    np.testing.assert_array_equal(only["bias"], BIAS)


def test_npy_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(WeightFileError, match="refused: it stores Python objects"):
        load_weights(path)


def test_npz_with_pickled_objects_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "objects.npz"
    np.savez(path, fc=FC, evil=np.array([RunsCode(str(marker))], dtype=object))
    with pytest.raises(WeightFileError, match="refused: it stores Python objects"):
        load_weights(path)
    assert not marker.exists()


def test_pickle_file_named_npz_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "w.npz"
    path.write_bytes(pickle.dumps(RunsCode(str(marker))))
    with pytest.raises(WeightFileError, match="refused"):
        load_weights(path)
    assert not marker.exists()


def test_npy_file_that_is_not_npy(tmp_path):
    path = tmp_path / "w.npy"
    path.write_bytes(b"hello, not an array")
    with pytest.raises(WeightFileError, match="not a .npy file"):
        load_weights(path)


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_truncated_numpy_files(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    (np.save if suffix == ".npy" else np.savez)(path, FC)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="not a readable NumPy file"):
        load_weights(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(WeightFileError, match="no such file"):
        load_weights(tmp_path / "absent.npy")
    with pytest.raises(WeightFileError, match="not a file"):
        load_weights(tmp_path)


def test_unsupported_suffix_names_the_supported_ones(tmp_path):
    path = tmp_path / "w.h5"
    path.write_bytes(b"\x89HDF")
    with pytest.raises(WeightFileError, match=r"unsupported file type '\.h5'; lipnorm reads \.npy"):
        load_weights(path)


def test_missing_key_lists_the_names_in_the_file(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(path, fc=FC, bias=BIAS)
    with pytest.raises(WeightFileError, match=r"no tensor named 'fc2'; its tensors are 'fc', 'bias'$"):
        load_weights(path, key="fc2")
    npy = tmp_path / "fc.npy"
    np.save(npy, FC)
    with pytest.raises(WeightFileError, match=r"no tensor named 'w'; its tensors are 'fc'"):
        load_weights(npy, key="w")


def test_missing_key_list_is_shortened(tmp_path):
    path = tmp_path / "many.npz"
    np.savez(path, **{f"t{i}": BIAS for i in range(25)})
    with pytest.raises(WeightFileError, match=r"'t9' and 15 more$"):
        load_weights(path, key="nope")


# --- safetensors: files written by the safetensors library, read back through it ---


def test_safetensors_all_dtypes_match_the_reference_writer(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    arrays = {
        "f64": RNG.standard_normal((3, 2)),
        "f32": FC,
        "f16": FC.astype(np.float16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "u8": np.arange(4, dtype=np.uint8),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    path = tmp_path / "w.safetensors"
    safetensors_numpy.save_file(arrays, str(path), metadata={"format": "np"})
    tensors = load_weights(path)
    assert sorted(tensors) == sorted(arrays)
    for name, array in arrays.items():
        assert tensors[name].dtype == array.dtype, name
        np.testing.assert_array_equal(tensors[name], array)
    np.testing.assert_array_equal(load_weights(path, key="f16")["f16"], arrays["f16"])


def test_safetensors_bfloat16_is_widened_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    safetensors_torch.save_file({"w": weight}, str(path))
    array = load_weights(path)["w"]
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, weight.float().numpy())


def _safetensors_bytes(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize(
    "content",
    [
        b"\x01\x02",
        _safetensors_bytes(b'{"w": {}}')[:-3],
        (10**9).to_bytes(8, "little") + b"{}",
        _safetensors_bytes(b"[1, 2]"),
        _safetensors_bytes(b"{not json"),
        _safetensors_bytes(b'{"w": {"dtype": "F32"}}'),
        _safetensors_bytes(b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}', bytes(12)),
        _safetensors_bytes(b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}', bytes(12)),
    ],
    ids=["tiny", "short-header", "huge-header", "json-list", "bad-json", "entry-fields",
         "offsets-vs-shape", "short-data"],
)
def test_corrupt_safetensors(tmp_path, content):
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightFileError, match="not a valid .safetensors file, or truncated"):
        load_weights(path)


def test_safetensors_missing_key(tmp_path):
    path = tmp_path / "w.safetensors"
    header = b'{"__metadata__": {"a": "b"}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    path.write_bytes(_safetensors_bytes(header, bytes(4)))
    np.testing.assert_array_equal(load_weights(path)["w"], np.zeros(1, np.float32))
    with pytest.raises(WeightFileError, match=r"no tensor named 'v'; its tensors are 'w'$"):
        load_weights(path, key="v")


# --- PyTorch checkpoints ---


def test_pt_state_dict_nested_names_and_dtypes(tmp_path):
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Conv1d(4, 2, 3))
    checkpoint = {"epoch": 3, "model": model.state_dict(), "history": [torch.ones(2)]}
    path = tmp_path / "ckpt.pt"
    torch.save(checkpoint, path)
    tensors = load_weights(path)
    assert list(tensors) == ["model.0.weight", "model.0.bias", "model.1.weight", "model.1.bias", "history.0"]
    assert isinstance(tensors["model.0.weight"], torch.Tensor)
    torch.testing.assert_close(tensors["model.0.weight"], model[0].weight.detach())
    assert list(load_weights(path, key="model.1.weight")) == ["model.1.weight"]


def test_pt_bare_tensor_and_pth_suffix(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "w.pth"
    weight = torch.randn(3, 3, dtype=torch.bfloat16)
    torch.save(weight, path)
    loaded = load_weights(path)["tensor"]
    assert loaded.dtype == torch.bfloat16
    torch.testing.assert_close(loaded, weight)


def test_pt_whose_loading_would_run_code_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2, 2), "payload": RunsCode(str(marker))}, path)
    with pytest.raises(
        WeightFileError, match=r"refused: loading it would run code from the file \(it references (builtins|io)\.open\)"
    ):
        load_weights(path)
    assert not marker.exists()


def test_pickled_model_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(WeightFileError, match="save model.state_dict\\(\\) instead of the model"):
        load_weights(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04 truncated zip"])
def test_unreadable_pt(tmp_path, content):
    pytest.importorskip("torch")
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(WeightFileError, match="not a readable PyTorch file"):
        load_weights(path)


def test_truncated_pt(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="not a readable PyTorch file"):
        load_weights(path)


def test_pt_without_torch_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    path.write_bytes(b"anything")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(WeightFileError, match=r"needs PyTorch: pip install 'lipnorm\[torch\]'"):
        load_weights(path)
