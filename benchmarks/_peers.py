"""Peer quantizers driven as their documentation recommends, for side-by-side benchmarks.

Only the peers' public APIs are called here; nothing of their code is copied.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx


@contextlib.contextmanager
def _scratch_cwd():
    """Run a peer tool inside a temporary working directory: ORT's quant_pre_process and the
    external-data writers of large models drop scratch files (sym_shape_infer_temp.onnx, *.data)
    into the current directory."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(old)


def _feeds(model: onnx.ModelProto, batches: Sequence) -> list[dict[str, np.ndarray]]:
    names = [i.name for i in model.graph.input]
    return [dict(zip(names, x if isinstance(x, tuple) else (x,))) for x in batches]


def ort_quantize_static(fp32: onnx.ModelProto, batches: Sequence, op_types: list[str] | None = None) -> onnx.ModelProto:
    """ONNX Runtime's quantize_static: quant_pre_process, then QDQ, per-channel, MinMax, its default types."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds = _feeds(fp32, batches)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    with _scratch_cwd(), tempfile.TemporaryDirectory() as tmp:
        src, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "q.onnx")
        onnx.save(fp32, src)
        try:
            quant_pre_process(str(src), str(pre))
        except Exception:  # its symbolic shape inference gives up on some exported transformers
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=op_types)
        return onnx.load(out)


def ort_quantize_dynamic(fp32: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's quantize_dynamic, per-channel int8 weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _scratch_cwd(), tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "fp32.onnx"), Path(tmp, "q.onnx")
        onnx.save(fp32, src)
        quantize_dynamic(str(src), str(out), per_channel=True, weight_type=QuantType.QInt8)
        return onnx.load(out)


def nncf_quantize(fp32: onnx.ModelProto, batches: Sequence, transformer: bool = False) -> onnx.ModelProto | None:
    """NNCF's post-training quantization of an ONNX model (None when nncf is not installed)."""
    try:
        import nncf
    except ImportError:
        return None
    feeds = _feeds(fp32, batches)
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    with _scratch_cwd():
        return nncf.quantize(fp32, nncf.Dataset(feeds), subset_size=len(feeds), **kwargs)  # items are batches
