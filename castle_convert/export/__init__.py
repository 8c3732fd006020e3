"""Publishing converted checkpoints: save_pretrained / load (safetensors + config + remote code +
model card), the timm route, ONNX export, push to the Hub."""

from castle_convert.export.load import CheckpointError, load
from castle_convert.export.save import (ExportError, OutputExistsError, check_output_dir, save_pretrained,
                                        write_output_dir)

__all__ = ["CheckpointError", "ExportError", "OutputExistsError", "check_output_dir", "load", "save_pretrained",
           "write_output_dir"]
