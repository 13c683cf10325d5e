"""
Coreset selection (docs/coresets.md): pick K = ⌈γ·N⌉ examples of an SFT split, and a weight for each, whose
weighted gradients stand in for the whole split's. Methods: 'brief' (BRIEF), 'craig' (CRAIG), 'random'.

Per example (x, y), token means over the response:  L_SFT = −log p(y | x),  L_KN = −log p(y) (the response alone:
"knowledge"),  L_IF = L_SFT − L_KN (instruction following), so ∇L_SFT = ∇L_KN + ∇L_IF.
1. Features (one pass, the model and the data): per-example gradients g_SFT, g_KN, g_IF over a parameter subset,
   optionally at a warm-up run's weights and preconditioned by its Adam state, Rademacher-projected to d dimensions.
2. Selection (pure functions of the features): facility location F(C) = Σ_i (d_max − min_{j∈C} d_ij), maximized by
   lazy greedy ((1 − 1/e) of the best K); weight of j ∈ C: how many pool examples have j as nearest selected.
   CRAIG: d = ‖g_SFT,i − g_SFT,j‖. BRIEF: d(α) = d_KN/α + d_IF/(1−α) (α = 0: KN only, α = 1: IF only), with α
   chosen by golden-section search on E(α) = E_KN(C_α) + E_IF(C_α), E_X(C) = mean_i min_{j∈C} ‖g^X_i − g^X_j‖:
   one coreset that keeps both gradient-approximation errors small, not only that of their sum.
Distances are computed in blocks of rows, never all N×N at once: memory O(chunk × N).
"""
import heapq
import math
import os
import pickle
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import write_json_atomic
from data.prepare import DataError
from selector import save_selection

CHUNK = 1024  # rows per distance block
SPACES = ('sft', 'kn', 'if')

# -----------------------------------------------------------------------------
# selection math: features X [N, d] (float tensors); a distance is a list of (features, factor) terms,
# d_ij = Σ factor·‖X_i − X_j‖

