"""
Padding-free packed rows: a micro-batch's real tokens run through the transformer as ONE row [1, T] (T: the sum of
the examples' lengths), position ids restarting at 0 for every example, attention_mask None. transformers (5.x,
masking_utils.find_packed_sequence_indices) then sees the packed format from the position ids alone (a new example
wherever a position does not follow its predecessor by 1) and confines attention to each example: the block-diagonal
causal mask of sdpa and eager, flash-attention's varlen path on a GPU. The linear layers and the head see no padding;
sdpa and eager still score a masked [T, T] attention matrix (flash-attention's varlen kernel only each example's).

The loader still writes padded rows [B, L] (right-padded; RL's loss rows too, rl.sequences); pack() reads their
attention_mask, and the results go back to the padded layout the objectives read: one float per position
(log-probs, values, KD's per-token losses), never the hidden states. Positions restart at 0, which is what the
padded forward gives a right-padded row and what generate() gives a left-padded prompt (positions from the mask's
cumulative sum). lm_head.check_packing refuses a model whose packed forward is not its padded one (a family that ignores
position ids or builds its mask another way): one line, no wrong numbers.
"""
import math
from typing import NamedTuple

import torch


class Packed(NamedTuple):
    input_ids: torch.Tensor     # [1, T]: the real tokens of every row, row after row
    position_ids: torch.Tensor  # [1, T]: 0, 1, ... within each example
    cu_seqlens: torch.Tensor    # [B + 1]: example b is packed tokens cu_seqlens[b]:cu_seqlens[b+1] (flash-attention's)
    index: torch.Tensor         # [T]: each packed token's flat index in the padded [B, L]
    shape: tuple                # (B, L) of the padded rows


def pack(input_ids, attention_mask):
    """The packed form of padded rows whose attention_mask is one run of 1s per row (right or left padding)."""
    B, L = input_ids.shape
    index = attention_mask.reshape(-1).nonzero().squeeze(1)  # row-major: each example's tokens in order, together
    lengths = attention_mask.sum(1)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    starts = torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=index.numel())
    positions = torch.arange(index.numel(), device=index.device) - starts
    return Packed(input_ids.reshape(-1)[index][None], positions[None], cu_seqlens, index, (B, L))


def forward(body, packed):
    """The body's final hidden states [T, H] of the packed tokens. No cache: transformers reads packed position ids
    only without one (a cache means generation, where a row is one sequence)."""
    return body(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                use_cache=False).last_hidden_state[0]


def next_token_rows(packed):
    """(packed rows [S] whose next token is in the same example, their flat index [S] in the padded [B, L-1] layout
    of the next-token scores): the last token of each example scores nothing."""
    B, L = packed.shape
    row, column = packed.index // L, packed.index % L
    has_next = torch.ones_like(packed.index, dtype=torch.bool)
    has_next[packed.cu_seqlens[1:][packed.cu_seqlens[1:] > packed.cu_seqlens[:-1]] - 1] = False
    rows = has_next.nonzero().squeeze(1)
    return rows, row[rows] * (L - 1) + column[rows]


def packed_rows(packed, columns):
    """The packed row of each padded row's token at columns [B] (e.g. rm's last token), which must be a real one."""
    B, L = packed.shape
    flat = torch.arange(B, device=columns.device) * L + columns
    return torch.searchsorted(packed.index, flat)


def scoring_hidden(body, batch, packing):
    """The final hidden states that score each next token, and their layout: padded, ([B, L-1, H], None), today's
    path; packed, ([S, H], the flat index [S] of each in [B, L-1]) (see gather, spread)."""
    if not packing:
        return body(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).last_hidden_state[:, :-1], None
    packed = pack(batch['input_ids'], batch['attention_mask'])
    rows, layout = next_token_rows(packed)
    return forward(body, packed)[rows], layout


def gather(values, layout):
    """values [B, L-1] (targets, masks, gradient hints) at the scored positions: [S] packed, as they are padded."""
    return values if layout is None else values.reshape(-1)[layout]


def spread(values, layout, shape):
    """Per-position values [S] back into the padded layout shape [B, L-1], 0 at positions packing never scored."""
    if layout is None:
        return values
    return values.new_zeros(math.prod(shape)).index_copy(0, layout, values).view(shape)
