"""``castle-convert export-onnx DIR --output model.onnx``: ONNX with a dynamic batch axis, checked
against the PyTorch model in onnxruntime."""

from __future__ import annotations

import contextlib
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

import torch
from torch import nn


class OnnxExportError(RuntimeError):
    """Export failed, or onnxruntime disagrees with PyTorch beyond the tolerance."""


@dataclass
class OnnxResult:
    path: Path
    max_abs_diff: float
    tolerance: float
    batch: int
    input_shape: tuple[int, ...]
    output_name: str
    opset: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def format(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"wrote {self.path} (opset {self.opset}, input pixel_values {('batch',) + self.input_shape[1:]}, "
                f"output {self.output_name})\nonnxruntime parity at batch {self.batch}: max abs difference "
                f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:g}) {verdict}")


class _Exported(nn.Module):
    """Tensor in, tensor out: logits (classifiers) or the last hidden state (backbones)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from castle_convert import adapters
        from castle_convert.convert import primary_output
        return primary_output(adapters.forward(self.model, pixel_values))


@contextlib.contextmanager
def _static_position_embeddings(model: nn.Module) -> Iterator[None]:
    """transformers' DINOv2 embeddings always resample position embeddings while tracing (an
    antialiased bicubic op ONNX lacks); at the native size they are used as they are."""
    patched = []
    for m in model.modules():
        fn = getattr(m, "interpolate_pos_encoding", None)
        pos = getattr(m, "position_embeddings", None)
        if not callable(fn) or not isinstance(pos, torch.Tensor):
            continue

        def static(self, embeddings, height, width, _orig=fn):
            # transformers' own early return, minus its `not torch.jit.is_tracing()` condition
            if embeddings.shape[1] == self.position_embeddings.shape[1] and int(height) == int(width):
                return self.position_embeddings
            return _orig(embeddings, height, width)

        m.interpolate_pos_encoding = types.MethodType(static, m)
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.interpolate_pos_encoding


def _addcdiv_symbolic(g, self, tensor1, tensor2, value):
    """``self + value·tensor1/tensor2`` (the fused inference kernel uses addcdiv; the TorchScript
    exporter has no built-in symbolic for it)."""
    from torch.onnx import symbolic_helper
    out = g.op("Div", tensor1, tensor2)
    v = symbolic_helper._maybe_get_const(value, "f")
    if not isinstance(v, (int, float)) or v != 1:
        out = g.op("Mul", out, value)
    return g.op("Add", self, out)


def _register_symbolics(opset: int) -> None:
    torch.onnx.register_custom_op_symbolic("aten::addcdiv", _addcdiv_symbolic, opset)


def export_onnx(directory: Union[str, Path], output: Union[str, Path], *, opset: int = 17, atol: float = 1e-4,
                check_batch: int = 3, seed: int = 0) -> OnnxResult:
    """Export the model in ``directory`` to ONNX (batch axis dynamic: traced at batch 1) and
    compare onnxruntime with PyTorch on a random batch of ``check_batch`` images.

    Raises :class:`OnnxExportError` when the max abs difference exceeds ``atol`` (the result is
    attached as ``.result``); the ONNX file is kept for inspection.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    from castle_convert import adapters
    from castle_convert.export.load import load

    model = load(directory).float().eval()
    c, h, w = adapters.adapter_for(model).input_size(model)
    wrapped = _Exported(model).eval()
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OnnxExportError(f"cannot write {output}: {e.strerror or e} ({e.filename or output.parent}): choose "
                              "another --output") from None
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(1, c, h, w, generator=gen)
    with torch.no_grad():
        probe = adapters.forward(model, x1)
    classifier = getattr(probe, "logits", None) is not None or (isinstance(probe, torch.Tensor) and int(
        getattr(model, "num_classes", 0) or 0) > 0)
    out_name = "logits" if classifier else "features"
    try:
        with warnings.catch_warnings(), _static_position_embeddings(model), torch.no_grad():
            warnings.simplefilter("ignore")
            _register_symbolics(opset)
            torch.onnx.export(wrapped, (x1,), str(output), input_names=["pixel_values"], output_names=[out_name],
                              dynamic_axes={"pixel_values": {0: "batch"}, out_name: {0: "batch"}},
                              opset_version=opset, dynamo=False)
        onnx.checker.check_model(str(output))
    except Exception as e:  # noqa: BLE001 - exporter errors come in many types
        raise OnnxExportError(f"ONNX export of {directory} failed: {type(e).__name__}: {str(e)[:300]}") from e
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    x = torch.randn(check_batch, c, h, w, generator=gen)
    got = session.run(None, {"pixel_values": x.numpy()})[0]
    with torch.no_grad():
        ref = wrapped(x).numpy()
    if got.shape != ref.shape:
        raise OnnxExportError(f"onnxruntime returned shape {got.shape}, PyTorch {ref.shape}")
    diff = float(np.abs(got - ref).max())
    result = OnnxResult(path=output, max_abs_diff=diff, tolerance=atol, batch=check_batch,
                        input_shape=tuple(x.shape), output_name=out_name, opset=opset)
    if not result.ok:
        err = OnnxExportError(f"onnxruntime output differs from PyTorch: max abs difference {diff:.3g} > "
                              f"tolerance {atol:g} (file kept: {output})")
        err.result = result
        raise err
    return result

