"""
The post-training objectives, one plain function each, all with one signature:

    losses, metrics = objective(model, batch, ctx)

model: an HF causal LM (the raw module, also under DeepSpeed). batch: dict from Split.batch (data/loader.py) with
input_ids/attention_mask/response_mask [B, L] (for 'pref' data: 2B rows, chosen rows first; for 'prompt' data,
RL's: the prompts alone, left-padded, and each record's extra fields). ctx: a namespace with the frozen
reference/teacher and the hyperparameters. losses: one value per example (per pair for DPO, per prompt for RL),
so that the trainer can weight examples (bilevel data selection) before the mean.
metrics: name -> detached per-example tensor, averaged by the trainer. A metric named 'loss' is the objective's
value where the trained loss adds a regulariser (DPO + NLL) or is a surrogate (RL: −mean reward): logs, evals,
maxright and f* use it.

Log-probs come from lm_head.py (the model's own, for any HF family; response tokens only). SFT and KD are means over
an example's response tokens, then the trainer averages examples: every example counts the same whatever its length
(the f* in a config must be measured the same way).
"""
import math

import torch
import torch.nn.functional as F

from bipost_kernels.dpo import dpo_losses, ld_weights, sequence_logps
from lm_head import body_and_head, response_logprobs  # the head path every objective shares (lm_head.py)
import rl as reinforcement_learning  # the RL objective's rollouts and surrogate; rl.py reads lm_head.py, never this file
import packing  # padding-free packed rows (packing.py): kd's student and teacher
import reward_model  # the rm objective's scalar head and pairwise loss; it reads lm_head.py, never this file


def sft(model, batch, ctx):
    mask = batch['response_mask'][:, 1:].bool()
    tokens = mask.sum(1).clamp(min=1)
    hint = None  # the caller backpropagates Σ_b w_b·loss_b times a scalar, w = batch['weights'] or 1: known now
    if getattr(ctx, 'grads_in_forward', False):
        hint = (-batch.get('weights', 1.0) / tokens)[:, None].expand(mask.shape)
    logps, mask = response_logprobs(model, batch, ctx, grad_hint=hint)
    losses = -logps.sum(1) / tokens
    return losses, {'tokens': tokens.float()}


def dpo(model, batch, ctx):
    logps, mask = response_logprobs(model, batch, ctx)
    if getattr(ctx, 'reference_cache', None) is not None:  # precomputed: per-sequence sums, no reference forward
        reference_logps = reference_sum = ctx.reference_cache.sums(batch)
    else:
        with torch.no_grad():
            reference_logps, _ = response_logprobs(ctx.reference, batch, ctx)
        reference_sum = reference_logps.sum(1)
    losses, _, _ = dpo_losses(  # (the per-sequence values it also returns are the loss's: means where it uses means)
        logps, reference_logps, mask, ctx.beta, loss_type=ctx.dpo_loss, label_smoothing=ctx.label_smoothing,
        length_normalize=ctx.length_normalize, fused=None if ctx.fused_kernels else False,
        loss_weights=getattr(ctx, 'dpo_loss_weights', None), discopop_tau=getattr(ctx, 'discopop_tau', 0.05),
        ld_alpha=getattr(ctx, 'ld_alpha', 1.0))
    B = losses.shape[0]
    # logged with TRL's meaning whatever the loss uses (means for IPO and length_normalize): summed response
    # log-probs (LD-DPO's weighted sums with ld_alpha), and rewards β·(log πθ(y|x) − log πref(y|x)) of those sums
    policy_sum = logps.detach().sum(1)
    if getattr(ctx, 'ld_alpha', 1.0) != 1.0:  # (a precomputed reference was refused by dpo_losses)
        weights = ld_weights(mask, ctx.ld_alpha)
        policy_sum, reference_sum = (logps.detach() * weights).sum(1), (reference_logps * weights).sum(1)
    rewards = ctx.beta * (policy_sum - reference_sum)
    chosen, rejected = rewards[:B], rewards[B:]
    metrics = {'rewards/chosen': chosen, 'rewards/rejected': rejected, 'rewards/margins': chosen - rejected,
               'rewards/accuracies': (chosen > rejected).float(),
               'logps/chosen': policy_sum[:B], 'logps/rejected': policy_sum[B:]}
    if ctx.dpo_nll_weight > 0:  # RPO: NLL on the chosen response keeps its likelihood from sinking
        nll = -logps[:B].sum(1) / mask[:B].sum(1).clamp(min=1)
        metrics.update(loss=losses.detach(), nll=nll.detach())  # the DPO loss alone is what evals report as f
        losses = losses + ctx.dpo_nll_weight * nll
    return losses, metrics


