"""What a converted transformers model does when its user calls the library's own methods.

``PreTrainedModel.save_pretrained`` / ``push_to_hub`` of a converted model would write a plain
``model_type: vit`` checkpoint that ``from_pretrained`` rebuilds as a softmax ViT with random
q/k/v/o (a wrong model, no error). :func:`install` puts instance-level replacements on every
``PreTrainedModel`` inside a converted model: the inference form goes through
:func:`castle_convert.save_pretrained` (the complete, loadable directory) and
:func:`castle_convert.export.push.push`; the training form is refused with the call to make.
``set_attn_implementation`` and ``output_attentions=True`` are refused too: linear attention has
no N×N map and one implementation (see :func:`check_attention_kwargs`).

Instance attributes (``types.MethodType``), not a subclass: ``type(model)`` stays the transformers
class, and ``copy.deepcopy`` rebinds them to the copy.
"""

from __future__ import annotations

import tempfile
import types
from pathlib import Path
from typing import Any, Optional

from torch import nn

# keyword arguments of transformers' save_pretrained that have no meaning for a castle-convert directory
_HF_ONLY = ("state_dict", "safe_serialization", "max_shard_size", "variant", "save_function", "token",
            "save_peft_format", "save_original_format")
_CC_KWARGS = ("recipe", "report", "overwrite", "labels", "base_model", "source", "remote_code", "verify", "repo_id")

TRAINING_FORM_SAVE = ("this is castle-convert's training form, and transformers' save_pretrained/push_to_hub would "
                      "write a plain ViT that reloads with random attention weights: after training call "
                      "cc.save_pretrained(cc.finalize(model), DIR); a run in progress checkpoints with "
                      "save_pretrained(DIR, state_dict=model.state_dict()) (weights only, safetensors, as Trainer "
                      "does)")
CHECKPOINT_NOTE = """# castle-convert training checkpoint

Weights of a castle-convert **training form** (softmax auxiliary branch still inside), written by
`save_pretrained(DIR, state_dict=...)` as `transformers.Trainer` checkpoints do. There is deliberately
no `config.json`: `from_pretrained` of this folder would otherwise build a plain softmax ViT.

* resume: `Trainer.train(resume_from_checkpoint=DIR)`, or
  `model.load_state_dict(safetensors.torch.load_file(DIR + "/model.safetensors"))` on `cc.convert(base)`;
* publish: `cc.save_pretrained(cc.finalize(model), OUT)` after the anneal.
"""


def _refuse_training_form(model: nn.Module) -> None:
    from castle_convert.convert import training_forms
    from castle_convert.export.save import ExportError
    if training_forms(model):
        raise ExportError(TRAINING_FORM_SAVE)


def _training_checkpoint(save_directory, state_dict: dict) -> Path:
    """Weights-only checkpoint of a training form (what Trainer resumes from); no config.json."""
    from safetensors.torch import save_file
    from castle_convert.export.save import ExportError
    path = Path(save_directory)
    if (path / "config.json").exists():                 # from_pretrained would read it as a plain model
        raise ExportError(f"{path} has a config.json: a training-form checkpoint goes to a directory without one "
                          "(from_pretrained would build a plain softmax ViT from it)")
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt", "castle_convert_training_form": "1"})
    (path / "README.md").write_text(CHECKPOINT_NOTE)
    return path


