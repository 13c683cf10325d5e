"""
The selector decides what each weight update optimizes:
- which objective (ObjectiveSelector): sequential, mix, alright or maxright, as in DESIGN.md;
- how much each training example counts (DataSelector): bilevel data weights from a trusted set.

Every rank must make the same choice every update: alright draws from a generator seeded identically
on every rank, and maxright's loss estimates are averaged across ranks by the trainer before they
reach observe(). Both classes keep all their state in state_dict() so that a resumed run continues
exactly where the killed one stopped.
"""
import math

import torch

STRATEGIES = ('sequential', 'mix', 'alright', 'maxright')


class ObjectiveSelector:
    """Objective i has preference weight λ_i (the λ's sum to 1) and optimum f_i* (for maxright)."""

    def __init__(self, names, weights, strategy, max_iters, optima=None, refresh_every=10, seed=0):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if len(weights) != len(names) or min(weights) < 0 or abs(sum(weights) - 1) > 1e-6:
            raise ValueError(f"weights must be one λ ≥ 0 per objective {names}, summing to 1; got {weights}")
        optima = list(optima) if optima else [0.0] * len(names)
        if len(optima) != len(names):
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