# Reference-free preference losses: the policy's own log-probs of the chosen (rows 0..B-1) and rejected responses.
# Each matches TRL's trainer (CPOTrainer for simpo/cpo, ORPOTrainer), metrics too: rewards are β·(the loss's
# log-probs), and an NLL term is TRL's cross-entropy pooled over the chosen tokens of the micro-batch, written as B
# per-pair shares (−Σ_t log p of pair b's tokens · B / all chosen tokens) whose mean is exactly that cross-entropy.

def _pooled_nll(logps, mask):
    """B per-pair shares of the token-pooled NLL of rows logps[:B] (see above)."""
    B = logps.shape[0] // 2
    return -torch.where(mask[:B], logps[:B], 0.0).sum(1) * B / mask[:B].sum().clamp(min=1)


def _pair_metrics(chosen, rejected, beta, **extra):
    chosen, rejected = chosen.detach(), rejected.detach()
    return {'rewards/chosen': beta * chosen, 'rewards/rejected': beta * rejected,
            'rewards/margins': beta * (chosen - rejected), 'rewards/accuracies': (chosen > rejected).float(),
            'logps/chosen': chosen, 'logps/rejected': rejected, **{k: v.detach() for k, v in extra.items()}}


def _conservative(x, eps):  # DPO's logistic loss on x, label-smoothed (conservative) with ε
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def simpo(model, batch, ctx):
    """SimPO (Meng et al. 2024): −log σ(β·(mean log π(y_w) − mean log π(y_l)) − γ), γ = ctx.simpo_gamma; label
    smoothing ε as in conservative DPO. TRL (CPOTrainer, loss_type='simpo') computes β·(Δ − simpo_gamma/β): its
    simpo_gamma is this γ."""
    logps, mask = response_logprobs(model, batch, ctx)
    seq = sequence_logps(logps, mask, average=True)
    B = seq.shape[0] // 2
    losses = _conservative(ctx.beta * (seq[:B] - seq[B:]) - ctx.simpo_gamma, ctx.label_smoothing)
    return losses, _pair_metrics(seq[:B], seq[B:], ctx.beta)


def cpo(model, batch, ctx):
    """CPO (Xu et al. 2024): −log σ(β·(log π(y_w) − log π(y_l))) on summed log-probs (label smoothing ε as in
    conservative DPO) + α·NLL of the chosen responses, α = ctx.cpo_alpha (TRL's cpo_alpha)."""
    logps, mask = response_logprobs(model, batch, ctx)
    seq = sequence_logps(logps, mask, average=False)
    B = seq.shape[0] // 2
    nll = _pooled_nll(logps, mask)
    losses = _conservative(ctx.beta * (seq[:B] - seq[B:]), ctx.label_smoothing) + ctx.cpo_alpha * nll
    return losses, _pair_metrics(seq[:B], seq[B:], ctx.beta, nll_loss=nll)


