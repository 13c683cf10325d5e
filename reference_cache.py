"""
The DPO reference's log-probs computed once before training (reference_logps = 'precompute', as Tulu 3 does), so
that the reference model is freed: no reference weights and no reference forward during training.

Per preference split, [pairs, 2] arrays (column 0 the chosen response, 1 the rejected): the summed response log-probs
and the response token counts, by example id, in out_dir/reference_logps.npz with a fingerprint of the data files,
the reference (source, config, weights digest) and the settings that change its numbers. A file with another
fingerprint is recomputed with a note, not refused: it holds nothing but what the live reference computes now.
"""
import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from lm_head import response_logprobs


class ReferenceCache:
    """{split name: (sums, counts)}; objectives.dpo asks it for a batch's reference sums instead of running the model."""

    def __init__(self, splits):
        self.splits = splits

    def sums(self, batch):
        """[2B] summed reference log-probs of the batch's rows: its pairs' chosen responses first, as Split.batch."""
        sums, _ = self.splits[batch['split']]
        return sums[batch['index'].cpu()].T.reshape(-1).to(batch['input_ids'].device)


def weights_digest(model):
    """sha256 over every tensor's name, shape, dtype, and float64 sum and sum of squares to 12 digits (the order of a
    threaded sum never shows): one pass over the weights (a byte hash of an 8B model takes a minute per rank); any
    training step changes it. Taken before ZeRO-3 partitions the model."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        t = t.detach().double()
        h.update(f"{t.sum().item():.12g} {t.square().sum().item():.12g}".encode())
    return h.hexdigest()


@torch.no_grad()
def reference_pass(reference, split, ctx, batch_size, autocast):
    """(sums, counts) [pairs, 2] of the reference over a whole preference split: each rank its round-robin share of
    the pairs (Split.round_robin, padded batches weigh 0), gathered by a sum over ranks of the zero-filled arrays.
    The same forward (autocast, kernels) as the live reference's."""
    n = len(split.index)
    sums = torch.zeros(n, 2, device=split.device)
    counts = torch.zeros(n, 2, dtype=torch.int64, device=split.device)
    for ids, weights in split.round_robin(n, batch_size):
        with autocast:
            logps, mask = response_logprobs(reference, split.batch(ids), ctx)
        real = int(weights.sum())  # a padded batch (weight 0) is dropped
        rows = torch.as_tensor(ids[:real], device=split.device)
        sums[rows] = logps.sum(1).view(2, -1)[:, :real].T.float()
        counts[rows] = mask.sum(1).view(2, -1)[:, :real].T
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return sums.cpu(), counts.cpu()


def load_or_compute(path, splits, fingerprint, compute, master):
    """The ReferenceCache of these splits: read from path if its fingerprint is this one, else compute(split) for
    each, saved whole then renamed (a kill leaves the old file or the new one)."""
    if os.path.exists(path):
        with np.load(path) as f:
            saved = json.loads(str(f['fingerprint']))
            if saved == fingerprint:
                if master:
                    print(f"reference log-probs: reusing {path}")
                return ReferenceCache({s.name: (torch.from_numpy(f[s.name + '.sums']), torch.from_numpy(f[s.name + '.counts']))
                                       for s in splits})
        if master:
            changed = [k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
            print(f"note: {path} holds reference log-probs of another {', '.join(changed)}: computing them again")
    start = time.time()
    cache = {s.name: compute(s) for s in splits}
    if master:
        print(f"reference log-probs: {sum(len(s.index) for s in splits)} pairs of {[s.name for s in splits]} in "
              f"{time.time() - start:.1f}s -> {path}")
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with open(path + '.tmp', 'wb') as f:
            np.savez(f, fingerprint=json.dumps(fingerprint), **{f'{n}.{k}': v.numpy() for n, (sums, counts) in cache.items()
                                                               for k, v in (('sums', sums), ('counts', counts))})
        os.replace(path + '.tmp', path)
    return ReferenceCache(cache)


def fingerprint(splits, source, seed, reference, config, device):
    """What the cached numbers depend on: the data files, the reference (its source, config and weights digest) and
    the settings that change its arithmetic."""
    return {**{f'data {s.name}': s.digest() for s in splits},
            'reference': [os.path.abspath(source) if source != 'scratch' else f'scratch seed {seed}',
                          reference.config.to_json_string(), reference.bipost_weights],
            'settings': {**{k: config[k] for k in ('dtype', 'deepspeed', 'zero_stage', 'fused_kernels')},
                         'device': device.split(':')[0]}}


def precompute(reference, splits, source, ctx, config, device, autocast, master):
    """The ReferenceCache of every preference split among splits (train, val, trusted; each once): from
    out_dir/reference_logps.npz when its fingerprint matches, else computed now. The caller then frees the reference."""
    pref = list({s.name: s for s in splits if s.kind == 'pref'}.values())
    return load_or_compute(os.path.join(config['out_dir'], 'reference_logps.npz'), pref,
                           fingerprint(pref, source, config['seed'], reference, config, device),
                           lambda split: reference_pass(reference, split, ctx, config['batch_size'], autocast), master)
