"""``castle-convert export-onnx DIR --output model.onnx``: ONNX with a dynamic batch axis and, where it
verifies, dynamic height and width, checked against the PyTorch model in onnxruntime.

A dynamic resolution goes through ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` +
onnxscript): the patch grid each converted attention needs is computed from the input's shape in the
graph, so one file serves every resolution the source architecture accepts. Where the source fixes its
resolution in the graph (transformers' DINOv2 with registers, SigLIP, timm DINOv3, timm models built without
``dynamic_img_size``), the default falls back to the native size and says why. The fixed-size export uses the
TorchScript-based exporter (``dynamo=False``) with no custom symbolic: the converted attention is plain
matmul / mul / div / add, which every exporter has."""

from __future__ import annotations

import contextlib
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn


class OnnxExportError(RuntimeError):
    """Export failed, or onnxruntime disagrees with PyTorch beyond the tolerance."""


@dataclass
class OnnxResult:
    path: Path
    max_abs_diff: float
    tolerance: float                      # atol × max(1, largest |output|): the bound the difference is held to
    batch: int
    input_shape: tuple[int, ...]
    output_name: str
    opset: int
    dynamic_size: bool = False
    checked_shapes: tuple = ()            # every (B, C, H, W) the parity check ran
    note: str = ""                        # why height/width are fixed, when dynamic was tried and did not verify

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def format(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        dims = ("batch", self.input_shape[1], "height", "width") if self.dynamic_size else \
            ("batch",) + self.input_shape[1:]
        shapes = ", ".join("x".join(str(v) for v in s) for s in self.checked_shapes) or f"batch {self.batch}"
        note = f"\nheight and width are fixed at {self.input_shape[2]}x{self.input_shape[3]}: {self.note}" \
            if self.note else ""
        return (f"wrote {self.path} (opset {self.opset}, input pixel_values {dims}, output {self.output_name})\n"
                f"onnxruntime parity at batch {self.batch} ({shapes}): max abs difference "
                f"{self.max_abs_diff:.3g} (tolerance {self.tolerance:g}) {verdict}{note}")


class _Exported(nn.Module):
    """Tensor in, tensor out: logits (classifiers) or the last hidden state (backbones). With
    ``any_size`` a transformers model always interpolates its position embeddings (a no-op at its
    own size), so the traced graph holds no comparison of the input size."""

    def __init__(self, model: nn.Module, any_size: bool = False):
        super().__init__()
        self.model = model
        from castle_convert.adapters import hf_siglip2
        # (a NaFlex tower (SigLIP2) takes patches: its images are patchified in the graph, no interpolation)
        self.any_size = any_size and getattr(model, "config", None) is not None and \
            not hasattr(model, "pretrained_cfg") and hf_siglip2.tower(model) is None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from castle_convert import adapters
        from castle_convert.convert import primary_output
        if self.any_size:
            return primary_output(self.model(pixel_values, interpolate_pos_encoding=True))
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


def _dynamic_export(wrapped: nn.Module, x1: torch.Tensor, output: Path, out_name: str, opset: int,
                    patch: int, size: bool = True) -> None:
    """``torch.onnx.export(dynamo=True)`` with batch, height and width dynamic (height/width multiples of ``patch``;
    ``size=False``: the batch only)."""
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter's op library
    except ImportError as e:
        raise OnnxExportError("--dynamic-size exports through torch.export and needs onnxscript: "
                              "pip install onnxscript") from e
    Dim = torch.export.Dim
    shapes = ({0: Dim("batch", min=1, max=1024), 2: patch * Dim("rows", min=1, max=1024),
               3: patch * Dim("cols", min=1, max=1024)} if size else {0: Dim("batch", min=1, max=1024)},)
    torch.onnx.export(wrapped, (x1,), str(output), input_names=["pixel_values"], output_names=[out_name],
                      dynamic_shapes=shapes, opset_version=max(opset, 18), dynamo=True, verbose=False)


def export_onnx(directory: Union[str, Path], output: Union[str, Path], *, opset: int = 17, atol: float = 1e-4,
                check_batch: int = 3, seed: int = 0, dynamic_size: Optional[bool] = None,
                progress: bool = False) -> OnnxResult:
    """Export the model in ``directory`` to ONNX (batch axis dynamic) and compare onnxruntime with PyTorch on a
    random batch of ``check_batch`` images.

    ``dynamic_size``: ``None`` (default) — height and width dynamic where that verifies (exported with
    ``torch.export``, parity checked at the native and a second, non-square size; opset ≥ 18), else the native
    size with the reason in ``result.note``; ``True`` — dynamic or an error; ``False`` — the native size (the
    TorchScript-based exporter). ``progress``: a progress bar over the steps (load, export, check, parity).

    Raises :class:`OnnxExportError` when the max abs difference exceeds ``atol × max(1, largest |output|)`` (as
    finalize's parity check: absolute for small outputs, relative for large ones; the result is
    attached as ``.result``); the ONNX file is kept for inspection.
    """
    from tqdm.auto import tqdm

    from castle_convert.export.load import load

    output = Path(output)
    with tqdm(desc="export-onnx", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        bar.set_postfix_str(f"loading {directory}")
        model = load(directory).float().eval()
        bar.update()
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OnnxExportError(f"cannot write {output}: {e.strerror or e} ({e.filename or output.parent}): "
                                  "choose another --output") from None
        fixed = _fixed_size_reason(model)
        if dynamic_size and fixed:
            raise OnnxExportError(f"{directory}: {fixed}; export without --dynamic-size")
        note = fixed if dynamic_size is None else ""
        if dynamic_size is None and not fixed:
            try:
                return _export(model, directory, output, opset, atol, check_batch, seed, True, bar)
            except OnnxExportError as e:       # the source fixes its resolution in the graph: the native size
                note = f"a dynamic size did not verify ({_short(e)})"
        result = _export(model, directory, output, opset, atol, check_batch, seed, bool(dynamic_size), bar)
        result.note = note
        return result


def _short(e: BaseException) -> str:
    text = str(e).split(" (file kept")[0]
    return text[:160] + ("…" if len(text) > 160 else "")


def _fixed_size_reason(model: nn.Module) -> str:
    """Why ``model`` can only be exported at its native size, or ""."""
    if hasattr(model, "pretrained_cfg") and not getattr(model, "dynamic_img_size", True):
        return ("the timm model was built without dynamic_img_size, so its position embedding has one size (convert "
                "a model created with dynamic_img_size=True for an ONNX graph that takes any resolution)")
    return ""


def _export(model: nn.Module, directory, output: Path, opset: int, atol: float, check_batch: int, seed: int,
            dynamic_size: bool, bar) -> OnnxResult:
    """One export (dynamic height/width or the native size) and its onnxruntime parity check."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from castle_convert import adapters

    c, h, w = adapters.adapter_for(model).input_size(model)
    patch = max(adapters.patch_sizes(model) or {1})
    wrapped = _Exported(model, any_size=dynamic_size).eval()
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(1, c, h, w, generator=gen)
    with torch.no_grad():
        probe = adapters.forward(model, x1)
    classifier = getattr(probe, "logits", None) is not None or (isinstance(probe, torch.Tensor) and int(
        getattr(model, "num_classes", 0) or 0) > 0)
    out_name = "logits" if classifier else "features"
    bar.set_postfix_str("exporting: torch.export, dynamic height/width" if dynamic_size else
                        f"exporting at {h}x{w}")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if dynamic_size:        # traced at batch 2 and a non-native, non-square size: nothing specialises
                xt = torch.randn(2, c, h + patch, w + 2 * patch, generator=gen)
                _dynamic_export(wrapped, xt, output, out_name, opset, patch)
                opset = max(opset, 18)
            elif getattr(model, "rope", None) is not None:
                # timm Eva builds its RoPE inside the forward; the TorchScript-based exporter bakes the traced
                # batch into it (timm's own model does not export that way at all): torch.export, batch dynamic
                _dynamic_export(wrapped, torch.randn(2, c, h, w, generator=gen), output, out_name, opset, patch,
                                size=False)
                opset = max(opset, 18)
            else:
                with _static_position_embeddings(model):
                    torch.onnx.export(wrapped, (x1,), str(output), input_names=["pixel_values"],
                                      output_names=[out_name], opset_version=opset, dynamo=False,
                                      dynamic_axes={"pixel_values": {0: "batch"}, out_name: {0: "batch"}})
        bar.update()
        bar.set_postfix_str("onnx.checker")
        onnx.checker.check_model(str(output))
        bar.update()
    except OnnxExportError:
        raise
    except Exception as e:  # noqa: BLE001 - exporter errors come in many types
        raise OnnxExportError(f"ONNX export of {directory} failed: {type(e).__name__}: {str(e)[:300]}") from e
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    sizes = [(h, w)] + ([(h + 2 * patch, max(patch, w - patch))] if dynamic_size else [])   # + a non-square size
    diff, scale, checked = 0.0, 1.0, []
    for hh, ww in sizes:
        bar.set_postfix_str(f"onnxruntime vs PyTorch at {check_batch}x{c}x{hh}x{ww}")
        x = torch.randn(check_batch, c, hh, ww, generator=gen)
        try:
            got = session.run(None, {"pixel_values": x.numpy()})[0]
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            raise OnnxExportError(f"the ONNX graph of {directory} does not run at {hh}x{ww} px: its source fixes the "
                                  f"resolution in the graph ({str(e).splitlines()[0][:160]}); export without "
                                  "--dynamic-size, or load the directory through timm and export that") from e
        with torch.no_grad():
            ref = wrapped(x).numpy()
        if got.shape != ref.shape:
            raise OnnxExportError(f"onnxruntime returned shape {got.shape}, PyTorch {ref.shape} at {hh}x{ww} px")
        diff = max(diff, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
        checked.append(tuple(x.shape))
        bar.update()
    # as finalize's parity check: atol for outputs up to 1 in magnitude, relative beyond (a real DINOv2-S at 518 px
    # has features up to ~9 and fp32 differences of ~7e-4 between onnxruntime and PyTorch)
    result = OnnxResult(path=output, max_abs_diff=diff, tolerance=atol * scale, batch=check_batch,
                        input_shape=tuple(x1.shape), output_name=out_name, opset=opset, dynamic_size=dynamic_size,
                        checked_shapes=tuple(checked))
    if not result.ok:
        err = OnnxExportError(f"onnxruntime output differs from PyTorch: max abs difference {diff:.3g} > "
                              f"tolerance {atol * scale:.3g} ({atol:g} × max(1, largest |output| {scale:.3g})) "
                              f"(file kept: {output})")
        err.result = result
        raise err
    return result