def distances(a, b):
    """Euclidean distances [len(a), len(b)] by ‖a‖² + ‖b‖² − 2ab (clamped at 0 against rounding)."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return squared.clamp_(min=0).sqrt_()


def block(terms, rows, cols):
    """d over the examples rows × cols (index arrays or slices) of a composite distance."""
    return sum(factor * distances(X[rows], X[cols]) for X, factor in terms)


def brief_terms(kn, if_, alpha):
    """d(α) = d_KN/α + d_IF/(1−α); the endpoints use one space only (its factor 1)."""
    if alpha <= 0:
        return [(kn, 1.0)]
    if alpha >= 1:
        return [(if_, 1.0)]
    return [(kn, 1 / alpha), (if_, 1 / (1 - alpha))]


def facility_location(terms, k, chunk=CHUNK, refresh=16):
    """The K examples picked by lazy greedy on F(C) = Σ_i (d_max − min_{j∈C} d_ij), in the order picked.
    Gains only shrink as C grows (F is submodular), so a stale gain bounds the fresh one: refresh the `refresh`
    largest bounds (one [N, refresh] block of d), and take the best fresh gain if it still beats every other bound
    (ties: the lower index, as plain greedy's argmax); else put them back with their fresh gains and repeat.
    A pass over all rows gives d_max and the first gains."""
    n = len(terms[0][0])
    k = min(k, n)
    column_sums, d_max = torch.zeros(n, dtype=torch.float64), 0.0
    for s in range(0, n, chunk):
        d = block(terms, slice(s, s + chunk), slice(None)).double()
        column_sums += d.sum(0)
        d_max = max(d_max, float(d.max()))
    nearest = torch.full((n,), d_max, dtype=torch.float64)  # distance to the closest selected (d_max: none yet)
    heap = [(-(n * d_max - float(column_sums[j])), j) for j in range(n)]
    heapq.heapify(heap)
    selected = []
    while len(selected) < k:
        ids = [heapq.heappop(heap)[1] for _ in range(min(refresh, len(heap)))]
        columns = block(terms, slice(None), ids).double()
        gains = (nearest[:, None] - columns).clamp(min=0).sum(0).tolist()
        fresh = sorted((-g, j, i) for i, (g, j) in enumerate(zip(gains, ids)))
        if not heap or fresh[0][:2] <= heap[0]:
            selected.append(fresh[0][1])
            nearest = torch.minimum(nearest, columns[:, fresh[0][2]])
            fresh = fresh[1:]
        for negative_gain, j, _ in fresh:
            heapq.heappush(heap, (negative_gain, j))
    return selected


def partitioned_facility_location(terms, k, partition, seed, chunk=CHUNK):
    """Lazy greedy per random part of at most `partition` examples, K split over the parts by size. The union is within
    (1 − 1/e) of the best coreset that serves each part from that part only (F is then a sum over the parts); against
    an unrestricted coreset there is no such bound (CRAIG selects per class the same way)."""
    n = len(terms[0][0])
    if partition <= 0 or n <= partition:
        return facility_location(terms, k, chunk)
    parts = np.array_split(np.random.default_rng(seed).permutation(n), math.ceil(n / partition))
    shares = [k * len(p) // n for p in parts]
    for i in range(k - sum(shares)):  # the remainder, one each to the first parts
        shares[i] += 1
    selected = []
    for part, share in zip(parts, shares):
        index = torch.as_tensor(part)
        picked = facility_location([(X[index], f) for X, f in terms], share, chunk)
        selected += part[picked].tolist()
    return selected


def nearest_selected(terms, selected, chunk=CHUNK):
    """For every example: the position in `selected` of its nearest selected example (ties: the first), and the
    distance to it."""
    n, cols = len(terms[0][0]), torch.as_tensor(selected)
    position, distance = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.float64)
    for s in range(0, n, chunk):
        d = block(terms, slice(s, s + chunk), cols).double()
        distance[s:s + chunk], position[s:s + chunk] = d.min(1)
    position[cols], distance[cols] = torch.arange(len(cols)), 0.0  # exactly, whatever the rounding of ‖a‖² + ‖b‖² − 2ab
    return position, distance


def coverage_weights(terms, selected, chunk=CHUNK):
    """How many pool examples each selected example is nearest to (sums to N; a selected example counts itself)."""
    position, _ = nearest_selected(terms, selected, chunk)
    return np.bincount(position.numpy(), minlength=len(selected)).astype(np.float64)


def coverage_error(X, selected, chunk=CHUNK):
    """E_X(C) = (1/N) Σ_i min_{j∈C} ‖X_i − X_j‖: how far the coreset leaves the average example in space X."""
    return float(nearest_selected([(X, 1.0)], selected, chunk)[1].mean())


def golden_section(f, lo=0.0, hi=1.0, tolerance=0.005, max_evals=15):
    """argmin of f on [lo, hi] for a unimodal f: both ends evaluated (the minimum may sit at an end), then golden-
    section steps (one new evaluation each, the bracket shrinks by 0.618) until it is narrower than tolerance or
    max_evals are spent. Returns (best x, f(best x), [(x, f(x)) in evaluation order])."""
    history = []

    def evaluate(x):
        history.append((x, f(x)))
        return history[-1][1]

    ratio = (math.sqrt(5) - 1) / 2
    evaluate(lo)
    evaluate(hi)
    a, b = lo, hi
    x1, x2 = b - ratio * (b - a), a + ratio * (b - a)
    f1, f2 = evaluate(x1), evaluate(x2)
    while b - a > tolerance and len(history) < max_evals:
        if f1 <= f2:  # the minimum is in [a, x2]
            b, x2, f2 = x2, x1, f1
            x1 = b - ratio * (b - a)
            f1 = evaluate(x1)
        else:         # in [x1, b]
            a, x1, f1 = x1, x2, f2
            x2 = a + ratio * (b - a)
            f2 = evaluate(x2)
    x, fx = min(history, key=lambda h: h[1])
    return x, fx, history


def select(method, features, fraction, seed=0, tolerance=0.005, max_evals=15, partition=0, chunk=CHUNK):
    """The coreset of a pool: {'selected': ids in the order picked, 'weights': [K] summing to N, 'alpha', 'scores'}.
    features: {'sft', 'kn', 'if': [N, d] tensors}. random: K uniform draws, each weighing N/K."""
    # distances do not change under a shift, and gradients share a large common part: without it, ‖a‖² + ‖b‖² − 2ab
    # would lose the differences to rounding (fp32 features)
    features = {s: features[s] - features[s].mean(0) for s in SPACES}
    n = len(features['sft'])
    k = min(n, math.ceil(fraction * n - 1e-9))  # ⌈γ·N⌉, not pushed up by rounding (0.07·100 = 7.000000000000001)
    greedy = lambda terms: partitioned_facility_location(terms, k, partition, seed, chunk)
    scores = lambda picked: {f'E_{s}': coverage_error(features[s], picked, chunk) for s in ('kn', 'if', 'sft')
                             if features[s].shape[1]}  # none without features (random)
    alpha, search = None, []
    if method == 'random':
        selected = np.random.default_rng(seed).choice(n, k, replace=False).tolist()
        return {'selected': selected, 'weights': np.full(k, n / k), 'alpha': None, 'scores': scores(selected),
                'search': []}
    if method == 'craig':
        terms = [(features['sft'], 1.0)]
        selected = greedy(terms)
    elif method == 'brief':
        coresets = {}

        def error(a):  # E(α) = E_KN + E_IF of the coreset picked under d(α)
            coresets[a] = greedy(brief_terms(features['kn'], features['if'], a))
            s = scores(coresets[a])
            search.append({'alpha': a, **s, 'E': s['E_kn'] + s['E_if']})
            return search[-1]['E']

        alpha, _, _ = golden_section(error, 0.0, 1.0, tolerance, max_evals)
        terms, selected = brief_terms(features['kn'], features['if'], alpha), coresets[alpha]
    else:
        raise ValueError(f"coreset method must be 'brief', 'craig' or 'random', got {method!r}")
    return {'selected': selected, 'weights': coverage_weights(terms, selected, chunk), 'alpha': alpha,
            'scores': scores(selected), 'search': search}

# -----------------------------------------------------------------------------
# features: per-example gradients of L_SFT and L_KN over a parameter subset, one pass over the split

def parameter_subset(named_parameters, which):
    """Names of the parameters the features are taken over. 'trainable': every one with requires_grad (the LoRA
    adapters under LoRA); 'last': the last transformer layer and everything after it (final norm, LM head), i.e.
    from the first parameter of the highest-numbered layer on, in the model's own order."""
    named = list(named_parameters)
    if which == 'trainable':
        return [n for n, p in named if p.requires_grad]
    numbered = [(int(part), i) for i, (n, _) in enumerate(named) for part in n.split('.')[:-1] if part.isdigit()]
    if not numbered:
        raise ValueError("coreset_params='last': the model has no numbered layers; use 'trainable'")
    last = max(numbered)[0]
    start = min(i for layer, i in numbered if layer == last)
    return [n for n, _ in named[start:]]


class Projection:
    """x ↦ x R with R [P, d] of independent ±1/√d entries (E‖xR‖² = ‖x‖²), drawn in blocks of BLOCK rows, block b
    from a generator seeded (seed, b): the same seed gives the same R whatever the batch. Kept in memory when it
    fits in ~256 MiB, else drawn again at each call."""
    BLOCK = 1 << 14

    def __init__(self, rows, dim, seed, device='cpu'):
        self.rows, self.dim, self.seed, self.device = rows, dim, seed, device
        self.cache = [] if rows * dim <= 1 << 26 else None
        if self.cache is not None:
            self.cache = [self.block(s) for s in range(0, rows, self.BLOCK)]

    def block(self, start):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + start // self.BLOCK)
        signs = torch.randint(0, 2, (min(self.BLOCK, self.rows - start), self.dim), generator=generator)
        return ((2 * signs - 1).float() / math.sqrt(self.dim)).to(self.device)

    def __call__(self, x):
        out = x.new_zeros(x.shape[0], self.dim)
        for i, s in enumerate(range(0, self.rows, self.BLOCK)):
            R = self.cache[i] if self.cache is not None else self.block(s)
            out += x[:, s:s + self.BLOCK] @ R
        return out


def warmup_state(path, model, names):
    """Loads the warm-up run's weights from its torch checkpoint (out_dir/ckpt.pt: every weight, or the LoRA adapters
    alone, whose base is the model's own) into model, and returns (exp_avg, exp_avg_sq, β1, β2) of the parameters
    `names`, flattened in that order. Its optimizer holds the trainable parameters ≥ 2-D first, then the others
    (bipost.py's two groups), each in the model's order."""
    file = os.path.join(path, 'ckpt.pt')
    if not os.path.exists(file):
        raise ValueError(f"coreset_adam={path}: {file} not found: give the out_dir of a plain-torch (not DeepSpeed) "
                         f"warm-up run, or coreset_adam='' for plain gradients")
    checkpoint = torch.load(file, map_location='cpu', weights_only=False)
    optimizer = checkpoint['optimizer']
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    order = [n for n, p in trainable if p.dim() >= 2] + [n for n, p in trainable if p.dim() < 2]
    shapes = dict(model.named_parameters())
    state = {order[i]: s for i, s in optimizer['state'].items() if i < len(order)}
    unfit = f"coreset_adam={path}: its checkpoint does not fit this model ({names[0]}, ...): init_from must be the " \
            f"warm-up's own base model (its init_from, with the same lora_rank)"
    if len(order) != sum(len(g['params']) for g in optimizer['param_groups']) or \
            any(n not in state or state[n]['exp_avg'].shape != shapes[n].shape for n in names):
        raise ValueError(unfit)
    try:
        unexpected = model.load_state_dict(checkpoint['model'], strict=False).unexpected_keys
    except RuntimeError:  # a shape differs
        unexpected = True
    if unexpected:
        raise ValueError(unfit)
    beta1, beta2 = optimizer['param_groups'][0]['betas']
    flat = lambda key: torch.cat([state[n][key].reshape(-1).float() for n in names])
    return flat('exp_avg'), flat('exp_avg_sq'), beta1, beta2


def knowledge_batch(batch, eos_id):
    """The response alone: each row becomes [EOS] + its response tokens (an EOS starts a document after another
    one ends, so the first response token is scored with no prompt, as every other)."""
    rows = [ids[mask] for ids, mask in zip(batch['input_ids'], batch['response_mask'].bool())]
    length = 1 + max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), eos_id, dtype=batch['input_ids'].dtype, device=batch['input_ids'].device)
    response_mask = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    for i, r in enumerate(rows):
        input_ids[i, 1:1 + len(r)], response_mask[i, 1:1 + len(r)] = r, True
    return {'input_ids': input_ids, 'response_mask': response_mask}


