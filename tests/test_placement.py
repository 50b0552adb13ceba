"""Device / dtype / model-path mistakes are caught once, by `xgenmm.placement` and `resolve_model_dir`, as typed
errors that say what to do (never torch's AssertionError or a raw ValueError)."""

from __future__ import annotations

import pickle

import pytest
import torch

import xgenmm
from xgenmm import (ConfigError, DeviceError, DtypeError, ModelNotFoundError, Placement, SamplingParamsError,
                    XGenMMError, resolve_device, resolve_dtype, resolve_placement)
from xgenmm.checkpoint import resolve_model_dir
from xgenmm.cpu_features import cpu_computes_bf16, cpu_features

CUDA = torch.cuda.is_available()


def test_every_public_error_is_exported_and_an_xgenmm_error():
    from xgenmm import errors

    for name in errors.__all__:
        cls = getattr(xgenmm, name)
        assert cls is getattr(errors, name) and issubclass(cls, XGenMMError), name
        assert name in xgenmm.__all__
    assert issubclass(DeviceError, ConfigError) and issubclass(DtypeError, ConfigError)


def test_sampling_params_error_carries_its_field_across_pickling():
    err = pickle.loads(pickle.dumps(SamplingParamsError("top_p must be in (0, 1]", field="top_p")))
    assert err.field == "top_p" and str(err) == "top_p must be in (0, 1]"
    assert SamplingParamsError("x").field is None


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without a usable CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "CUDA", torch.device("cuda")])
def test_cuda_without_cuda_says_use_cpu(device):
    with pytest.raises(DeviceError, match='use device="cpu"'):
        resolve_device(device)
    with pytest.raises(DeviceError):
        resolve_placement(device, "float32")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "", "mps", "meta", 0, 1.5])
def test_unknown_devices_list_the_accepted_forms(device):
    with pytest.raises(DeviceError, match='"cpu", "cuda", "cuda:N"'):
        resolve_device(device)


def test_devices_resolve_to_concrete_devices():
    assert resolve_device("cpu") == resolve_device(" CPU ") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    default = resolve_device(None)
    assert default == (torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu"))
    if CUDA:
        assert resolve_device("cuda").index == torch.cuda.current_device()
        with pytest.raises(DeviceError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("dtype", ["fp8", "float64", "int8", "", torch.float64, torch.int8, 16])
def test_unknown_dtypes_name_the_allowed_values(dtype):
    with pytest.raises(DtypeError, match="auto, float32, bfloat16, float16"):
        resolve_dtype(dtype, None, torch.device("cpu"))


@pytest.mark.parametrize(("name", "expected"), [
    ("float32", torch.float32), ("fp32", torch.float32), ("BF16", torch.bfloat16), ("bfloat16", torch.bfloat16),
    ("half", torch.float16), ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_dtype_names_and_aliases(name, expected):
    assert resolve_dtype(name, None, torch.device("cpu")) == expected


def test_auto_dtype_follows_the_cpu_probe():
    expected = torch.bfloat16 if cpu_computes_bf16() else torch.float32
    assert resolve_dtype(None, None, torch.device("cpu")) == resolve_dtype("auto", None, "cpu") == expected
    assert resolve_dtype("auto", None, torch.device("cuda")) == torch.bfloat16  # CUDA: bf16 without probing
    features = cpu_features()
    native = features.avx512_bf16 or features.amx_tile
    assert cpu_computes_bf16() == (native and features.onednn_bf16)
    assert cpu_computes_bf16() == (bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
                                   and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def test_placement_combines_both():
    placement = resolve_placement("cpu", "bf16")
    assert placement == Placement(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(DtypeError):
        resolve_placement("cpu", "fp8")


@pytest.mark.parametrize("model", ["./missing/dir", "../missing-model", "/no/such/model", "~/no-such-model-dir",
                                   "tests/no-such-model"])
def test_a_missing_local_path_says_so_without_a_download_hint(model):
    with pytest.raises(ModelNotFoundError, match="no model directory at") as info:
        resolve_model_dir(model)
    assert "download" not in str(info.value)


def test_a_file_is_not_a_model_directory(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model_dir(tmp_path / "model.bin")


def test_what_counts_as_a_local_path(tmp_path, monkeypatch):
    from xgenmm.checkpoint import DEFAULT_MODEL_ID, is_local_path

    monkeypatch.chdir(tmp_path)
    assert not is_local_path(DEFAULT_MODEL_ID)  # owner/name with no folder `owner` here: a Hugging Face id
    for path in ("./x", "../x", "/x", "~/x", "a\\b", "./x/y"):
        assert is_local_path(path), path
    (tmp_path / "Salesforce").mkdir()
    assert is_local_path(DEFAULT_MODEL_ID)  # now the parent folder exists: meant as a path
