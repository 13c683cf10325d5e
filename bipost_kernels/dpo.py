"""
DPO-family losses from per-token log-probs: masked per-row sums (or means), the log-ratios and the loss, in one
pass. Rows 0..B-1 are the chosen responses, rows B..2B-1 the rejected ones.

  seq_i = sum_t mask * logp          (mean over response tokens for ipo, sigmoid_norm or length_normalize=True:
                                      TRL, after checking with the IPO authors, divides each response's
                                      log-ratio by its token count; Tulu 3 length-normalizes)
  c = pol_c - ref_c, r = pol_r - ref_r  (the chosen and rejected log-ratios), z = c - r
  loss = sum_k weight_k * PAIR_LOSSES[type_k](c, r, z, ...)   (one type, or TRL's list form: MPO)

PAIR_LOSSES holds the formulas, one line each, under TRL's DPOTrainer names (its formulas, read from its source).
bipost's 'sigmoid' with label_smoothing eps > 0 is conservative DPO (TRL's 'sigmoid' ignores eps; its 'robust' and
'exo_pair' use it otherwise). 'aot', 'aot_unpaired' and 'sft' couple the pairs of a micro-batch (sorted log-ratios;
a token-pooled NLL), as in TRL: their per-pair values average to TRL's loss, but a pair's value is not its own.
Rows without response tokens get seq = 0 (never NaN). Masked positions are ignored even if not finite.
The reference may also come as per-sequence sums [2B] (precomputed, bipost's reference_logps='precompute'):
each sum is placed at its row's first response position and zeros elsewhere, so the masked row sum is that sum
exactly (x + 0 = x in any summation order) and the mean divides it by the same token count.
The Triton kernel covers 'sigmoid' and 'ipo' alone (FUSED_LOSS_TYPES): it computes everything per pair in the
forward and saves one scalar per row, so the backward is d policy_logps = grad_loss * coef_row * mask. The
twin, plain PyTorch, computes every type.
"""
import math
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

# Without a GPU, Triton kernels can only run in its interpreter (fused=True in the CPU tests), and the
# choice is read when triton is first imported; with CUDA this changes nothing.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _smoothed(p, x):  # -(1-eps) logsigmoid(beta x) - eps logsigmoid(-beta x): DPO's logistic loss, label-smoothed
    return -(1 - p.eps) * F.logsigmoid(p.beta * x) - p.eps * F.logsigmoid(-p.beta * x)


# The per-pair loss of each type from p: c, r, z (log-ratios above), beta, eps (label_smoothing), tau (discopop's),
# policy_margin / reference_margin (pol_c - pol_r, ref_c - ref_r) and nll (the chosen rows' token-pooled NLL).
PAIR_LOSSES = {
    'sigmoid': lambda p: _smoothed(p, p.z),                                          # DPO, Rafailov+ 2023; eps: cDPO
    'hinge': lambda p: torch.relu(1 - p.beta * p.z),                                 # SLiC, Zhao+ 2023
    'ipo': lambda p: (p.z - 1 / (2 * p.beta)) ** 2,                                  # IPO, Azar+ 2023 (means)
    'exo_pair': lambda p: (torch.sigmoid(p.beta * p.z) * (F.logsigmoid(p.beta * p.z) - math.log1p(-p.eps))
                           + torch.sigmoid(-p.beta * p.z) * (F.logsigmoid(-p.beta * p.z) - math.log(p.eps))),  # EXO, Ji+ 2024
    'nca_pair': lambda p: (-F.logsigmoid(p.beta * p.c) - 0.5 * F.logsigmoid(-p.beta * p.c)
                           - 0.5 * F.logsigmoid(-p.beta * p.r)),                     # NCA, Chen+ 2024
    'robust': lambda p: (-(1 - p.eps) * F.logsigmoid(p.beta * p.z)
                         + p.eps * F.logsigmoid(-p.beta * p.z)) / (1 - 2 * p.eps),   # rDPO, Chowdhury+ 2024
    'bco_pair': lambda p: -F.logsigmoid(p.beta * p.c) - F.logsigmoid(-p.beta * p.r),  # BCO, Jung+ 2024
    'sppo_hard': lambda p: (p.c - 0.5 / p.beta) ** 2 + (p.r + 0.5 / p.beta) ** 2,    # SPPO (hard labels), Wu+ 2024
    'aot': lambda p: _smoothed(p, p.policy_margin.sort().values - p.reference_margin.sort().values),  # AOT, Melnyk+ 2024
    'aot_unpaired': lambda p: _smoothed(p, p.c.sort().values - p.r.sort().values),  # AOT unpaired, Melnyk+ 2024
    'apo_zero': lambda p: 1 - torch.sigmoid(p.beta * p.c) + torch.sigmoid(p.beta * p.r),  # APO-zero, D'Oosterlinck+ 2024
    'apo_down': lambda p: torch.sigmoid(p.beta * p.c) + 1 - torch.sigmoid(p.beta * p.z),   # APO-down, D'Oosterlinck+ 2024
    'discopop': lambda p: (-F.logsigmoid(p.beta * p.z) * (1 - torch.sigmoid(p.beta * p.z / p.tau))
                           + torch.exp(-p.beta * p.z) * torch.sigmoid(p.beta * p.z / p.tau)),  # DiscoPOP, Lu+ 2024
    'sigmoid_norm': lambda p: -F.logsigmoid(p.beta * p.z),                           # DPO on means (TRL)
    'sft': lambda p: p.nll,                                                          # NLL of the chosen (MPO's term)
}
LOSS_TYPES = tuple(PAIR_LOSSES)
MEAN_LOSS_TYPES = ('ipo', 'sigmoid_norm')  # on per-token means whatever length_normalize says
SMOOTHED_LOSS_TYPES = ('sigmoid', 'exo_pair', 'robust', 'aot', 'aot_unpaired')  # the ones label_smoothing changes
FUSED_LOSS_TYPES = ('sigmoid', 'ipo')  # the Triton kernel's