def example_gradients(model, names, batch):
    """[B, P] per-example gradients of the token-mean response NLL over the parameters `names` (flattened, in order):
    vmap of grad over functional_call, one example per call. Rows are right-padded and attention is causal, so an
    example needs no attention mask: no real token attends to the padding after it. The log-probs are the model's
    own logits' (check_head made sure bipost's equal them)."""
    from torch.func import functional_call, grad, vmap
    params = {n: p.detach() for n, p in model.named_parameters() if n in set(names)}

    def loss(params, ids, mask):
        logits = functional_call(model, params, (ids[None],), {'use_cache': False}).logits[0, :-1].float()
        logps = logits.log_softmax(-1).gather(-1, ids[1:, None])[:, 0]
        scored = mask[1:].float()
        return -(logps * scored).sum() / scored.sum().clamp(min=1)

    with warnings.catch_warnings():  # CPU attention has no vmap rule: torch loops over the examples there, still exact
        warnings.filterwarnings('ignore', message='There is a performance drop')
        grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, batch['input_ids'], batch['response_mask'])
    return torch.cat([grads[n].reshape(len(batch['input_ids']), -1) for n in names], 1)


def gradient_features(model, split, ids, names, dim, seed, eos_id, batch_size, adam=None):
    """{'sft', 'kn', 'if': [len(ids), dim]}: projected (and, with adam = (m, v, β1, β2), preconditioned:
    m' = β1·m + (1−β1)·g, v' = β2·v + (1−β2)·g², feature m'/√(v' + 1e-8)) per-example gradients."""
    P = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
    project = Projection(P, dim, seed, next(model.parameters()).device)
    out = {s: [] for s in SPACES}
    for s in range(0, len(ids), batch_size):
        batch = split.batch(ids[s:s + batch_size])
        g = {'sft': example_gradients(model, names, batch),
             'kn': example_gradients(model, names, knowledge_batch(batch, eos_id))}
        g['if'] = g['sft'] - g['kn']
        for space in SPACES:
            x = g[space]
            if adam is not None:
                m, v, beta1, beta2 = adam
                x = (beta1 * m + (1 - beta1) * x) / (beta2 * v + (1 - beta2) * x * x + 1e-8).sqrt()
            out[space].append(project(x).cpu())
    return {s: torch.cat(v) if v else torch.zeros(0, dim) for s, v in out.items()}

