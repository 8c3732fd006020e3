"""timm ViTs whose forward passes each call's patch grid down to the converted attentions.

timm's ``VisionTransformer.forward_features`` / ``forward_intermediates`` call ``blk(x)``: nothing
of the call reaches an attention but its tokens, and a token count does not tell a 32×64 image
from a 64×32 one. :func:`install` swaps the classes of a converted backbone and of its blocks, in
place, for the subclasses below (parameters, buffers, state-dict keys, ``pretrained_cfg`` and every
other method stay timm's). Their forward reads the grid off the patch embedding's output and
passes it to every block as ``grid=(rows, cols)`` — the way timm's own EVA computes its RoPE for
the input and passes it to every block. Nothing is stored between calls, and the code is
TorchScript-, FX-, ``torch.export``- and ONNX-traceable (integer ops on shapes, no hooks).

Backbones of another class, or with blocks other than timm's ``Block`` (``ResPostBlock``,
``ParallelThingsBlock``), keep timm's forward: their converted attentions get no grid, which works
for square images and is a clear error otherwise.
"""

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva, EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from castle_convert.attention.base import CastlingModule


class GridBlock(Block):
    """timm's ``Block`` whose converted attention receives the call's patch grid — or, in a padded NaFlex batch
    (:mod:`~castle_convert.adapters.timm_naflex`), its key-padding mask and grids, which replace the N×N
    ``attn_mask`` timm built from the same padding."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid: Optional[Tuple[int, int]] = None, token_mask: Optional[torch.Tensor] = None,
                grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        if token_mask is not None:
            attn_mask = None
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal,
                                                   grid=grid, token_mask=token_mask, grid_sizes=grid_sizes)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class SoftmaxGridBlock(Block):
    """A block whose attention stays softmax (hybrid, ``keep_softmax``): takes the grid, does not need it."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                grid: Optional[Tuple[int, int]] = None, token_mask: Optional[torch.Tensor] = None,
                grid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class _GridForward:
    """``forward_features`` and ``forward_intermediates`` of timm's ``VisionTransformer`` (timm 1.0.31),
    with the patch grid passed to every block."""

    def _patch_grid(self, x: torch.Tensor) -> Tuple[int, int]:
        """(rows, cols) of the patch embedding's output ``x``: (B, H, W, C) with ``dynamic_img_size``,
        else (B, N, C) at the embedding's fixed grid."""
        if self.dynamic_img_size:
            return x.shape[1], x.shape[2]
        return self.patch_embed.grid_size

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        x = self.patch_embed(x)
        grid = self._patch_grid(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for blk in self.blocks:
                x = checkpoint(blk, x, attn_mask, is_causal, grid)
        else:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal, grid=grid)
        x = self.norm(x)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """timm's ``forward_intermediates`` (same arguments and outputs), the grid passed to every block."""
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        reshape = output_fmt == 'NCHW'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        B = x.shape[0]
        x = self.patch_embed(x)
        H, W = grid = self._patch_grid(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)

        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, attn_mask, is_causal, grid)
            else:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal, grid=grid)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        if self.num_prefix_tokens:
            prefix_tokens = [y[:, 0:self.num_prefix_tokens] for y in intermediates]
            intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        else:
            prefix_tokens = None
        if reshape:
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]

        if output_dict:
            result_dict = {'image_intermediates': intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result_dict['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                result_dict['image_features'] = self.norm(x)
            return result_dict
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates


class GridVisionTransformer(_GridForward, VisionTransformer):
    """timm ``VisionTransformer`` passing each call's patch grid to its converted attentions."""


class GridVisionTransformerDistilled(_GridForward, VisionTransformerDistilled):
    """timm ``VisionTransformerDistilled`` (DeiT) passing each call's patch grid to its converted attentions."""


# -- Eva (eva02_*, vit_*_rope_*, vit_*_dinov3, vit_pe_*): the call's RoPE and patch grid -----------------

class GridEvaBlock(EvaBlock):
    """timm's ``EvaBlock`` whose converted attention receives the call's RoPE and patch grid."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        x_attn = self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal, grid=grid)
        if self.gamma_1 is not None:
            x_attn = self.gamma_1 * x_attn
        x = x + self.drop_path1(x_attn)
        x_mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            x_mlp = self.gamma_2 * x_mlp
        return x + self.drop_path2(x_mlp)


class SoftmaxGridEvaBlock(EvaBlock):
    """An ``EvaBlock`` whose attention stays softmax (hybrid): takes the grid, does not need it."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return EvaBlock.forward(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)


class GridEvaBlockPostNorm(EvaBlockPostNorm):
    """timm's ``EvaBlockPostNorm`` whose converted attention receives the call's RoPE and patch grid."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        x = x + self.drop_path1(self.norm1(self.attn(x, rope=rope, attn_mask=attn_mask, is_causal=is_causal,
                                                     grid=grid)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


class SoftmaxGridEvaBlockPostNorm(EvaBlockPostNorm):
    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return EvaBlockPostNorm.forward(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)


class GridEva(Eva):
    """timm ``Eva`` (timm 1.0.31's ``forward_features`` / ``forward_intermediates``) passing each call's RoPE,
    as timm does, and its patch grid to every block."""

    def _patch_grid(self, x: torch.Tensor) -> Tuple[int, int]:
        if self.dynamic_img_size:
            return x.shape[1], x.shape[2]                          # (B, H, W, C)
        return self.patch_embed.grid_size

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        x = self.patch_embed(x)
        grid = self._patch_grid(x)
        x, rot_pos_embed = self._pos_embed(x)
        x = self.norm_pre(x)
        if getattr(self, 'rope_mixed', False) and rot_pos_embed is not None:
            for i, blk in enumerate(self.blocks):                # mixed RoPE: per depth (heads, M, 2d)
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, rot_pos_embed[i], attn_mask, is_causal, grid)
                else:
                    x = blk(x, rope=rot_pos_embed[i], attn_mask=attn_mask, is_causal=is_causal, grid=grid)
        else:
            for blk in self.blocks:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, rot_pos_embed, attn_mask, is_causal, grid)
                else:
                    x = blk(x, rope=rot_pos_embed, attn_mask=attn_mask, is_causal=is_causal, grid=grid)
        x = self.norm(x)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            attn_mask: Optional[torch.Tensor] = None,
            is_causal: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's Eva ``forward_intermediates`` (same arguments and outputs), the grid passed to every block."""
        assert output_fmt in ('NCHW', 'NLC'), 'Output format for EVA-ViT features must be one of NCHW or NLC.'
        reshape = output_fmt == 'NCHW'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x = self.patch_embed(x)
        H, W = grid = self._patch_grid(x)
        x, rot_pos_embed = self._pos_embed(x)
        x = self.norm_pre(x)
        if torch.jit.is_scripting() or not stop_early:
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        if getattr(self, 'rope_mixed', False) and rot_pos_embed is not None:
            for i, blk in enumerate(blocks):
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, rot_pos_embed[i], attn_mask, is_causal, grid)
                else:
                    x = blk(x, rope=rot_pos_embed[i], attn_mask=attn_mask, is_causal=is_causal, grid=grid)
                if i in take_indices:
                    intermediates.append(self.norm(x) if norm else x)
        else:
            for i, blk in enumerate(blocks):
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, rot_pos_embed, attn_mask, is_causal, grid)
                else:
                    x = blk(x, rope=rot_pos_embed, attn_mask=attn_mask, is_causal=is_causal, grid=grid)
                if i in take_indices:
                    intermediates.append(self.norm(x) if norm else x)
        if self.num_prefix_tokens:
            prefix_tokens = [y[:, 0:self.num_prefix_tokens] for y in intermediates]
            intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if reshape:
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return x, intermediates


BACKBONES = {VisionTransformer: GridVisionTransformer, VisionTransformerDistilled: GridVisionTransformerDistilled,
             GridVisionTransformer: GridVisionTransformer,
             GridVisionTransformerDistilled: GridVisionTransformerDistilled, Eva: GridEva, GridEva: GridEva}
BLOCKS = (Block, GridBlock, SoftmaxGridBlock)
EVA_BLOCKS = {EvaBlock: (GridEvaBlock, SoftmaxGridEvaBlock), GridEvaBlock: (GridEvaBlock, SoftmaxGridEvaBlock),
              SoftmaxGridEvaBlock: (GridEvaBlock, SoftmaxGridEvaBlock),
              EvaBlockPostNorm: (GridEvaBlockPostNorm, SoftmaxGridEvaBlockPostNorm),
              GridEvaBlockPostNorm: (GridEvaBlockPostNorm, SoftmaxGridEvaBlockPostNorm),
              SoftmaxGridEvaBlockPostNorm: (GridEvaBlockPostNorm, SoftmaxGridEvaBlockPostNorm)}


def timm_class(module: nn.Module) -> type:
    """The timm class a swapped module was (``VisionTransformer`` for ``GridVisionTransformer``, ...)."""
    cls = type(module)
    if cls in (GridVisionTransformer, GridVisionTransformerDistilled):
        return cls.__mro__[2]
    if cls is GridEva:
        return Eva
    if cls.__name__ == "GridNaFlexVit":
        return cls.__mro__[1]
    if cls in EVA_BLOCKS:
        return EvaBlockPostNorm if issubclass(cls, EvaBlockPostNorm) else EvaBlock
    return Block if cls in BLOCKS else cls


def install(backbone: nn.Module) -> bool:
    """Swap ``backbone`` and its blocks to the classes above when they are timm's own (see the module
    doc); returns whether the backbone now passes the grid."""
    blocks = list(getattr(backbone, "blocks", []))
    from castle_convert.adapters.timm_naflex import GridNaFlexVit, NaFlexVit
    naflex = type(backbone) in (NaFlexVit, GridNaFlexVit)
    if (type(backbone) not in BACKBONES and not naflex) or not blocks:
        return False
    if issubclass(type(backbone), Eva):
        if any(type(b) not in EVA_BLOCKS for b in blocks):
            return False
        for blk in blocks:
            grid_cls, soft_cls = EVA_BLOCKS[type(blk)]
            blk.__class__ = grid_cls if isinstance(blk.attn, CastlingModule) else soft_cls
    else:
        if any(type(b) not in BLOCKS for b in blocks):
            return False
        for blk in blocks:
            blk.__class__ = GridBlock if isinstance(blk.attn, CastlingModule) else SoftmaxGridBlock
    backbone.__class__ = GridNaFlexVit if naflex else BACKBONES[type(backbone)]
    return True
