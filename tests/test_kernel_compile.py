"""Every CUDA kernel compiles with NVRTC, with exactly the options the runtime loader passes.

NVRTC comes from the pip packages ``cuda-python`` (``cuda.bindings.nvrtc``) and
``nvidia-cuda-nvrtc``; no GPU is needed. The sources are also checked against the model
registry of :mod:`stemgpu.atoms.models` without any compiler.
"""

from __future__ import annotations

import re

import pytest

from stemgpu.atoms import models
from stemgpu.atoms.cuda import (
    ESTIMATOR_CODES,
    KERNEL_SOURCE,
    auto_compute_dtype,
    kernel_dir,
    kernel_name,
    name_expressions,
    nvrtc_options,
    read_source,
)


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError:  # older cuda-python layout
        try:
            from cuda import nvrtc
        except ImportError:
            pytest.skip("cuda-python (NVRTC bindings) is not installed")
    return nvrtc


def _check(nvrtc, result):
    err, *rest = result
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"NVRTC call failed: {err}"
    return rest[0] if len(rest) == 1 else rest


#: Options CuPy's RawModule adds to the loader's own (CuPy 13/14 ``compiler.py``).
CUPY_ADDED_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


def _compile(arch, extra=()):
    """Compile lm_fit.cu with the loader's options for ``arch``; returns (log, lowered names)."""
    nvrtc = _nvrtc()
    src = read_source(KERNEL_SOURCE).encode()
    prog = _check(nvrtc, nvrtc.nvrtcCreateProgram(src, KERNEL_SOURCE.encode(), 0, [], []))
    try:
        for name in name_expressions():
            _check(nvrtc, nvrtc.nvrtcAddNameExpression(prog, name.encode()))
        opts = [o.encode() for o in (*nvrtc_options(), *extra)]
        opts.append(f"--gpu-architecture={arch}".encode())
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = _check(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog))
        log = b" " * size
        _check(nvrtc, nvrtc.nvrtcGetProgramLog(prog, log))
        log = log.decode(errors="replace").rstrip("\x00 ")
        assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"{arch}: compilation failed:\n{log}"
        lowered = {}
        for name in name_expressions():
            low = _check(nvrtc, nvrtc.nvrtcGetLoweredName(prog, name.encode()))
            lowered[name] = low.decode() if isinstance(low, bytes) else str(low)
        cubin_size = _check(nvrtc, nvrtc.nvrtcGetCUBINSize(prog))
        return log, lowered, cubin_size
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@pytest.mark.parametrize("extra", [(), CUPY_ADDED_OPTIONS], ids=["loader", "loader+cupy"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_90"])  # A100, RTX A-series, H100
def test_kernels_compile_with_nvrtc(arch, extra):
    log, lowered, cubin_size = _compile(arch, extra)
    assert "warning" not in log.lower(), log
    assert len(lowered) == len(name_expressions()) == 12
    # every specialisation is a distinct mangled kernel carrying its name
    assert len(set(lowered.values())) == len(lowered)
    assert all("lm_fit_kernel" in low for low in lowered.values())
    assert cubin_size > 0


def test_name_expressions_cover_registry():
    structs = {m.cuda_struct for m in models.MODELS.values()}
    assert len(structs) == len(models.MODELS)
    assert {n.split(", ")[2] for n in name_expressions()} == structs
    assert kernel_name("gaussian", "mle", "float32", "float32") == (
        "stemgpu::lm_fit_kernel<float, float, stemgpu::Gaussian, 0>")
    with pytest.raises(ValueError, match=r"model='lorentz' has no CUDA kernel; accepted"):
        kernel_name("lorentz", "mle", "float32", "float32")
    with pytest.raises(ValueError, match=r"estimator must be one of 'mle', 'lsq'; got 'l1'"):
        kernel_name("gaussian", "l1", "float32", "float32")
    with pytest.raises(ValueError, match=r"dtypes \('float64', 'float32'\) are not"):
        kernel_name("gaussian", "mle", "float64", "float32")


def test_model_headers_match_registry():
    """One ``model_<name>.cuh`` per registered model, declaring the registry's parameters."""
    for name, mdl in models.MODELS.items():
        path = kernel_dir() / f"model_{name}.cuh"
        assert path.is_file(), f"missing {path.name}"
        text = path.read_text()
        decl = re.search(r'NAME = "(\w+)";\s+static constexpr const char\* PARAMS = "([\w,]+)";',
                         text)
        assert decl and decl.group(1) == name
        assert tuple(p.strip() for p in decl.group(2).split(",")) == mdl.param_names
        assert re.search(rf"^struct {mdl.cuda_struct.split('::')[-1]} {{", text, re.M), name
        assert f'#include "model_{name}.cuh"' in read_source("models.cuh")
        assert re.search(rf"static constexpr int P = {mdl.n_params};", text)
        for field, value in (("AMP", mdl.amplitude), ("ROW", mdl.position[0]),
                             ("COL", mdl.position[1]), ("BKG", mdl.background),
                             ("NW", len(mdl.widths)),
                             ("ANGLE", -1 if mdl.angle is None else mdl.angle)):
            assert re.search(rf"static constexpr int {field} = {value};", text), (name, field)
    assert sorted(p.name for p in kernel_dir().glob("model_*.cuh")) == sorted(
        f"model_{n}.cuh" for n in models.MODELS)


def test_status_codes_in_source_match_registry():
    text = read_source("common.cuh")
    for name, code in (("CONVERGED", models.CONVERGED), ("MAX_ITER", models.MAX_ITER),
                       ("SINGULAR", models.SINGULAR), ("OUT_OF_BOUNDS", models.OUT_OF_BOUNDS),
                       ("DIVERGED", models.DIVERGED), ("FLAT", models.FLAT),
                       ("INVALID_INPUT", models.INVALID_INPUT)):
        assert re.search(rf"ST_{name} = {code};", text), name


def test_estimator_codes_in_source_match_registry():
    text = read_source("common.cuh")
    assert tuple(ESTIMATOR_CODES) == models.ESTIMATORS
    for name, code in ESTIMATOR_CODES.items():
        assert re.search(rf"EST_{name.upper()} = {code};", text), name


def test_loader_options_are_the_tested_ones():
    opts = nvrtc_options()
    assert f"-I{kernel_dir()}" in opts
    assert not any("fast-math" in o or "fmad" in o for o in opts)


@pytest.mark.parametrize("props,expected", [
    ({"name": b"NVIDIA H100 80GB HBM3", "major": 9, "minor": 0,
      "singleToDoublePrecisionPerfRatio": 2}, "float64"),
    ({"name": b"NVIDIA H200", "major": 9, "minor": 0,
      "singleToDoublePrecisionPerfRatio": 2}, "float64"),
    ({"name": b"NVIDIA A100-SXM4-80GB", "major": 8, "minor": 0,
      "singleToDoublePrecisionPerfRatio": 2}, "float64"),
    ({"name": b"NVIDIA RTX A6000", "major": 8, "minor": 6,
      "singleToDoublePrecisionPerfRatio": 32}, "float32"),
    ({"name": b"NVIDIA GeForce RTX 4090", "major": 8, "minor": 9,
      "singleToDoublePrecisionPerfRatio": 64}, "float32"),
    ({"name": b"Tesla T4", "major": 7, "minor": 5,
      "singleToDoublePrecisionPerfRatio": 32}, "float32"),
    # no ratio reported (0 or missing): the compute capability decides
    ({"major": 9, "minor": 0, "singleToDoublePrecisionPerfRatio": 0}, "float64"),
    ({"major": 7, "minor": 0}, "float64"),
    ({"major": 8, "minor": 6}, "float32"),
    ({"major": 12, "minor": 0}, "float32"),
    ({}, "float32"),
])
def test_auto_compute_dtype_from_device_properties(props, expected):
    assert auto_compute_dtype(props) == expected