def loss_terms(loss_type, weights=None):
    """'sigmoid' | ['sigmoid', 'sft'] | 'sigmoid,sft' and weights (default 1 each) -> [(type, weight)];
    ValueError on an unknown type or a weight count that does not match."""
    types = [t.strip() for t in loss_type.split(',')] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if weights is None or len(weights) == 0 else [float(w) for w in weights]
    unknown = [t for t in types if t not in PAIR_LOSSES]
    if unknown or not types:
        raise ValueError(f"dpo loss_type {loss_type!r}: {unknown or 'no type'} is not one of {LOSS_TYPES}")
    if len(weights) != len(types):
        raise ValueError(f"dpo loss_type {loss_type!r} has {len(types)} terms but {len(weights)} weights {weights}: "
                         f"give one weight per term (or none: 1 each)")
    return list(zip(types, weights))


def check_settings(loss_type, weights, label_smoothing):
    """ValueError where a setting has no meaning for the loss types or makes the loss undefined."""
    types = [t for t, _ in loss_terms(loss_type, weights)]
    if label_smoothing and not any(t in SMOOTHED_LOSS_TYPES for t in types):
        raise ValueError(f"label_smoothing={label_smoothing} has no meaning for dpo_loss={loss_type!r} (it is used by "
                         f"{SMOOTHED_LOSS_TYPES}): set it to 0 or pick one of those")
    if 'exo_pair' in types and not 0 < label_smoothing < 1:
        raise ValueError(f"dpo_loss 'exo_pair' needs 0 < label_smoothing < 1 (its target distribution; the EXO paper "
                         f"uses 1e-3), got {label_smoothing}")
    if not 0 <= label_smoothing < 0.5 and ('robust' in types or 'sigmoid' in types):
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 0.5) for 'sigmoid' and 'robust' "
                         f"(the assumed fraction of flipped labels)")


def sequence_logps(logps, mask, average):
    """Masked row sums of per-token log-probs [N, T] -> [N], or means over the masked tokens (0 for none)."""
    mask = mask.bool()  # 0/1 masks of any integer dtype work as well
    seq = torch.where(mask, logps, 0.0).sum(-1)
    return seq / mask.sum(-1).clamp(min=1) if average else seq

def ld_weights(mask, ld_alpha):
    """LD-DPO (Liu et al. 2024), TRL's ld_alpha: [2B, T] token weights, 1 on each pair's first min(|y_w|, |y_l|)
    response tokens, ld_alpha on the longer response's tail, 0 off the response."""
    mask = mask.bool()
    position = mask.cumsum(-1)  # 1, 2, ... along each response
    lengths = mask.sum(-1)
    B = mask.shape[0] // 2
    shared = torch.minimum(lengths[:B], lengths[B:]).repeat(2)[:, None]
    return torch.where(position <= shared, 1.0, float(ld_alpha)) * mask

def sequence_as_tokens(sequence_sums, mask):
    """[2B] per-sequence sums -> [2B, T] whose masked row sums are exactly those sums (see the module docstring)."""
    mask = mask.bool()
    tokens = torch.zeros(mask.shape, device=mask.device, dtype=torch.float32)
    first = mask.int().argmax(-1)  # the first response position (0 for a row without any: it then stays 0)
    rows = torch.arange(mask.shape[0], device=mask.device)
    tokens[rows, first] = torch.where(mask.any(-1), sequence_sums.float().to(mask.device), 0.0)
    return tokens