def _log1mexp(x):
    """log(1 − exp(x)) for x < 0, stable on both sides of −log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(model, batch, ctx):
    """ORPO (Hong et al. 2024): NLL of the chosen sequences − λ·log σ(log odds(y_w) − log odds(y_l)), odds(y) =
    p/(1 − p) of the mean response log-prob p, λ = ctx.beta (TRL's). As in TRL's ORPOTrainer, the NLL covers the
    chosen prompt tokens too (labels are all attended tokens there)."""
    whole = {**batch, 'response_mask': batch['attention_mask']}  # one forward: every token scored, then split
    all_logps, all_mask = response_logprobs(model, whole, ctx)
    mask = batch['response_mask'][:, 1:].bool()
    seq = sequence_logps(torch.where(mask, all_logps, 0.0), mask, average=True)
    B = seq.shape[0] // 2
    log_odds = (seq[:B] - seq[B:]) - (_log1mexp(seq[:B]) - _log1mexp(seq[B:]))
    ratio = F.logsigmoid(log_odds)
    nll = _pooled_nll(all_logps, all_mask)
    return nll - ctx.beta * ratio, _pair_metrics(seq[:B], seq[B:], ctx.beta, nll_loss=nll, log_odds_ratio=ratio,
                                                  log_odds_chosen=log_odds)


def kto(model, batch, ctx):
    """KTO (Ethayarajh et al. 2024) on unpaired data, as TRL's KTOTrainer: rows 0..B-1 are each prompt with its own
    completion, B..2B-1 each prompt with another example's (data/loader.py), labels [B] (True: desirable). With
    ρ = β·(log πθ(y|x) − log πref(y|x)) on summed log-probs and the reference point z0 = max(0, mean over the
    mismatched rows of log πθ − log πref, each rank's mean averaged over the ranks) (no gradient), a desirable
    example's loss is λ_D·(1 − σ(ρ − β·z0)), an undesirable one's λ_U·(1 − σ(β·z0 − ρ)); their mean is TRL's loss.
    Metrics: TRL's kl, and rewards / logps of each class as per-example shares whose mean over the micro-batch is
    TRL's mean over that class."""
    B = batch['labels'].shape[0]
    own = {k: batch[k][:B] for k in ('input_ids', 'attention_mask', 'response_mask')}
    mismatched = {k: batch[k][B:] for k in ('input_ids', 'attention_mask', 'response_mask')}
    logps, mask = response_logprobs(model, own, ctx)
    policy = logps.sum(1)
    with torch.no_grad():
        reference = response_logprobs(ctx.reference, batch, ctx)[0].sum(1)
        kl = (response_logprobs(model, mismatched, ctx)[0].sum(1) - reference[B:]).mean()
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # TRL: the mean of every rank's
            torch.distributed.all_reduce(kl)  # mean, then the clamp; every rank runs kto in the same micro-step
            kl = kl / torch.distributed.get_world_size()
        kl = kl.clamp(min=0)
    logratio = policy - reference[:B]
    desirable = batch['labels'].bool()
    losses = torch.where(desirable, ctx.desirable_weight * (1 - torch.sigmoid(ctx.beta * (logratio - kl))),
                         ctx.undesirable_weight * (1 - torch.sigmoid(ctx.beta * (kl - logratio))))
    shares = {True: desirable * B / desirable.sum().clamp(min=1), False: ~desirable * B / (~desirable).sum().clamp(min=1)}
    rewards, policy = ctx.beta * logratio.detach(), policy.detach()
    metrics = {'kl': kl.expand(B), 'rewards/chosen': rewards * shares[True], 'rewards/rejected': rewards * shares[False],
               'logps/chosen': policy * shares[True], 'logps/rejected': policy * shares[False]}
    metrics['rewards/margins'] = metrics['rewards/chosen'] - metrics['rewards/rejected']
    return losses, metrics


def kd(model, batch, ctx, chunk=None):
    """Mean over an example's response positions of −Σ_v p_teacher(v) log p_student(v): the forward KL to the teacher
    up to the teacher's entropy. chunk: rows of logits at a time (Head.cross_entropy; default from the vocab)."""
    body, head = body_and_head(model)
    packed = getattr(ctx, 'packing', False)  # the student and the teacher on packed rows (packing.py): one layout
    hidden, layout = packing.scoring_hidden(body, batch, packed)
    mask = batch['response_mask'][:, 1:]
    rows = packing.gather(mask, layout).reshape(-1).nonzero().squeeze(-1)  # only response positions are distilled
    with torch.no_grad():
        teacher_body, teacher_head = body_and_head(ctx.teacher)
        teacher_hidden = packing.scoring_hidden(teacher_body, batch, packed)[0]
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    losses = head.cross_entropy(hidden.reshape(-1, hidden.shape[-1])[rows], teacher_head, teacher_hidden[rows], chunk)
    per_token = torch.zeros(hidden.shape[:-1].numel(), device=hidden.device, dtype=torch.float32)
    per_token = packing.spread(per_token.index_put((rows,), losses), layout, mask.shape)
    tokens = mask.sum(1).clamp(min=1)
    return per_token.view(mask.shape).sum(1) / tokens, {'tokens': tokens.float()}


def rl(model, batch, ctx):
    """Reinforcement learning on a batch of prompts: G sampled completions each, rewarded, the clipped surrogate with
    a KL to the reference (rl.py, which is long enough for a module of its own). Under no_grad: greedy, −reward."""
    return reinforcement_learning.objective(model, batch, ctx)


def rm(model, batch, ctx):
    """The reward model: a scalar head on the policy's body, TRL's pairwise loss on preference pairs (reward_model.py)."""
    return reward_model.objective(model, batch, ctx)


OBJECTIVES = {'sft': sft, 'dpo': dpo, 'kd': kd, 'rl': rl, 'simpo': simpo, 'cpo': cpo, 'orpo': orpo, 'kto': kto, 'rm': rm}
DATA_KIND = {'sft': 'sft', 'dpo': 'pref', 'kd': 'sft', 'rl': 'prompt', 'simpo': 'pref', 'cpo': 'pref',
             'orpo': 'pref', 'kto': 'unpaired', 'rm': 'pref'}  # which kind of split each objective reads
NEEDS_REFERENCE = ('dpo', 'kto')  # the objectives that read ctx.reference (rl's only with rl_kl > 0)
