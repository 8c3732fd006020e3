"""timm's NaFlexVit (``naflexvit_*``) passing each call's patch grid — or, for a padded NaFlex batch, its
key-padding mask and each image's own grid — to the converted attentions.

NaFlexVit takes either images (B, C, H, W) (one grid for the batch) or a NaFlex batch: ``patches``
(B, N, P·P·C), ``patch_coord`` (B, N, 2) (y, x) and ``patch_valid`` (B, N), as timm's NaFlex collator
builds it (a dict, or the three tensors). timm turns ``patch_valid`` into an N×N mask for softmax; the
converted attentions get ``token_mask`` (B, prefix + N) and ``grid_sizes`` (B, 2) instead (padding drops
out of every sum over tokens; the DW term convolves each image over its own grid), softmax layers a
hybrid keeps get timm's own mask. FX symbolic tracing traces the image route. Each image's patches must be row-major over its own grid, as timm's
``patchify_image`` and collator give them: anything else (shuffled patches, patch dropout in training)
is a one-line error, checked in eager mode, never a silently wrong DW term. A mask the caller passes
itself (``attn_mask=``) reaches the converted attentions, which refuse it in one line.

Only NaFlexVits of timm ``Block``s (every registered ``naflexvit_*``) are swapped; NaFlexVits built with
EVA/RoPE blocks are refused by the adapter.
"""

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.naflexvit import NaFlexVit


def _eager() -> bool:
    return not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling())