def dpo_losses_torch(policy_logps, reference_logps, mask, beta, loss_type="sigmoid", label_smoothing=0.0,
                     length_normalize=False, loss_weights=None, discopop_tau=0.05, ld_alpha=1.0):
    """The PyTorch twin of dpo_losses: every loss type, and weighted lists of them."""
    terms = loss_terms(loss_type, loss_weights)
    policy_logps, reference_logps = policy_logps.float(), reference_logps.detach().float()
    B = policy_logps.shape[0] // 2
    chosen_mask = mask[:B].bool()
    # TRL's 'sft' term: cross-entropy pooled over all chosen tokens of the batch, as B per-pair shares of its sum
    nll = -torch.where(chosen_mask, policy_logps[:B], 0.0).sum(-1) * B / chosen_mask.sum().clamp(min=1)
    if ld_alpha != 1.0:  # the log-ratios (not the sft term) weigh the longer response's tail by ld_alpha
        weights = ld_weights(mask, ld_alpha)
        policy_logps = torch.where(mask.bool(), policy_logps, 0.0) * weights
        reference_logps = torch.where(mask.bool(), reference_logps, 0.0) * weights
    losses, seqs = 0.0, None
    for name, weight in terms:
        average = name in MEAN_LOSS_TYPES or length_normalize
        policy_seq = sequence_logps(policy_logps, mask, average)
        reference_seq = sequence_logps(reference_logps, mask, average)
        seqs = seqs or (policy_seq.detach(), reference_seq)  # the first term's
        c, r = policy_seq[:B] - reference_seq[:B], policy_seq[B:] - reference_seq[B:]
        pair = SimpleNamespace(c=c, r=r, z=c - r, beta=beta, eps=label_smoothing, tau=discopop_tau, nll=nll,
                               policy_margin=policy_seq[:B] - policy_seq[B:],
                               reference_margin=reference_seq[:B] - reference_seq[B:])
        losses = losses + weight * PAIR_LOSSES[name](pair)
    return losses, seqs[0], seqs[1]

# ----------------------------------------------------------------------------------------------
# Triton: one program per pair for the forward, (row, T block) programs for the backward

if triton is not None:
    @triton.jit
    def _masked_row_sum(x_ptr, m_ptr, row, T, AVERAGE: tl.constexpr, BLOCK_T: tl.constexpr):
        total = tl.zeros((BLOCK_T,), tl.float32)
        count = tl.zeros((BLOCK_T,), tl.float32)
        for t0 in range(0, T, BLOCK_T):
            cols = t0 + tl.arange(0, BLOCK_T)
            keep = tl.load(m_ptr + row * T + cols, mask=cols < T, other=0) != 0
            x = tl.load(x_ptr + row * T + cols, mask=keep, other=0.0).to(tl.float32)
            total += tl.where(keep, x, 0.0)
            count += keep.to(tl.float32)
        total, count = tl.sum(total, 0), tl.maximum(tl.sum(count, 0), 1.0)
        if AVERAGE:
            return total / count, count
        return total, count

    @triton.jit
    def _logsigmoid(x):  # stable: min(x, 0) - log(1 + exp(-|x|))
        return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))

    @triton.jit
    def _dpo_forward_kernel(pol_ptr, ref_ptr, m_ptr, loss_ptr, pol_seq_ptr, ref_seq_ptr, coef_ptr, B, T,
                            beta, eps, IPO: tl.constexpr, AVERAGE: tl.constexpr, BLOCK_T: tl.constexpr):
        b = tl.program_id(0)
        pc, nc = _masked_row_sum(pol_ptr, m_ptr, b, T, AVERAGE, BLOCK_T)
        pr, nr = _masked_row_sum(pol_ptr, m_ptr, b + B, T, AVERAGE, BLOCK_T)
        rc, _ = _masked_row_sum(ref_ptr, m_ptr, b, T, AVERAGE, BLOCK_T)
        rr, _ = _masked_row_sum(ref_ptr, m_ptr, b + B, T, AVERAGE, BLOCK_T)
        z = (pc - pr) - (rc - rr)
        if IPO:
            loss = (z - 0.5 / beta) * (z - 0.5 / beta)
            dz = 2.0 * (z - 0.5 / beta)
        else:
            loss = -(1.0 - eps) * _logsigmoid(beta * z) - eps * _logsigmoid(-beta * z)
            # d/dz: -(1-eps) beta sigmoid(-beta z) + eps beta sigmoid(beta z)
            dz = -(1.0 - eps) * beta / (1.0 + tl.exp(beta * z)) + eps * beta / (1.0 + tl.exp(-beta * z))
        tl.store(loss_ptr + b, loss)
        tl.store(pol_seq_ptr + b, pc)
        tl.store(pol_seq_ptr + b + B, pr)
        tl.store(ref_seq_ptr + b, rc)
        tl.store(ref_seq_ptr + b + B, rr)
        if AVERAGE:  # d seq / d logp = mask / count
            tl.store(coef_ptr + b, dz / nc)
            tl.store(coef_ptr + b + B, -dz / nr)
        else:
            tl.store(coef_ptr + b, dz)
            tl.store(coef_ptr + b + B, -dz)

    @triton.jit
    def _dpo_backward_kernel(grad_loss_ptr, coef_ptr, m_ptr, out_ptr, B, T, BLOCK_T: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        scale = tl.load(grad_loss_ptr + row % B) * tl.load(coef_ptr + row)
        keep = tl.load(m_ptr + row * T + cols, mask=cols < T, other=0) != 0
        tl.store(out_ptr + row * T + cols, tl.where(keep, scale, 0.0), mask=cols < T)

# pragma: no mutate start
# (the Triton path: its tests run in the interpreter, too slow for mutation testing)
class _FusedDPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy_logps, reference_logps, mask, beta, loss_type, label_smoothing, average):
        twoB, T = policy_logps.shape
        B = twoB // 2
        f32 = dict(device=policy_logps.device, dtype=torch.float32)
        losses, coef = torch.empty(B, **f32), torch.empty(twoB, **f32)
        policy_seq, reference_seq = torch.empty(twoB, **f32), torch.empty(twoB, **f32)
        mask = mask.contiguous().view(torch.uint8)
        _dpo_forward_kernel[(B,)](policy_logps.contiguous(), reference_logps.contiguous(), mask, losses,
                                  policy_seq, reference_seq, coef, B, T, float(beta), float(label_smoothing),
                                  IPO=loss_type == "ipo", AVERAGE=average, BLOCK_T=1024)
        ctx.save_for_backward(coef, mask)
        ctx.mark_non_differentiable(policy_seq, reference_seq)
        return losses, policy_seq, reference_seq

    @staticmethod
    def backward(ctx, grad_losses, _grad_policy_seq, _grad_reference_seq):
        coef, mask = ctx.saved_tensors
        twoB, T = mask.shape
        grad = torch.empty(twoB, T, device=mask.device, dtype=torch.float32)
        _dpo_backward_kernel[(twoB, triton.cdiv(T, 1024))](grad_losses.float().contiguous(), coef, mask, grad,
                                                            twoB // 2, T, BLOCK_T=1024)
        return grad, None, None, None, None, None, None

# pragma: no mutate end
def dpo_losses(policy_logps, reference_logps, mask, beta, loss_type="sigmoid", label_smoothing=0.0,
               length_normalize=False, fused=None, loss_weights=None, discopop_tau=0.05, ld_alpha=1.0):
    """-> (losses [B], policy_seq [2B], reference_seq [2B]); only losses carry gradient (to policy_logps).
    policy_seq/reference_seq: the first term's (means where it uses means). mask: bool or 0/1 of any integer dtype.
    reference_logps: per-token [2B, T], or the summed response log-probs [2B]. loss_type: one of LOSS_TYPES, or a
    list (or comma-separated string) of them with loss_weights (MPO). fused=None: Triton kernel on CUDA, else the
    twin; True/False force one; loss types the kernel lacks (all but one unweighted FUSED_LOSS_TYPES) take the twin,
    as does ld_alpha != 1 (LD-DPO: ld_weights), which needs the reference per token."""
    terms = loss_terms(loss_type, loss_weights)
    if ld_alpha != 1.0 and reference_logps.dim() == 1:
        raise ValueError("ld_alpha needs the reference's per-token log-probs, not per-sequence sums "
                         "(reference_logps='precompute'): use reference_logps='live' or ld_alpha=1")
    if reference_logps.dim() == 1 and reference_logps.shape[0] == mask.shape[0]:
        reference_logps = sequence_as_tokens(reference_logps, mask)
    if policy_logps.shape[0] % 2 or policy_logps.shape != reference_logps.shape or mask.shape != policy_logps.shape:
        raise ValueError(f"expected [2B, T] chosen-then-rejected rows for policy, reference and mask, got "
                         f"{tuple(policy_logps.shape)}, {tuple(reference_logps.shape)}, {tuple(mask.shape)}")
    if fused is None:
        fused = policy_logps.is_cuda and triton is not None
    (name, weight), = terms if len(terms) == 1 else [(None, None)]
    if not fused or name not in FUSED_LOSS_TYPES or weight != 1.0 or ld_alpha != 1.0:
        return dpo_losses_torch(policy_logps, reference_logps, mask, beta, loss_type, label_smoothing, length_normalize,
                                loss_weights, discopop_tau, ld_alpha)
    average = name == "ipo" or length_normalize
    return _FusedDPO.apply(policy_logps, reference_logps.detach(), mask.bool(), beta, name, label_smoothing, average)
