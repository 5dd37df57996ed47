"""Reading weight files: every format, and every way a file can be bad or unsafe."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lipnorm.weights_io import WeightFileError, load_weights, open_weights

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


def test_missing_file_and_directory_without_shards(tmp_path):
    with pytest.raises(WeightFileError, match="no such file"):
        load_weights(tmp_path / "absent.npy")
    np.save(tmp_path / "fc.npy", FC)
    with pytest.raises(WeightFileError, match="a directory without .safetensors files or a "
                       r"\*\.safetensors\.index\.json"):
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
    stored = open_weights(path)
    tensors = load_weights(path)
    assert sorted(tensors) == sorted(arrays)
    for name, array in arrays.items():
        assert stored[name].dtype == array.dtype.name and stored[name].shape == array.shape, name
        # float16 is widened to float32, which is exact; the rest reads as stored.
        assert tensors[name].dtype == (np.float32 if name == "f16" else array.dtype), name
        np.testing.assert_array_equal(tensors[name], array)
    np.testing.assert_array_equal(load_weights(path, key="f16")["f16"], arrays["f16"])


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
    assert open_weights(path)["tensor"].dtype == "bfloat16"
    loaded = load_weights(path)["tensor"]
    assert loaded.dtype == torch.float32  # widened, exactly
    torch.testing.assert_close(loaded, weight.float(), rtol=0, atol=0)


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


# --- low-precision dtypes, read exactly through ml_dtypes or torch ---

LOW_PRECISION = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"]


def _save_torch_safetensors(path, tensors):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({name: t.contiguous() for name, t in tensors.items()}, str(path))


@pytest.mark.parametrize("reader", ["ml_dtypes", "torch"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_safetensors_read_exactly_and_keep_their_dtype(tmp_path, monkeypatch, dtype,
                                                                     reader):
    torch = pytest.importorskip("torch")
    values = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)) * 4
    weight = values.to(getattr(torch, dtype))
    path = tmp_path / "w.safetensors"
    _save_torch_safetensors(path, {"w": weight, "b": torch.ones(3)})
    if reader == "torch":
        monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` raises
    else:
        pytest.importorskip("ml_dtypes")
    stored = open_weights(path)["w"]
    assert (stored.dtype, stored.shape, stored.is_floating) == (dtype, (7, 5), True)
    array = stored.read()
    assert isinstance(array, np.ndarray) and array.dtype == np.float32
    np.testing.assert_array_equal(array, weight.float().numpy())


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_every_bit_pattern_reads_as_torch_reads_it(tmp_path, dtype):
    """ml_dtypes' values of all 2**16 (2**8) codes, NaN and infinities included, are torch's."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    bits = 16 if dtype == "bfloat16" else 8
    codes = torch.arange(2**bits, dtype=torch.int32).to(torch.int16 if bits == 16 else torch.uint8)
    weight = codes.view(getattr(torch, dtype)).reshape(2 ** (bits // 2), -1)
    path = tmp_path / "all.safetensors"
    _save_torch_safetensors(path, {"w": weight})
    np.testing.assert_array_equal(load_weights(path)["w"], weight.float().numpy())


def test_low_precision_without_ml_dtypes_or_torch_names_the_fix(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    path = tmp_path / "w.safetensors"
    _save_torch_safetensors(path, {"w": torch.ones(2, 2, dtype=torch.bfloat16)})
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(WeightFileError, match=r"w\.safetensors: tensor 'w' is bfloat16, which NumPy "
                       r"cannot hold; reading it needs ml_dtypes or torch: pip install 'lipnorm\[cli\]'"):
        load_weights(path)


def _raw_safetensors(path, entries):
    """A .safetensors file written byte by byte: ``entries`` maps name to (dtype code, shape, bytes)."""
    header, data = {}, b""
    for name, (code, shape, payload) in entries.items():
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    path.write_bytes(_safetensors_bytes(json.dumps(header).encode(), data))


def test_a_dtype_lipnorm_cannot_read_is_an_error_naming_the_tensor(tmp_path):
    pytest.importorskip("safetensors")
    path = tmp_path / "mx.safetensors"
    _raw_safetensors(path, {"ok": ("F32", (1,), bytes(4)), "w": ("F8_E8M0", (2, 2), bytes(4))})
    with pytest.raises(WeightFileError, match=r"mx\.safetensors: tensor 'w' has dtype F8_E8M0, "
                       "which lipnorm cannot read"):
        open_weights(path)


def test_tensors_are_read_when_asked_for(tmp_path):
    """open_weights reads headers only: a file cut after opening fails at read, in one line."""
    pytest.importorskip("safetensors")
    path = tmp_path / "w.safetensors"
    _raw_safetensors(path, {"a": ("F32", (2, 2), np.eye(2, dtype=np.float32).tobytes()),
                            "b": ("BF16", (2, 2), bytes(8))})
    tensors = open_weights(path)
    path.write_bytes(path.read_bytes()[:-6])
    for name in ("a", "b"):
        with pytest.raises(WeightFileError, match=rf"w\.safetensors: tensor '{name}' could not be read"):
            tensors[name].read()


# --- quantized checkpoints: scales are applied, packed integers are named and left alone ---


def _fp8(torch, shape, seed=0):
    values = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 100
    return values.clamp(-448, 448).to(torch.float8_e4m3fn)


def test_block_scales_dequantize_to_the_models_matrix(tmp_path):
    """DeepSeek-V3 layout: one weight_scale_inv per 128×128 block, rows and columns not multiples."""
    torch = pytest.importorskip("torch")
    weight = _fp8(torch, (300, 200))
    scale = torch.rand(3, 2, generator=torch.Generator().manual_seed(1)) + 0.5
    path = tmp_path / "fp8.safetensors"
    _save_torch_safetensors(path, {"proj.weight": weight, "proj.weight_scale_inv": scale})
    tensors = open_weights(path)
    assert list(tensors) == ["proj.weight"]  # the scale is part of the weight
    stored = tensors["proj.weight"]
    assert stored.dtype == "float8_e4m3fn" and stored.is_floating
    assert stored.dequantized == "× weight_scale_inv per 128×128 block"
    blocks = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    np.testing.assert_array_equal(stored.read(), (weight.float() * blocks).numpy())


@pytest.mark.parametrize(("scale_shape", "layout"), [((), "per tensor"), ((1,), "per tensor"),
                                                     ((6, 1), "per row"), ((6,), "per row")])
@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "int8"])
def test_compressed_tensors_scales(tmp_path, scale_shape, layout, dtype):
    torch = pytest.importorskip("torch")
    if dtype == "int8":
        weight = torch.randint(-128, 128, (6, 4), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    else:
        weight = _fp8(torch, (6, 4))
    scale = (torch.arange(1, 7, dtype=torch.float32) / 8).reshape(-1, 1)
    scale = scale[:1].reshape(scale_shape) if layout == "per tensor" else scale.reshape(scale_shape)
    path = tmp_path / "ct.safetensors"
    _save_torch_safetensors(path, {"fc.weight": weight, "fc.weight_scale": scale.to(torch.bfloat16),
                                   "fc.input_scale": torch.ones(1)})
    tensors = open_weights(path)
    assert sorted(tensors) == ["fc.input_scale", "fc.weight"]
    assert tensors["fc.weight"].dequantized == f"× weight_scale {layout}"
    assert tensors["fc.weight"].is_floating
    expected = weight.float() * scale.to(torch.bfloat16).float().reshape(-1 if layout == "per row" else 1, 1)
    np.testing.assert_array_equal(tensors["fc.weight"].read(), expected.numpy())


def test_a_scale_of_no_known_layout_is_an_error_naming_both_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "fp8.safetensors"
    _save_torch_safetensors(path, {"w": _fp8(torch, (300, 200)), "w_scale_inv": torch.ones(2, 2)})
    with pytest.raises(WeightFileError, match=r"fp8\.safetensors: scale 'w_scale_inv' has shape \(2, 2\), "
                       r"which fits no layout lipnorm reads for 'w' of shape \(300, 200\)"):
        open_weights(path)


def test_a_float_weight_keeps_its_own_values_beside_a_scale(tmp_path):
    """Only float8 and int8 weights are scaled: a float32 tensor and a *_scale are two tensors."""
    path = tmp_path / "w.npz"
    np.savez(path, w=FC, w_scale=np.float32(2.0))
    tensors = open_weights(path)
    assert sorted(tensors) == ["w", "w_scale"] and tensors["w"].dequantized is None
    np.testing.assert_array_equal(tensors["w"].read(), FC)


def test_packed_integer_quantizations_are_named_and_left_alone(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "gptq.safetensors"
    _save_torch_safetensors(path, {
        "q.qweight": torch.zeros(16, 64, dtype=torch.int32), "q.qzeros": torch.zeros(1, 8, dtype=torch.int32),
        "q.scales": torch.ones(1, 64, dtype=torch.float16), "q.g_idx": torch.zeros(128, dtype=torch.int32),
        "ct.weight_packed": torch.zeros(64, 16, dtype=torch.int32), "ct.weight_scale": torch.ones(64, 1),
        "ct.weight_shape": torch.tensor([64, 128]), "head.weight": torch.ones(4, 64),
    })
    tensors = open_weights(path)
    assert tensors["q.qweight"].unsupported == (
        "packed int32 quantization (GPTQ/AWQ qweight), which lipnorm does not unpack"
    )
    assert tensors["ct.weight_packed"].unsupported.startswith("packed int32 quantization (compressed-tensors")
    for name in ("q.qzeros", "q.scales", "q.g_idx"):
        assert tensors[name].unsupported == "part of q.qweight's packed quantization"
    for name in ("ct.weight_scale", "ct.weight_shape"):
        assert tensors[name].unsupported == "part of ct.weight_packed's packed quantization"
    assert tensors["head.weight"].unsupported is None


# --- sharded checkpoints: an index or a directory of shards is one model ---


def _sharded(tmp_path, index=True):
    """Two shards (and their index), as save_pretrained writes them."""
    shards = {
        "model-00001-of-00002.safetensors": {"layers.0.w": FC, "embed": CONV.reshape(2, -1)},
        "model-00002-of-00002.safetensors": {"layers.1.w": 2 * FC, "norm": BIAS},
    }
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    for name, arrays in shards.items():
        safetensors_numpy.save_file(arrays, str(tmp_path / name))
    weight_map = {"embed": "model-00001-of-00002.safetensors", "layers.0.w": "model-00001-of-00002.safetensors",
                  "layers.1.w": "model-00002-of-00002.safetensors", "norm": "model-00002-of-00002.safetensors"}
    if index:
        (tmp_path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))
    return tmp_path / "model.safetensors.index.json", weight_map


@pytest.mark.parametrize("through", ["index", "directory"])
def test_an_index_or_its_directory_is_one_model(tmp_path, through):
    index, weight_map = _sharded(tmp_path)
    tensors = open_weights(index if through == "index" else tmp_path)
    assert list(tensors) == list(weight_map)
    for name, shard in weight_map.items():
        assert tensors[name].file == tmp_path / shard
    np.testing.assert_array_equal(tensors["layers.1.w"].read(), 2 * FC)
    np.testing.assert_array_equal(load_weights(index, key="embed")["embed"], CONV.reshape(2, -1))


def test_a_directory_of_shards_without_index(tmp_path):
    _sharded(tmp_path, index=False)
    assert list(open_weights(tmp_path)) == ["embed", "layers.0.w", "layers.1.w", "norm"]
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    safetensors_numpy.save_file({"norm": BIAS}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(WeightFileError, match=r"model-00002-of-00002\.safetensors: tensor 'norm' is also "
                       r"in extra\.safetensors"):
        open_weights(tmp_path)


def test_bad_indexes(tmp_path):
    index, weight_map = _sharded(tmp_path)
    cases = [
        ({**weight_map, "head": "model-00003-of-00003.safetensors"},
         r"model\.safetensors\.index\.json: names shard 'model-00003-of-00003\.safetensors', which is missing"),
        ({**weight_map, "head": "model-00001-of-00002.safetensors"},
         r"model-00001-of-00002\.safetensors: no tensor named 'head', which model\.safetensors\.index\.json "
         "places in this shard"),
        ({}, r"index\.json: not a safetensors index \(it needs a \"weight_map\""),
        ({"embed": 3}, r"index\.json: not a safetensors index"),
    ]
    for content, message in cases:
        index.write_text(json.dumps({"weight_map": content}))
        with pytest.raises(WeightFileError, match=message):
            open_weights(index)
    index.write_bytes(b"{\"weight_map\": ")
    with pytest.raises(WeightFileError, match=r"index\.json: not a readable JSON index"):
        open_weights(tmp_path)
    (tmp_path / "other.safetensors.index.json").write_text("{}")
    with pytest.raises(WeightFileError, match=r"holds 2 indexes \(model\.safetensors\.index\.json, "
                       r"other\.safetensors\.index\.json\); pass one of them"):
        open_weights(tmp_path)


# --- fuzzing: bytes mutated from valid files give a WeightFileError or tensors, nothing else ---


def _valid_files() -> dict[str, bytes]:
    """One small valid file per reader, written by each format's own library."""
    import io
    import tempfile

    files = {}
    buffer = io.BytesIO()
    np.savez(buffer, fc=FC, bias=BIAS)
    files[".npz"] = buffer.getvalue()
    buffer = io.BytesIO()
    np.save(buffer, FC)
    files[".npy"] = buffer.getvalue()
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"w": torch.from_numpy(FC), "w_bf16": torch.from_numpy(FC).bfloat16(),
               "q": torch.from_numpy(FC).to(torch.float8_e4m3fn), "q_scale_inv": torch.ones(1, 1),
               "ids": torch.arange(4)}
    files[".safetensors"] = safetensors_torch.save(tensors)
    with tempfile.TemporaryDirectory() as directory:
        path = f"{directory}/w.pt"
        torch.save({"model": {"fc.weight": torch.from_numpy(FC), "fc.bias": torch.from_numpy(BIAS)},
                    "step": 3}, path)
        with open(path, "rb") as file:
            files[".pt"] = file.read()
    return files


@st.composite
def _mutations(draw, length: int):
    """Up to four edits of a file of ``length`` bytes: overwrite, insert, delete or cut."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["overwrite", "insert", "delete", "cut"]))
        position = draw(st.integers(0, length))
        payload = draw(st.binary(min_size=1, max_size=8)) if kind in ("overwrite", "insert") else b""
        edits.append((kind, position, payload))
    return edits


def _mutated(data: bytes, edits) -> bytes:
    for kind, position, payload in edits:
        position = min(position, len(data))
        if kind == "overwrite":
            data = data[:position] + payload + data[position + len(payload):]
        elif kind == "insert":
            data = data[:position] + payload + data[position:]
        elif kind == "delete":
            data = data[:position] + data[position + 1:]
        else:
            data = data[:position]
    return data


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".npy", ".pt"])
def test_mutated_files_give_one_line_errors_naming_the_file(suffix):
    """Every mutation either reads (as tensors) or raises WeightFileError, in one line naming the file."""
    import tempfile

    valid = _valid_files()[suffix]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(edits=_mutations(len(valid)))
    def check(edits):
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / f"w{suffix}"
            path.write_bytes(_mutated(valid, edits))
            try:
                for tensor in open_weights(path).values():
                    tensor.read()
            except WeightFileError as exc:
                message = str(exc)
                assert "\n" not in message and message.startswith(f"{path}: "), message

    check()
