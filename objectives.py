"""
The post-training objectives, one plain function each, all with one signature:

    losses, metrics = objective(model, batch, ctx)

model: an HF causal LM (the raw module, also under DeepSpeed). batch: dict from bipost.get_batch with
input_ids/attention_mask/response_mask [B, L] (for 'pref' data: 2B rows, chosen rows first). ctx: a
namespace with the frozen reference/teacher and the hyperparameters. losses: one value per example
(per pair for DPO), so that the trainer can weight examples (bilevel data selection) before the mean.
metrics: name -> detached per-example tensor, averaged by the trainer. A metric named 'loss' is the objective's
value where the trained loss adds a regulariser (DPO + NLL): logs, evals, maxright and f* use it.

Log-probs: the token at position t+1 is scored by the logits at position t, and only response tokens
count (prompt and padding are masked). SFT and KD are means over an example's response tokens, then
the trainer averages examples: every example counts the same whatever its length (the f* in a config
must be measured the same way).
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels.logprob import token_logprobs
from kernels.dpo import dpo_losses


def body_and_head(model):
    """The transformer without its LM head, and the head: the fused kernels take hidden states + head weight."""
    return model.base_model, model.get_output_embeddings()


def response_logprobs(model, batch, ctx):
    """Per-token log-probs [B, L-1] (fp32) of the response tokens, 0 elsewhere, and the mask [B, L-1]."""
    body, head = body_and_head(model)
    hidden = body(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).last_hidden_state[:, :-1]
    targets, mask = batch['input_ids'][:, 1:], batch['response_mask'][:, 1:]
    B, T, H = hidden.shape
    if getattr(ctx, 'zero3', False):
        # under ZeRO-3 head.weight is a partitioned placeholder; calling the module gathers it (full logits)
        logps = head(hidden).float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return logps * mask, mask
    weight = head.weight
    if torch.is_autocast_enabled(hidden.device.type):  # plain torch on GPU: fp32 master weights, bf16 matmuls
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    logps = token_logprobs(hidden.reshape(B * T, H), weight, targets.reshape(-1), mask.reshape(-1),
                           fused=None if ctx.fused_kernels else False)
    return logps.view(B, T), mask


def sft(model, batch, ctx):
    logps, mask = response_logprobs(model, batch, ctx)
    tokens = mask.sum(1).clamp(min=1)
    losses = -logps.sum(1) / tokens
    return losses, {'tokens': tokens.float()}


def dpo(model, batch, ctx):
    logps, mask = response_logprobs(model, batch, ctx)
    with torch.no_grad():
        reference_logps, _ = response_logprobs(ctx.reference, batch, ctx)
    losses, policy_seq, reference_seq = dpo_losses(
        logps, reference_logps, mask, ctx.beta, loss_type=ctx.dpo_loss, label_smoothing=ctx.label_smoothing,
        length_normalize=ctx.length_normalize, fused=None if ctx.fused_kernels else False)
    B = losses.shape[0]
    # logged with TRL's meaning whatever the loss uses (means for IPO and length_normalize): summed response
    # log-probs, and rewards β·(log πθ(y|x) − log πref(y|x)) of those sums
    policy_sum, reference_sum = logps.detach().sum(1), reference_logps.sum(1)
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


def _kd_chunk(student_hidden, head, teacher_logits):
    # −Σ_v p_teacher(v) log p_student(v): forward KL to the teacher up to the teacher's entropy. The head module is
    # called, not head.weight used: under ZeRO-3 the weight is a partitioned placeholder that only a call gathers.
    student_logps = head(student_hidden).float().log_softmax(-1)
    return -(teacher_logits.float().softmax(-1) * student_logps).sum(-1)


def kd(model, batch, ctx, chunk=1024):
    body, head = body_and_head(model)
    hidden = body(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).last_hidden_state[:, :-1]
    mask = batch['response_mask'][:, 1:]
    rows = mask.reshape(-1).nonzero().squeeze(-1)  # only response positions are distilled
    with torch.no_grad():
        teacher_body, teacher_head = body_and_head(ctx.teacher)
        teacher_hidden = teacher_body(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'])
        teacher_hidden = teacher_hidden.last_hidden_state[:, :-1].reshape(-1, teacher_hidden.last_hidden_state.shape[-1])
    student_hidden = hidden.reshape(-1, hidden.shape[-1])[rows]
    token_losses = []
    for i in range(0, rows.numel(), chunk):  # never an fp32 [tokens, V] for the whole batch
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden[rows[i:i + chunk]])
        token_losses.append(checkpoint(_kd_chunk, student_hidden[i:i + chunk], head, teacher_logits,
                                       use_reentrant=False))
    per_token = torch.zeros(mask.numel(), device=hidden.device, dtype=torch.float32)
    per_token = per_token.index_put((rows,), torch.cat(token_losses) if token_losses else per_token[:0])
    tokens = mask.sum(1).clamp(min=1)
    return per_token.view(mask.shape).sum(1) / tokens, {'tokens': tokens.float()}


OBJECTIVES = {'sft': sft, 'dpo': dpo, 'kd': kd}
DATA_KIND = {'sft': 'sft', 'dpo': 'pref', 'kd': 'sft'}  # which kind of split each objective reads