def naflex_grid_sizes(patch_coord: torch.Tensor, patch_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, 2): each image's (rows, cols) of patches, from its real patches' (y, x) coordinates (B, N, 2)."""
    coord = patch_coord.to(torch.long)
    if patch_valid is not None:
        coord = coord * patch_valid.to(torch.long).unsqueeze(-1)               # padding's coordinates ignored
    return coord.amax(dim=1) + 1                                                # (B, 2)


def check_row_major(patch_coord: torch.Tensor, patch_valid: Optional[torch.Tensor], grid_sizes: torch.Tensor) -> None:
    """Raise (one line) unless each image's real patches come first, row-major over its own grid."""
    B, M = patch_coord.shape[:2]
    pos = torch.arange(M, device=patch_coord.device).unsqueeze(0)              # (1, M)
    rows, cols = grid_sizes[:, 0:1], grid_sizes[:, 1:2]                        # (B, 1) each
    inside = pos < rows * cols                                                  # (B, M)
    valid = inside if patch_valid is None else patch_valid.to(torch.bool)
    expected = torch.stack([pos // cols, pos % cols], dim=-1)                   # (B, M, 2)
    ok = (valid == inside) & ((patch_coord.to(torch.long) == expected).all(-1) | ~valid)
    if not bool(ok.all()):
        b = int((~ok).any(-1).nonzero()[0])
        raise ValueError(f"naflexvit with castling attention needs each image's patches first and row-major over its "
                         f"own grid (as timm's patchify_image / NaFlex collator give them); image {b} of this batch "
                         "is not (shuffled or dropped patches): pass its patches in that order")


class GridNaFlexVit(NaFlexVit):
    """timm ``NaFlexVit`` (timm 1.0.31's ``forward_features`` / ``forward_intermediates``) passing each call's grid,
    or its padding mask and grids, to every block (see the module doc)."""

    def _castle_call(self, patches: torch.Tensor, patch_coord: Optional[torch.Tensor],
                     patch_valid: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor]
                     ) -> Tuple[Optional[Tuple[int, int]], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(grid, token_mask, grid_sizes) of this call: images → their grid; a NaFlex batch → its key-padding
        mask (B, prefix + N) and grids (B, 2); a caller's own attn_mask → nothing (the attentions refuse it)."""
        if patch_coord is None or isinstance(patch_coord, torch.fx.Proxy):
            # images (FX symbolic tracing makes every argument a placeholder: its graph is the image route)
            rows, cols = self.embeds.dynamic_feat_size((patches.shape[-2], patches.shape[-1]))
            return (rows, cols), None, None
        if attn_mask is not None:
            return None, None, None
        if self.training and self.patch_drop is not None:
            raise ValueError("naflexvit with castling attention: patch dropout reorders the patches of a NaFlex batch "
                             "(each image's grid is lost); build the model with patch_drop_rate=0")
        sizes = naflex_grid_sizes(patch_coord, patch_valid)
        if _eager():
            check_row_major(patch_coord, patch_valid, sizes)
        B, M = patch_coord.shape[:2]
        valid = torch.ones(B, M, dtype=torch.bool, device=patch_coord.device) if patch_valid is None \
            else patch_valid.to(torch.bool)
        prefix = torch.ones(B, self.num_prefix_tokens, dtype=torch.bool, device=valid.device)
        return None, torch.cat([prefix, valid], dim=1), sizes                  # (B, prefix + M), (B, 2)

    def forward_features(self, patches: torch.Tensor, patch_coord: Optional[torch.Tensor] = None,
                         patch_valid: Optional[torch.Tensor] = None,
                         attn_mask: Optional[torch.Tensor] = None) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        naflex_mode = patch_coord is not None
        grid, token_mask, grid_sizes = self._castle_call(patches, patch_coord, patch_valid, attn_mask)
        embeds = self._forward_embeds(patches, patch_coord=patch_coord, patch_valid=patch_valid, attn_mask=attn_mask)
        x = embeds['patches']
        attn_mask = embeds.get('attn_mask', None)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, attn_mask, False, grid, token_mask, grid_sizes)
            else:
                x = blk(x, attn_mask=attn_mask, grid=grid, token_mask=token_mask, grid_sizes=grid_sizes)
        x = self.norm(x)
        if naflex_mode:
            return {'patches': x, 'patch_valid': embeds.get('patch_valid', None)}
        return x

    def forward_intermediates(
            self,
            x: Union[torch.Tensor, Dict[str, torch.Tensor]],
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            patch_coord: Optional[torch.Tensor] = None,
            patch_valid: Optional[torch.Tensor] = None,
            attn_mask: Optional[torch.Tensor] = None,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's NaFlexVit ``forward_intermediates`` (same arguments and outputs), the grid or the padding mask
        and grids passed to every block."""
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        reshape = output_fmt == 'NCHW'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        if isinstance(x, dict):
            if reshape:
                raise ValueError('output_fmt="NCHW" is not supported for NaFlex (dict) inputs, use "NLC". '
                                 'Per-sample grids vary; reconstruct spatial maps downstream via patch_coord.')
            patch_coord = x['patch_coord']
            patch_valid = x.get('patch_valid', patch_valid)
            attn_mask = x.get('attn_mask', attn_mask)
            patches = x['patches']
            H = W = None
        else:
            patches = x
            if patch_coord is None:
                H, W = self.embeds.dynamic_feat_size((x.shape[-2], x.shape[-1]))
            else:
                H = W = None
        grid, token_mask, grid_sizes = self._castle_call(patches, patch_coord, patch_valid, attn_mask)
        embeds = self._forward_embeds(patches, patch_coord=patch_coord, patch_valid=patch_valid, attn_mask=attn_mask)
        x = embeds['patches']
        attn_mask = embeds.get('attn_mask', None)
        patch_valid = embeds.get('patch_valid', patch_valid)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, attn_mask, False, grid, token_mask, grid_sizes)
            else:
                x = blk(x, attn_mask=attn_mask, grid=grid, token_mask=token_mask, grid_sizes=grid_sizes)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if self.num_prefix_tokens:
            prefix_tokens = [y[:, 0:self.num_prefix_tokens] for y in intermediates]
            intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        else:
            prefix_tokens = None
        if reshape:
            intermediates = [y.reshape(y.shape[0], H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            result_dict = {'image_intermediates': intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result_dict['image_intermediates_prefix'] = prefix_tokens
            if patch_valid is not None:
                result_dict['patch_valid'] = patch_valid
            if not intermediates_only:
                result_dict['image_features'] = self.norm(x)
            return result_dict
        if not torch.jit.is_scripting() and return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates
