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
import torch

from bipost_kernels.dpo import dpo_losses
from lm_head import body_and_head, response_logprobs  # the head path every objective shares (lm_head.py)
import rl as reinforcement_learning  # the RL objective's rollouts and surrogate; rl.py reads lm_head.py, never this file


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
        length_normalize=ctx.length_normalize, fused=None if ctx.fused_kernels else False)
    B = losses.shape[0]
    # logged with TRL's meaning whatever the loss uses (means for IPO and length_normalize): summed response
    # log-probs, and rewards β·(log πθ(y|x) − log πref(y|x)) of those sums
    policy_sum = logps.detach().sum(1)
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


def kd(model, batch, ctx, chunk=None):
    """Mean over an example's response positions of −Σ_v p_teacher(v) log p_student(v): the forward KL to the teacher
    up to the teacher's entropy. chunk: rows of logits at a time (Head.cross_entropy; default from the vocab)."""
    body, head = body_and_head(model)
    hidden = body(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).last_hidden_state[:, :-1]
    mask = batch['response_mask'][:, 1:]
    rows = mask.reshape(-1).nonzero().squeeze(-1)  # only response positions are distilled
    with torch.no_grad():
        teacher_body, teacher_head = body_and_head(ctx.teacher)
        teacher_hidden = teacher_body(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'])
        teacher_hidden = teacher_hidden.last_hidden_state[:, :-1].reshape(-1, teacher_hidden.last_hidden_state.shape[-1])
    losses = head.cross_entropy(hidden.reshape(-1, hidden.shape[-1])[rows], teacher_head, teacher_hidden[rows], chunk)
    per_token = torch.zeros(mask.numel(), device=hidden.device, dtype=torch.float32).index_put((rows,), losses)
    tokens = mask.sum(1).clamp(min=1)
    return per_token.view(mask.shape).sum(1) / tokens, {'tokens': tokens.float()}


def rl(model, batch, ctx):
    """Reinforcement learning on a batch of prompts: G sampled completions each, rewarded, the clipped surrogate with
    a KL to the reference (rl.py, which is long enough for a module of its own). Under no_grad: greedy, −reward."""
    return reinforcement_learning.objective(model, batch, ctx)


OBJECTIVES = {'sft': sft, 'dpo': dpo, 'kd': kd, 'rl': rl}
DATA_KIND = {'sft': 'sft', 'dpo': 'pref', 'kd': 'sft', 'rl': 'prompt'}  # which kind of split each objective reads
