"""Linear probes and feature agreement for headless backbones (used by real_model.py).

A backbone's value is its general features: the probe is a logistic regression on the CLS feature
(the backbone's pooled output), fitted on a fixed split disjoint from any distillation image.

* ``fmnist``: Fashion-MNIST *test* images (distillation only ever sees the training images):
  2000 to fit, 1000 to score.
* ``digits``: scikit-learn's 8×8 digits (never seen by the distillation), upscaled: 1000 / 797.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _to_model_input(grey: np.ndarray, size: int) -> torch.Tensor:
    """uint8/float (N, h, w) in [0, 1] → (N, 3, size, size) normalized with ImageNet mean/std."""
    x = torch.from_numpy(grey).float().unsqueeze(1)                       # (N, 1, h, w)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    x = x.repeat(1, 3, 1, 1)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def probe_sets() -> dict[str, dict]:
    """Raw images in [0, 1] and labels of both probe datasets, split into fit / score parts."""
    from sklearn.datasets import load_digits

    from castle_convert.data import _read_idx, fashion_mnist_dir
    root = fashion_mnist_dir()
    if root is None:
        raise SystemExit("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    images = _read_idx(root / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    labels = _read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(labels))
    fm = {"fit": (images[idx[:2000]], labels[idx[:2000]]), "score": (images[idx[2000:3000]], labels[idx[2000:3000]])}
    d = load_digits()
    dimg, dlab = (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)
    didx = np.random.default_rng(0).permutation(len(dlab))
    dg = {"fit": (dimg[didx[:1000]], dlab[didx[:1000]]), "score": (dimg[didx[1000:]], dlab[didx[1000:]])}
    return {"fmnist": fm, "digits": dg}


@torch.no_grad()
def features(model, images: np.ndarray, size: int, batch: int = 100, tokens: bool = False) -> torch.Tensor:
    """CLS features (N, C) — the backbone's pooled output — or, with ``tokens``, every final token
    (N, T, C)."""
    from castle_convert.distill.evaluate import embeddings
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        x = _to_model_input(images[i:i + batch], size)
        o = model(x)
        out.append(o.last_hidden_state if tokens else embeddings(o))
    return torch.cat(out).float()


def linear_probe(fit_x: torch.Tensor, fit_y: np.ndarray, score_x: torch.Tensor, score_y: np.ndarray) -> float:
    """Top-1 % of a logistic regression on standardized features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    clf.fit(fit_x.numpy(), fit_y)
    return 100.0 * float((clf.predict(score_x.numpy()) == score_y).mean())


def probe(model, sets: dict, size: int) -> dict[str, float]:
    """Probe accuracy on every set at ``size`` px."""
    out = {}
    for name, s in sets.items():
        fx, fy = s["fit"]
        sx, sy = s["score"]
        out[name] = linear_probe(features(model, fx, size), fy, features(model, sx, size), sy)
    return out


def cls_cosine(student, teacher, images: np.ndarray, size: int) -> float:
    """Mean cosine between student and teacher CLS features."""
    return float(F.cosine_similarity(features(student, images, size), features(teacher, images, size), -1).mean())
