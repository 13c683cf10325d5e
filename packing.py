"""
Padding-free packed rows: a micro-batch's examples run through the transformer laid end to end in a few rows, each
example's position ids restarting at 0, attention_mask None. transformers (5.x, masking_utils.
find_packed_sequence_indices) then sees the packed format from the position ids alone (a new example wherever a
position does not follow its predecessor by 1) and confines attention to each example: the block-diagonal causal
mask of sdpa and eager, flash-attention's varlen path (which reads one row only: there, all examples go in one).

How many rows: sdpa and eager score every pair of positions of a row (masked or not), so one row of all T tokens
would cost T² attention scores where the padded rectangle costs B·L². The examples are therefore put first-fit,
longest first, into rows of the longest example's length L: R ≤ B rows of W ≤ L positions, so that both the linear
layers (R·W ≥ T positions, a little padding at the ends of rows) and attention (R·W² scores) cost at most what the
padded rows did, and usually far less. The few positions that end a row are a run of their own (positions from 0,
their hidden states dropped).

The loader still writes padded rows [B, L] (right-padded; RL's loss rows too, rl.sequences); pack() reads their
attention_mask, and the results go back to the padded layout the objectives read: one float per position
(log-probs, values, KD's per-token losses), never the hidden states. Positions restart at 0, which is what the
padded forward gives a right-padded row and what generate() gives a left-padded prompt (positions from the mask's
cumulative sum). lm_head.check_packing refuses a model whose packed forward is not its padded one (a family that
ignores position ids or builds its mask another way): one line, no wrong numbers.
"""
import math
from typing import NamedTuple

import torch


class Packed(NamedTuple):
    input_ids: torch.Tensor     # [R, W]: the rows the body runs on, the examples laid end to end
    position_ids: torch.Tensor  # [R, W]: 0, 1, ... within each example (and within the run that ends a row)
    cu_seqlens: torch.Tensor    # [B + 1]: example b is the packed tokens cu_seqlens[b]:cu_seqlens[b+1]
    index: torch.Tensor         # [T]: each packed token's flat index in the padded [B, L]
    slots: torch.Tensor         # [T]: its flat index in the rows [R, W]
    shape: tuple                # (B, L) of the padded rows


def rows_of(lengths, capacity):
    """(row, start) of each example: first fit, longest first, into rows of capacity tokens; and the rows' fill."""
    fill, row, start = [], [0] * len(lengths), [0] * len(lengths)
    for b in sorted(range(len(lengths)), key=lambda b: -lengths[b]):
        r = next((r for r, used in enumerate(fill) if used + lengths[b] <= capacity), len(fill))
        if r == len(fill):
            fill.append(0)
        row[b], start[b], fill[r] = r, fill[r], fill[r] + lengths[b]
    return row, start, fill


def pack(input_ids, attention_mask, one_row=False):
    """The packed form of padded rows whose attention_mask is one run of 1s per row (right or left padding): the
    packed tokens, example after example ([T], index / cu_seqlens), and the rows that hold them (one_row: all in one,
    as flash-attention's varlen path needs; else rows of the longest example's length, see above)."""
    B, L = input_ids.shape
    index = attention_mask.reshape(-1).nonzero().squeeze(1)  # row-major: each example's tokens in order, together
    lengths = attention_mask.sum(1)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    T, device = index.numel(), index.device
    positions = torch.arange(T, device=device) - torch.repeat_interleave(cu_seqlens[:-1], lengths, output_size=T)
    sizes = lengths.tolist()
    row, start, fill = rows_of(sizes, T if one_row else max(sizes, default=0))
    W = max(fill, default=0)
    first = torch.tensor(row, device=device) * W + torch.tensor(start, device=device)  # each example's first slot
    slots = torch.repeat_interleave(first, lengths, output_size=T) + positions
    ids = input_ids.new_zeros(len(fill) * W).index_copy(0, slots, input_ids.reshape(-1)[index])
    after = torch.arange(W, device=device) - torch.tensor(fill, device=device)[:, None]  # a row's end: from 0 again
    position_ids = after.reshape(-1).index_copy(0, slots, positions)
    return Packed(ids.view(len(fill), W), position_ids.view(len(fill), W), cu_seqlens, index, slots, (B, L))


def forward(body, packed):
    """The body's final hidden states [T, H] of the packed tokens, example after example. No cache: transformers reads
    packed position ids only without one (a cache means generation, where a row is one sequence)."""
    hidden = body(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                  use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[packed.slots]


def one_row(body):
    """Whether the body's attention needs all examples in one row: flash-attention's varlen path reads packed
    position ids only at batch size 1. A body whose config is not at hand (a LoRA reference) gets one row too: exact
    for every attention implementation, only slower for sdpa and eager."""
    config = getattr(body, 'config', None) or getattr(getattr(body, '__self__', None), 'config', None)
    return config is None or 'flash' in str(getattr(config, '_attn_implementation', ''))


def next_token_rows(packed):
    """(the packed tokens [S] whose next token is in the same example, their flat index [S] in the padded [B, L-1]
    layout of the next-token scores): the last token of each example scores nothing."""
    B, L = packed.shape
    row, column = packed.index // L, packed.index % L
    has_next = torch.ones_like(packed.index, dtype=torch.bool)
    has_next[packed.cu_seqlens[1:][packed.cu_seqlens[1:] > packed.cu_seqlens[:-1]] - 1] = False
    rows = has_next.nonzero().squeeze(1)
    return rows, row[rows] * (L - 1) + column[rows]


def token_at(packed, columns):
    """The packed token [B] of each padded row's token at columns [B] (e.g. rm's last token), a real one."""
    B, L = packed.shape
    flat = torch.arange(B, device=columns.device) * L + columns
    return torch.searchsorted(packed.index, flat)


def scoring_hidden(body, batch, packing):
    """The final hidden states that score each next token, and their layout: padded, ([B, L-1, H], None), today's
    path; packed, ([S, H], the flat index [S] of each in [B, L-1]) (see gather, spread)."""
    if not packing:
        return body(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).last_hidden_state[:, :-1], None
    packed = pack(batch['input_ids'], batch['attention_mask'], one_row(body))
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
