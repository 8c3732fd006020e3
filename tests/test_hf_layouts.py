"""Both transformers attention layouts convert: the installed one (families table) and one other.

The other version is installed by .ci/run into a separate folder (``pip install --target``) and
named by ``CASTLE_TRANSFORMERS_OTHER``; the checks run in a subprocess that imports it first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OTHER = os.environ.get("CASTLE_TRANSFORMERS_OTHER")

SCRIPT = r"""
import sys
# The venv's `kernels` (pulled in by the transformers under test) is newer than 5.8.1 understands
# (its LayerRepository now needs a revision): hide it, as on a machine without that optional package.
sys.modules["kernels"] = None
import torch, transformers
import castle_convert as cc
from castle_convert.convert import primary_output
print("transformers", transformers.__version__)
torch.manual_seed(0)
for model_cls, cfg_cls, prefix in [("ViTForImageClassification", "ViTConfig", 1),
                                   ("DeiTForImageClassificationWithTeacher", "DeiTConfig", 2)]:
    cfg = getattr(transformers, cfg_cls)(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, image_size=32, patch_size=8, num_labels=5)
    teacher = getattr(transformers, model_cls)(cfg).eval()
    layout = "q_proj" if hasattr(teacher.base_model.encoder.layer[0].attention, "q_proj") else "query"
    student = cc.convert(teacher).eval()
    for shape in [(2, 3, 32, 32), (2, 3, 32, 48)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            a = primary_output(teacher(x, interpolate_pos_encoding=True))
            b = primary_output(student(x, interpolate_pos_encoding=True))
        assert (a - b).abs().max() <= 1e-5, (model_cls, shape, (a - b).abs().max())
    cc.set_schedule(student, 0.5, 1.0)
    student.train()
    primary_output(student(torch.randn(2, 3, 32, 32))).pow(2).mean().backward()
    final = cc.finalize(student, force=True)
    print(model_cls, layout, "ok", final.castling_parity)
"""


@pytest.mark.skipif(not OTHER, reason="CASTLE_TRANSFORMERS_OTHER is not set (.ci/run installs a second "
                                      "transformers version there)")
def test_other_transformers_version_converts():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([OTHER, str(ROOT)]), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import transformers
    assert f"transformers {transformers.__version__}" not in proc.stdout, "must be a different version"
    assert proc.stdout.count(" ok ") == 2, proc.stdout