def save_pretrained(self: nn.Module, save_directory, *args: Any, **kwargs: Any) -> Optional[Path]:
    """transformers' ``save_pretrained`` on a converted model: :func:`castle_convert.save_pretrained` for the
    inference form; for the training form a weights-only checkpoint when a ``state_dict`` keyword is passed
    (as Trainer's checkpoints do), else an error naming the call to make."""
    from castle_convert.convert import training_forms
    from castle_convert.export.save import ExportError
    from castle_convert.export.save import save_pretrained as cc_save
    if training_forms(self) and "state_dict" in kwargs and not args and not kwargs.get("push_to_hub"):
        # Trainer's checkpoints pass state_dict (None: the model's own) explicitly
        if kwargs.get("is_main_process", True) is False:
            return None
        state = kwargs["state_dict"]
        return _training_checkpoint(save_directory, state if state is not None else self.state_dict())
    _refuse_training_form(self)
    if args:
        raise ExportError("save_pretrained of a castle-convert model takes the directory only, plus keyword "
                          f"arguments of castle_convert.save_pretrained ({', '.join(_CC_KWARGS)})")
    if kwargs.pop("push_to_hub", False):
        raise ExportError("save_pretrained(push_to_hub=True) of a castle-convert model: call "
                          "model.push_to_hub(REPO) (or cc.save_pretrained(model, DIR) then castle-convert push DIR "
                          "--repo REPO)")
    if kwargs.pop("is_main_process", True) is False:
        return None
    for k in _HF_ONLY:
        kwargs.pop(k, None)
    unknown = sorted(set(kwargs) - set(_CC_KWARGS))
    if unknown:
        raise ExportError(f"save_pretrained of a castle-convert model does not take {unknown}: it writes "
                          f"cc.save_pretrained's directory (keywords: {', '.join(_CC_KWARGS)})")
    from castle_convert.export.save import OutputExistsError, check_output_dir
    try:
        check_output_dir(Path(save_directory), bool(kwargs.get("overwrite")))
    except OutputExistsError:
        if kwargs.get("overwrite"):
            raise
        raise OutputExistsError(f"{save_directory} exists and is not empty: castle-convert writes a complete "
                                "directory atomically; pass overwrite=True to replace it, or choose another") from None
    return cc_save(self, save_directory, **kwargs)


def push_to_hub(self: nn.Module, repo_id: str, *, private: Optional[bool] = None, token: Any = None,
                **kwargs: Any):
    """transformers' ``push_to_hub``: the castle-convert directory (``cc.save_pretrained``) uploaded in one commit."""
    from castle_convert.export import push as push_mod
    from castle_convert.export.save import ExportError
    from castle_convert.export.save import save_pretrained as cc_save
    _refuse_training_form(self)
    unknown = sorted(set(kwargs) - {"commit_message", "create_pr", "revision", "safe_serialization",
                                    "max_shard_size", "use_temp_dir"})
    if unknown:
        raise ExportError(f"push_to_hub of a castle-convert model does not take {unknown}: call "
                          "cc.save_pretrained(model, DIR) then castle-convert push DIR --repo REPO")
    with tempfile.TemporaryDirectory() as tmp:
        directory = cc_save(self, Path(tmp) / "model", repo_id=repo_id)
        return push_mod.push(directory, repo_id, private=bool(private), token=token if isinstance(token, str) else None)


def set_attn_implementation(self: nn.Module, *args: Any, **kwargs: Any):
    raise NotImplementedError("castle-convert's converted attention has one implementation (linear, no N×N "
                              "matrix): attn_implementation cannot switch it; convert the model you loaded with "
                              "the implementation you want its softmax layers (hybrid) to use")


def check_attention_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a converted transformers model: ``output_attentions=True`` is an error."""
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions") or (kwargs.get("output_attentions") is None
                                          and getattr(config, "output_attentions", False)):
        raise NotImplementedError(
            "output_attentions=True: castle-convert's linear attention never forms the N×N attention map, so "
            "there are no attention weights to return; compare with the teacher through its hidden states "
            "(output_hidden_states=True) or cc.layer_errors(student, teacher, image_batches)")


def install(model: nn.Module) -> nn.Module:
    """Put the replacements on every transformers ``PreTrainedModel`` inside a converted ``model``
    (nothing for other models); returns ``model``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:                                              # pragma: no cover
        return model
    if not getattr(model, "castling_converted", None):
        return model
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and not getattr(m, "_castle_guarded", False):
            m.save_pretrained = types.MethodType(save_pretrained, m)
            m.push_to_hub = types.MethodType(push_to_hub, m)
            m.set_attn_implementation = types.MethodType(set_attn_implementation, m)
            m.register_forward_pre_hook(check_attention_kwargs, with_kwargs=True)
            m._castle_guarded = True
    return model
