"""Writing converted checkpoints: the atomic output directory (safetensors + config + recipe + report)."""

from castle_convert.export.save import OutputExistsError, check_output_dir, write_output_dir

__all__ = ["OutputExistsError", "check_output_dir", "write_output_dir"]