# -----------------------------------------------------------------------------
# the coreset mode of bipost.py, and the trainer's per-example weights

def load_example_weights(path, split, device):
    """Per-example loss weights of `split` (a weights.npy of the coreset or the data selector: one per example of the
    whole split), scaled to mean 1 over the examples trained on (split.ids: the keep-list, or all)."""
    if not os.path.exists(path):
        raise DataError(f"example_weights={path} not found: run the coreset selection or the data selector first")
    w = np.load(path).astype(np.float64)
    if w.shape != (len(split.index),) or not np.isfinite(w).all() or (w < 0).any() or w[split.ids].sum() <= 0:
        raise DataError(f"example_weights={path} holds {w.shape} weights, but split '{split.name}' has "
                         f"{len(split.index)} examples and the weights must be finite, >= 0 and not all 0 on those "
                         f"trained on: it was made for another split (keep_objective) or is broken; select again")
    return torch.as_tensor(w / w[split.ids].mean(), dtype=torch.float32, device=device)


def run(config, model, split, eos_id, rank, world_size, master):
    """bipost.py's coreset mode: features of `split` (or config['coreset_features']), the selection (rank 0), and
    out_dir/{weights,keep,ranking}.npy (as the data selector writes them: weights [N], 0 off the coreset, summing
    to N; ranking: the coreset in the order picked, then the rest by index) + coreset.json + coreset_features.pt.
    Raises ValueError on bad input."""
    out_dir, n = config['out_dir'], len(split.index)
    fingerprint = {'split': split.name, 'digest': split.digest(), 'examples': n}
    t0 = time.time()
    if config['coreset_features']:
        try:
            features = torch.load(config['coreset_features'], weights_only=False)
            saved = {k: features['fingerprint'].get(k) for k in fingerprint}
        except (OSError, RuntimeError, KeyError, TypeError, AttributeError, pickle.UnpicklingError):
            saved = None  # missing, or not a features file
        if saved != fingerprint:
            raise ValueError(f"coreset_features={config['coreset_features']} is missing or holds the features of another "
                             f"split or dataset than {split.name} ({split.path}): leave coreset_features='' to compute them")
    elif config['coreset'] == 'random':  # needs no features (give coreset_features for its E scores)
        features = {s: torch.zeros(n, 0) for s in SPACES} | {'fingerprint': fingerprint}
    else:
        names = parameter_subset(model.named_parameters(), config['coreset_params'])
        device = next(model.parameters()).device
        adam = None
        if config['coreset_adam']:
            m, v, beta1, beta2 = warmup_state(config['coreset_adam'], model, names)  # also its weights
            adam = (m.to(device), v.to(device), beta1, beta2)
        mine = np.arange(rank, n, world_size)  # each rank its round-robin share, gathered by a sum
        model.requires_grad_(False).eval()  # torch.func's gradients, of the subset only; no dropout (vmap refuses it)
        part = gradient_features(model, split, mine, names, config['coreset_dim'], config['seed'], eos_id,
                                 config['batch_size'], adam)
        features = {s: torch.zeros(n, config['coreset_dim']) for s in SPACES}
        for s in SPACES:
            features[s][mine] = part[s]
            if world_size > 1:
                features[s] = features[s].to(device)
                dist.all_reduce(features[s])
                features[s] = features[s].cpu()
        features['fingerprint'] = {**fingerprint, 'params': names, 'dim': config['coreset_dim'], 'seed': config['seed'],
                                   'adam': config['coreset_adam'], 'model': config['init_from']}
    feature_seconds = time.time() - t0
    if not master:
        return
    os.makedirs(out_dir, exist_ok=True)
    if not config['coreset_features'] and config['coreset'] != 'random':
        torch.save(features, os.path.join(out_dir, 'coreset_features.pt'))
    t0 = time.time()
    result = select(config['coreset'], features, config['coreset_fraction'], config['seed'], config['coreset_tolerance'],
                    15, config['coreset_partition'])
    selected = np.asarray(result['selected'], dtype=np.int64)
    weights = np.zeros(n)
    weights[selected] = result['weights']
    ranking = np.concatenate([selected, np.setdiff1d(np.arange(n), selected)])
    save_selection(out_dir, weights, ranking, np.sort(selected))
    summary = {'method': config['coreset'], 'fraction': config['coreset_fraction'], 'examples': n, 'selected': len(selected),
               'alpha': result['alpha'], **result['scores'], 'search': result['search'],
               'features': {k: v for k, v in features['fingerprint'].items() if k != 'params'},
               'feature_seconds': round(feature_seconds, 2), 'selection_seconds': round(time.time() - t0, 2)}
    write_json_atomic(os.path.join(out_dir, 'coreset.json'), summary)
    facts = ([f"alpha {result['alpha']:.3f}"] if result['alpha'] is not None else []) + \
        [f"{k} {v:.4f}" for k, v in result['scores'].items()]
    print(f"coreset {config['coreset']}: {len(selected)} of {n} examples of {split.name} | " + ' | '.join(facts + [
          f"features {feature_seconds:.1f}s", f"selection {summary['selection_seconds']:.1f}s -> {out_dir}/"
          f"{{weights,keep,ranking}}.npy, coreset.json"]))
