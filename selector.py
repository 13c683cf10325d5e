"""
The selector decides what each weight update optimizes:
- which objective (ObjectiveSelector): sequential, mix, alright or maxright (README, how it works);
- how much each training example counts (DataSelector): bilevel data weights from a trusted set;
and keeps each objective's optimum f* (maxright, the ideal distance): optimum.json, written by a run on one objective.

Every rank must make the same choice every update: alright draws from a generator seeded identically
on every rank, and maxright's loss estimates are averaged across ranks by the trainer before they
reach observe(); the data selector gathers every rank's (index, loss difference) before its ω step and
averages θ̂'s gradients, so every rank holds the same ω and θ̂. Both classes keep all their state in
state_dict() so that a resumed run continues exactly where the killed one stopped.
"""
import copy
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import write_json_atomic

STRATEGIES = ('sequential', 'mix', 'alright', 'maxright')


class ObjectiveSelector:
    """Objective i has preference weight λ_i (the λ's sum to 1) and optimum f_i* (for maxright)."""

    def __init__(self, names, weights, strategy, max_iters, optima=None, refresh_every=10, seed=0):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if len(weights) != len(names) or min(weights) < 0 or abs(sum(weights) - 1) > 1e-6:
            raise ValueError(f"weights must be one λ ≥ 0 per objective {names}, summing to 1; got {weights}")
        if strategy == 'maxright' and not optima:  # raw losses of different objectives are not comparable
            raise ValueError(f"maxright needs f* of every objective {names} (optima: a number or a single-objective "
                             f"run's out_dir each); with f* unknown use alright or mix")
        if optima and len(optima) != len(names):
            raise ValueError(f"optima must hold one f* per objective {names}; got {optima}")
        self.names, self.weights, self.strategy, self.optima = list(names), list(weights), strategy, optima
        self.refresh_every = refresh_every
        self.cumulative = [sum(weights[:i + 1]) for i in range(len(weights))]
        # sequential: objective i owns the updates [λ_<i · max_iters, λ_≤i · max_iters)
        self.boundaries = [round(c * max_iters) for c in self.cumulative]
        self.generator = torch.Generator().manual_seed(seed)
        self.estimates = [math.inf] * len(names)  # maxright: stale estimates of each f_i

    def choose(self, iter_num):
        """The objectives of this update, as [(name, weight of its loss)]."""
        if self.strategy == 'mix':
            return list(zip(self.names, self.weights))
        if self.strategy == 'sequential':
            i = next((i for i, b in enumerate(self.boundaries) if iter_num < b), len(self.names) - 1)
        elif self.strategy == 'alright':
            u = torch.rand((), generator=self.generator).item()
            i = next((i for i, c in enumerate(self.cumulative) if u < c), len(self.names) - 1)
        else:  # maxright: the larger weighted sub-optimality λ_i (f_i − f_i*) gets the step
            gaps = [w * (f - f_star) for w, f, f_star in zip(self.weights, self.estimates, self.optima)]
            i = max(range(len(gaps)), key=lambda j: gaps[j])
        return [(self.names[i], 1.0)]

    def needs_refresh(self, iter_num):
        return self.strategy == 'maxright' and iter_num % self.refresh_every == 0

    def observe(self, name, value):
        self.estimates[self.names.index(name)] = float(value)

    def state_dict(self):
        return {'generator': self.generator.get_state(), 'estimates': list(self.estimates)}

    def load_state_dict(self, state):
        self.generator.set_state(state['generator'])
        self.estimates = list(state['estimates'])


