"""In the package: the attention kernels, for ``from .castling_functional import ...``.

Published directories get a verbatim copy of ``castle_convert/attention/functional.py`` under
this name instead of this file (see ``castle_convert.export.hub.HUB_FILES``).
"""

from castle_convert.attention.functional import (angular_linear, apply_rope, context_scores,  # noqa: F401
                                                 linear_angular_fused, local_global_attention, merge_heads, padded_grid_dw, patch_grid,
                                                 patch_grid_dw, resolve_grid, separable_context, token_dw)
