"""
DPO-family losses from per-token log-probs: masked per-row sums (or means), the log-ratio margin z and
the loss, in one pass. Rows 0..B-1 are the chosen responses, rows B..2B-1 the rejected ones.

  seq_i = sum_t mask * logp          (mean over response tokens for IPO or length_normalize=True:
                                      TRL, after checking with the IPO authors, divides each
                                      response's log-ratio by its token count; Tulu 3 length-normalizes)
  z = (pol_c - pol_r) - (ref_c - ref_r)
  sigmoid: -(1-eps) logsigmoid(beta z) - eps logsigmoid(-beta z)   (eps = label smoothing, 0 = DPO)
  ipo:     (z - 1/(2 beta))^2
Rows without response tokens get seq = 0 (never NaN). Masked positions are ignored even if not finite.
The reference may also come as per-sequence sums [2B] (precomputed, bipost's reference_logps='precompute'):
each sum is placed at its row's first response position and zeros elsewhere, so the masked row sum is that sum
exactly (x + 0 = x in any summation order) and the mean divides it by the same token count.
The Triton kernel computes everything per pair in the forward and saves one scalar per row, so the
backward is d policy_logps = grad_loss * coef_row * mask. The twin is plain PyTorch.
"""
import os
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

LOSS_TYPES = ("sigmoid", "ipo")

def _sequence_logps(logps, mask, average):
    mask = mask.bool()  # 0/1 masks of any integer dtype work as well
    seq = torch.where(mask, logps, 0.0).sum(-1)
    return seq / mask.sum(-1).clamp(min=1) if average else seq

def sequence_as_tokens(sequence_sums, mask):
    """[2B] per-sequence sums -> [2B, T] whose masked row sums are exactly those sums (see the module docstring)."""
    mask = mask.bool()
    tokens = torch.zeros(mask.shape, device=mask.device, dtype=torch.float32)
    first = mask.int().argmax(-1)  # the first response position (0 for a row without any: it then stays 0)
    rows = torch.arange(mask.shape[0], device=mask.device)
    tokens[rows, first] = torch.where(mask.any(-1), sequence_sums.float().to(mask.device), 0.0)
    return tokens

def dpo_losses_torch(policy_logps, reference_logps, mask, beta, loss_type="sigmoid", label_smoothing=0.0,
                     length_normalize=False):
    """The PyTorch twin of dpo_losses."""
    average = loss_type == "ipo" or length_normalize
    policy_seq = _sequence_logps(policy_logps.float(), mask, average)
    reference_seq = _sequence_logps(reference_logps.detach().float(), mask, average)
    B = policy_seq.shape[0] // 2
    z = (policy_seq[:B] - policy_seq[B:]) - (reference_seq[:B] - reference_seq[B:])
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)
    else:
        losses = (z - 1 / (2 * beta)) ** 2
    return losses, policy_seq.detach(), reference_seq

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
               length_normalize=False, fused=None):
    """-> (losses [B], policy_seq [2B], reference_seq [2B]); only losses carry gradient (to policy_logps).
    mask: bool or 0/1 of any integer dtype. reference_logps: per-token [2B, T], or the summed response log-probs [2B].
    fused=None: Triton kernel on CUDA, else the twin; True/False force one."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if reference_logps.dim() == 1 and reference_logps.shape[0] == mask.shape[0]:
        reference_logps = sequence_as_tokens(reference_logps, mask)
    if policy_logps.shape[0] % 2 or policy_logps.shape != reference_logps.shape or mask.shape != policy_logps.shape:
        raise ValueError(f"expected [2B, T] chosen-then-rejected rows for policy, reference and mask, got "
                         f"{tuple(policy_logps.shape)}, {tuple(reference_logps.shape)}, {tuple(mask.shape)}")
    if fused is None:
        fused = policy_logps.is_cuda and triton is not None
    if not fused:
        return dpo_losses_torch(policy_logps, reference_logps, mask, beta, loss_type, label_smoothing, length_normalize)
    average = loss_type == "ipo" or length_normalize
    return _FusedDPO.apply(policy_logps, reference_logps.detach(), mask.bool(), beta, loss_type, label_smoothing, average)
