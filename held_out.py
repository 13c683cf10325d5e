"""
Held-out evaluation: each objective's per-example mean loss and metrics over its val split, with every example
counted exactly once, weighted by example, over all ranks; and the ideal distance sqrt(Σ (f_i − f_i*)²) when every
f* is known. estimate() is also the forward-only pass maxright steers by.
"""
import math

import torch

from objectives import OBJECTIVES
from ranks import all_sum


@torch.no_grad()
def estimate(model, name, split, batches, ctx, autocast):
    """Per-example mean loss and metrics of objective name, over all ranks (forward only). batches: this rank's
    [(example ids, weights)], as many on every rank (ZeRO-3's forwards are collective): weight 0 pads."""
    model.eval()
    sums, count = {}, 0.0
    for ids, weights in batches:
        with autocast:
            losses, metrics = OBJECTIVES[name](model, split.batch(ids), ctx)
        w = torch.as_tensor(weights, dtype=torch.float64, device=losses.device)
        count += float(w.sum())
        for k, v in {'loss': losses, **metrics}.items():  # an objective's metrics['loss'] is its value (DPO without NLL)
            sums[k] = sums.get(k, 0.0) + float(torch.where(w > 0, v.double() * w, 0.0).sum())
    model.train()
    keys = sorted(sums)
    totals = all_sum([sums[k] for k in keys] + [count], split.device)
    return {k: total / totals[-1] for k, total in zip(keys, totals)}


def evaluate(model, val_data, sizes, batch_size, ctx, autocast, optimum_values=None):
    """{'val/<objective>/<metric>': value} over the first sizes[objective] examples of each val split, dealt round-robin
    over ranks in batches of batch_size; with every objective's f* (optimum_values, in val_data's order), also
    'val/ideal_distance'."""
    results = {}
    for name, split in val_data.items():
        for k, v in estimate(model, name, split, split.round_robin(sizes[name], batch_size), ctx, autocast).items():
            results[f'val/{name}/{k}'] = v
    if optimum_values:  # f* known for every objective (optima): the headline number
        gaps = [results[f'val/{n}/loss'] - f for n, f in zip(val_data, optimum_values)]
        results['val/ideal_distance'] = math.sqrt(sum(g * g for g in gaps))
    return results