def _gather(t):
    """Every rank's rows in rank order, so that every rank takes the same ω step (identity in a world of one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts)


class DataSelector:
    """Bilevel data weights (docs/data-selection.md): one logit ω_i per example of the training split, by its stable index.

    Penalty (value-function) form; per micro-step, with a trusted batch G and a training batch I:
      model θ:  c·mean(ℓ_G(θ)) + (1−c)·mean(w_I·ℓ_I(θ)), w detached, c = c0·decay^epoch (the trainer's loss)
      ω:        one SGD step on mean(w_I(ω)·(d_I − mean(d_I))), d = ℓ(θ) − ℓ(θ̂) detached, all ranks' rows
      θ̂:        one Adam step on mean(w_I·ℓ_I(θ̂)): it tracks the lower-level optimum for the current weights
    Shifting d by a constant changes no expected softmax gradient (E_I[mean_I w] = 1 for every ω); shifting
    it by the batch mean removes the drift of the loss level during training, which would otherwise rank
    examples by when they were seen (early batches have high losses). Measured on the demo
    (lower_level='none'): ranking AUC 0.85 with the shift, 0.51 without. The ω step per example is
    lr·w_i·(d_i − mean)/B (B: the global batch), so lr ~ B; SGD, not Adam, whose per-coordinate scaling
    blows up the O(1/N) gradients of the ω's not in the batch.
    An example that θ̂ (the weighted training data alone) fits better than θ (also held to the trusted set)
    is one the trusted set disagrees with, and its weight falls. lower_level: 'copy' (θ̂ as above, a copy
    of the policy: not under ZeRO-3), 'reference' (θ̂ = the frozen ctx.reference; free, but it never moves),
    'none' (no θ̂ term, as in the original BiPOST code: high-loss examples lose weight).
    """

    def __init__(self, n, objective, model=None, weights='softmax', lr=16.0, lower_level='copy', lower_lr=1e-3,
                 trusted_weight=0.8, trusted_decay=0.5, device=None):
        if weights not in ('softmax', 'sigmoid') or lower_level not in ('copy', 'reference', 'none'):
            raise ValueError(f"weights must be 'softmax'|'sigmoid' and lower_level 'copy'|'reference'|'none'; "
                             f"got {weights!r}, {lower_level!r}")
        self.n, self.objective, self.kind, self.lower_level = n, objective, weights, lower_level
        self.trusted_weight, self.trusted_decay = trusted_weight, trusted_decay
        self.omega = torch.zeros(n, requires_grad=True)  # on the CPU: every rank holds all N
        self.optimizer = torch.optim.SGD([self.omega], lr=lr)
        self.lower = self.lower_optimizer = None
        if lower_level == 'copy':
            self.lower = copy.deepcopy(model).to(device).train()
            self.lower_optimizer = torch.optim.Adam(self.lower.parameters(), lr=lower_lr)  # keeps pace with θ's AdamW

    def weights(self, index=None):
        """w = N·softmax(ω) (mean exactly 1) or 2·sigmoid(ω) (mean 1 at the start), of the given examples."""
        w = self.n * torch.softmax(self.omega, 0) if self.kind == 'softmax' else 2 * torch.sigmoid(self.omega)
        return w if index is None else w[index]

    def trusted_share(self, epoch):
        return self.trusted_weight * self.trusted_decay ** epoch

    def lower_losses(self, batch, ctx, w):
        """ℓ_I(θ̂) (detached); with lower_level='copy' also takes θ̂'s step on the weighted loss."""
        if self.lower_level == 'none':
            return 0.0
        if self.lower_level == 'reference':
            with torch.no_grad():
                return self.objective(ctx.reference, batch, ctx)[0].detach().float()
        losses = self.objective(self.lower, batch, ctx)[0]
        self.lower_optimizer.zero_grad(set_to_none=True)
        (w * losses).mean().backward()
        grads = [p.grad for p in self.lower.parameters() if p.grad is not None]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for g in grads:  # the same θ̂ on every rank
                dist.all_reduce(g)
                g /= dist.get_world_size()
        if all(torch.isfinite(g).all() for g in grads):  # a bad batch must not poison θ̂ (same branch on all ranks)
            self.lower_optimizer.step()
        return losses.detach().float()

    def step(self, losses, batch, trusted_batch, model, ctx, epoch):
        """losses: ℓ_I(θ) with grad. Updates ω and θ̂; returns the model loss for the trainer to backprop."""
        c = self.trusted_share(epoch)
        w = self.weights(batch['index'].cpu()).detach().to(losses.device)
        trusted_losses = self.objective(model, trusted_batch, ctx)[0]
        difference = losses.detach().float() - self.lower_losses(batch, ctx, w)
        gathered = _gather(torch.stack([batch['index'].double(), difference.double()], 1)).cpu()  # exact ids to 2^53
        if torch.isfinite(gathered).all():  # the trainer handles a non-finite loss; ω stays as it was
            self.optimizer.zero_grad(set_to_none=True)
            difference = gathered[:, 1].float()
            (self.weights(gathered[:, 0].long()) * (difference - difference.mean())).mean().backward()
            self.optimizer.step()
        return c * trusted_losses.mean() + (1 - c) * (w * losses).mean()

    def state_dict(self):
        return {'omega': self.omega.detach().clone(), 'optimizer': self.optimizer.state_dict(),
                'lower': self.lower.state_dict() if self.lower else None,
                'lower_optimizer': self.lower_optimizer.state_dict() if self.lower else None}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.omega.copy_(state['omega'])
        self.optimizer.load_state_dict(state['optimizer'])
        if self.lower:
            self.lower.load_state_dict(state['lower'])
            self.lower_optimizer.load_state_dict(state['lower_optimizer'])

    def save(self, out_dir, keep_fraction):
        """weights.npy [N], ranking.npy (example indices, highest weight first), keep.npy (top fraction, sorted)."""
        w = self.weights().detach().numpy()
        ranking = np.argsort(-w, kind='stable')
        save_selection(out_dir, w, ranking, np.sort(ranking[:max(1, round(keep_fraction * self.n))]))


def save_selection(out_dir, weights, ranking, keep):
    """What a data selector leaves for training runs (keep_list, example_weights), the online selector's and the
    coresets' alike: weights.npy [N], ranking.npy (best first), keep.npy (sorted); each written atomically."""
    for name, array in (('weights', weights), ('ranking', ranking), ('keep', keep)):
        with open(os.path.join(out_dir, name + '.npy.tmp'), 'wb') as f:  # atomic, like the checkpoint
            np.save(f, array)
        os.replace(os.path.join(out_dir, name + '.npy.tmp'), os.path.join(out_dir, name + '.npy'))


# ----------------------------------------------------------------------------------------------
# f*: the best held-out loss of a run on one objective alone, read back by later runs (maxright, ideal distance)

# what fixes the value of each objective's held-out loss: an f* is only comparable under the same settings
OBJECTIVE_SETTINGS = {'sft': (), 'kd': ('teacher_from',),
                      'dpo': ('beta', 'dpo_loss', 'dpo_loss_weights', 'discopop_tau', 'ld_alpha', 'label_smoothing',
                              'length_normalize', 'reference_from'),
                      'simpo': ('beta', 'simpo_gamma', 'label_smoothing'), 'cpo': ('beta', 'cpo_alpha', 'label_smoothing'),
                      'orpo': ('beta',), 'kto': ('beta', 'desirable_weight', 'undesirable_weight', 'reference_from'),
                      'rl': ('rl_reward', 'rl_reward_scale', 'rl_max_new_tokens'), 'rm': ('rm_center_coefficient',)}


def optimum_record(name, config, val_split, eval_examples):
    """What makes objective name's held-out loss comparable: the split, how many of its examples, their digest, and
    the settings that fix the loss's value."""
    return {'objective': name, 'val_split': config['val_splits'][name], 'eval_examples': eval_examples,
            'val_data': val_split.digest(), **{k: config[k] for k in OBJECTIVE_SETTINGS.get(name, ())}}


def read_optimum(name, source, record):
    """f* of one objective: a number, or the best held-out loss a run on that objective alone wrote to optimum.json,
    measured as record says (ValueError otherwise: the losses would not be comparable)."""
    if not isinstance(source, str):
        return float(source)
    path = source if source.endswith('.json') else os.path.join(source, 'optimum.json')
    if not os.path.exists(path):
        raise ValueError(f"optima: {path} not found: train '{name}' alone with --out_dir={source} first (every eval of "
                         f"a single-objective run writes optimum.json), or give f* as a number")
    with open(path) as f:
        saved = json.load(f)
    for key, value in record.items():
        if saved.get(key) != value:
            raise ValueError(f"optima: {path} measured f* of '{saved.get('objective')}' with {key}={saved.get(key)!r}, "
                             f"but this run has {key}={value!r}: the losses are not comparable; measure f* with this "
                             f"run's settings")
    return saved['best']


def write_optimum(out_dir, record, loss, iter_num, resumed):
    """out_dir/optimum.json: the best and the last held-out loss of this run, with what makes it comparable (record);
    a resumed run's best counts the evals before its kill too."""
    path = os.path.join(out_dir, 'optimum.json')
    best = loss
    if resumed and os.path.exists(path):
        with open(path) as f:
            best = min(best, json.load(f)['best'])
    write_json_atomic(path, {**record, 'best': best, 'final': loss, 'iter': iter_num})
