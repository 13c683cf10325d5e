"""
Per-token log-probs through the LM head, log softmax(hidden @ weight.T)[i, targets[i]], without ever
holding the N x V logits. Two implementations with one autograd contract:

- PyTorch twin (_ChunkedLogprob): rows in chunks of ~TWIN_CHUNK_ELEMS logits; the backward recomputes
  each chunk's logits from the saved per-row log-sum-exp. Memory O(chunk x V). Runs anywhere (CPU).
- Triton (_FusedLogprob), for the GPU:
  forward: one GEMM-shaped kernel; each program owns a (token block, vocab block) tile, accumulates
    its logits in fp32 over H, and writes only the tile's log-sum-exp and, where the target falls in
    the tile, the target logit. A [N, V/BLOCK_N] fp32 array of partial lse (~33 MB at N=16k) is
    reduced in torch. Tiles are ordered in GROUP_M swizzled groups like a matmul, so the head runs
    at GEMM speed; there is no cross-program online softmax that would serialize the vocab.
  backward: per vocab chunk of VC columns (N x VC bf16 <= GRAD_CHUNK_ELEMS), a kernel recomputes the
    logits tile by tile in fp32 and writes grad_logits = g * (onehot - softmax) in the input dtype;
    cuBLAS then does dW[chunk] = G^T h (exact, written once) and dh += G W[chunk] into an fp32
    accumulator. cuBLAS is faster than an in-kernel GEMM with atomics, and a vocab-chunked G keeps
    dW exact (an fp32 dW accumulator would cost V*H*4 = 2 GiB at Llama-3 size).
Why these two take 4 GEMMs (fwd, recompute, dh, dW; ~1.33x the three bare GEMMs): grad_logits needs the
upstream per-token gradient, unknown in the forward, and storing the logits costs N*V bytes.
- Gradients in the forward (_LogprobGradsInForward), when the caller knows that gradient up to a scalar
  (grad_hint; SFT does): per row chunk, cuBLAS forms the fp32 logits once, a Triton program per row turns
  them into lse, log-prob and grad_logits (_row_grad_kernel), and dh = G W, dW += G^T h follow at once:
  3 GEMMs. The backward only scales; any other gradient is recomputed.
The forward-only path (reference/teacher) is one GEMM.
Masked rows are dropped before the matmuls (prompt tokens are 30-50 % of rows) and scattered back as 0.
Heads that post-process their logits (HF families, see lm_head.head_of) are reproduced exactly: a
head bias is added to the fp32 logits, a logit scale is folded into the hidden states (and the bias),
and a soft cap cap·tanh(logit/cap) is applied to the fp32 logits; the backward multiplies grad_logits
by its slope 1 - (logit/cap)^2, and the bias gradient is grad_logits summed over rows.
"""
import os
import torch

# Without a GPU, Triton kernels can only run in its interpreter (fused=True in the CPU tests), and the
# choice is read when triton is first imported; with CUDA this changes nothing.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the twin still works
    triton = None

TWIN_CHUNK_ELEMS = 2**25  # twin: logits per chunk (128 MiB in fp32)
GRAD_CHUNK_ELEMS = 2**26  # Triton backward: grad_logits per vocab chunk (128 MiB in bf16)

# ----------------------------------------------------------------------------------------------
# PyTorch twin

def _twin_logits(h, w, b, softcap):
    """fp32 logits of the rows h: softcap·tanh((h @ w.T + b) / softcap), in h's dtype up to the cap (as HF's head)."""
    logits = (h @ w.T if b is None else torch.addmm(b, h, w.T)).float()
    return logits if softcap is None else logits.div_(softcap).tanh_().mul_(softcap)

def _twin_forward(h, w, b, t, softcap, chunk_rows):
    """log-probs and log-sum-exp of the rows of h, chunk_rows rows at a time (fp32 results)."""
    logp = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    for s in range(0, h.shape[0], chunk_rows):
        logits = _twin_logits(h[s:s + chunk_rows], w, b, softcap)
        lse[s:s + chunk_rows] = logits.logsumexp(-1)
        logp[s:s + chunk_rows] = logits.gather(1, t[s:s + chunk_rows, None]).squeeze(1) - lse[s:s + chunk_rows]
    return logp, lse

class _ChunkedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, t, softcap, chunk_rows):
        logp, lse = _twin_forward(h, w, b, t, softcap, chunk_rows)
        ctx.save_for_backward(h, w, b, t, lse)
        ctx.softcap, ctx.chunk_rows = softcap, chunk_rows
        return logp

    @staticmethod
    def backward(ctx, g):
        h, w, b, t, lse = ctx.saved_tensors
        return (*_twin_grads(h, w, b, t, ctx.softcap, lse, g, ctx.chunk_rows, ctx.needs_input_grad[:3]),
                None, None, None)

def _twin_grads(h, w, b, t, softcap, lse, g, chunk_rows, need):
    """dh, dW, db of Σ_i g_i·logp_i, row chunk by chunk, the logits recomputed from lse."""
    need_dh, need_dw, need_db = need
    dh = torch.empty_like(h) if need_dh else None
    # accumulate dW (and db) over row chunks in fp32 (the twin is the CPU path, where fp32 is the norm)
    dw = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros(w.shape[0], device=w.device, dtype=torch.float32) if need_db else None
    g = g.float()
    for s in range(0, h.shape[0], chunk_rows):
        hc, tc, gc = h[s:s + chunk_rows], t[s:s + chunk_rows], g[s:s + chunk_rows]
        logits = _twin_logits(hc, w, b, softcap)
        grad = _grad_logits(logits, lse[s:s + chunk_rows], tc, gc, softcap)
        if need_db:
            db += grad.sum(0)
        grad = grad.to(h.dtype)
        if need_dh:
            dh[s:s + chunk_rows] = grad @ w
        if need_dw:
            dw += (grad.T @ hc).float()
    return dh, (dw.to(w.dtype) if need_dw else None), (db.to(b.dtype) if need_db else None)

def _grad_logits(logits, lse, t, g, softcap):
    """g·(onehot(t) − softmax) (fp32), in place of the fp32 logits, through the cap's slope if there is one."""
    # through the cap: d(cap·tanh(z/cap))/dz = 1 - tanh² = 1 - (logit/cap)²
    slope = None if softcap is None else 1 - (logits / softcap) ** 2
    grad = logits.sub_(lse[:, None]).exp_().mul_(-g[:, None])  # -g * softmax
    grad[torch.arange(len(t), device=t.device), t] += g         # + g * onehot
    return grad if slope is None else grad.mul_(slope)

# ----------------------------------------------------------------------------------------------
# Triton

if triton is not None:
    @triton.jit
    def _softcap(x, cap):
        """cap·tanh(x/cap) through exp (the interpreter has no tanh); ±cap at ±inf."""
        e = tl.exp(-2.0 * tl.abs(x / cap))
        t = (1.0 - e) / (1.0 + e)
        return cap * tl.where(x < 0, -t, t)

    @triton.jit
    def _tile_logits(h_ptr, w_ptr, b_ptr, softcap, pid, M, H, v_start, v_end,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
        """fp32 logits of one (token block, vocab block) tile of columns [v_start, v_end), bias and soft cap applied."""
        # swizzle: GROUP_M token blocks sweep the same vocab blocks together, so W tiles hit in L2
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(v_end - v_start, BLOCK_N)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
        pid_n = (pid % (GROUP_M * num_n)) // size_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = v_start + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * H + ks[None, :]
        w_ptrs = w_ptr + cols[:, None].to(tl.int64) * H + ks[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, H, BLOCK_K):
            hk = tl.load(h_ptrs, mask=(rows[:, None] < M) & (ks[None, :] < H - k), other=0.0)
            wk = tl.load(w_ptrs, mask=(cols[:, None] < v_end) & (ks[None, :] < H - k), other=0.0)
            acc = tl.dot(hk, tl.trans(wk), acc, input_precision=PRECISION)
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < v_end, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            acc = _softcap(acc, softcap)
        acc = tl.where(cols[None, :] < v_end, acc, float("-inf"))  # padding columns vanish in exp
        return acc, rows, cols, pid_n

    @triton.jit
    def _forward_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_part_ptr, target_logit_ptr, softcap, M, V, H,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
        logits, rows, cols, pid_n = _tile_logits(h_ptr, w_ptr, b_ptr, softcap, tl.program_id(0), M, H, 0, V,
                                                 BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, PRECISION, HAS_BIAS, HAS_SOFTCAP)
        row_ok = rows < M
        row_max = tl.max(logits, 1)
        tile_lse = row_max + tl.log(tl.sum(tl.exp(logits - row_max[:, None]), 1))
        tl.store(lse_part_ptr + rows.to(tl.int64) * tl.cdiv(V, BLOCK_N) + pid_n, tile_lse, mask=row_ok)
        # exactly one tile holds each row's target: only that one writes it
        t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        target_logit = tl.sum(tl.where(cols[None, :] == t[:, None], logits, 0.0), 1)
        in_tile = (t >= pid_n * BLOCK_N) & (t < pid_n * BLOCK_N + BLOCK_N)
        tl.store(target_logit_ptr + rows, target_logit, mask=row_ok & in_tile)

    @triton.jit
    def _grad_logits_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, grad_ptr, softcap, M, H, v_start, v_end,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
                            HAS_SOFTCAP: tl.constexpr):
        logits, rows, cols, pid_n = _tile_logits(h_ptr, w_ptr, b_ptr, softcap, tl.program_id(0), M, H, v_start, v_end,
                                                 BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, PRECISION, HAS_BIAS, HAS_SOFTCAP)
        row_ok = rows < M
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        onehot = (cols[None, :] == t[:, None]).to(tl.float32)
        grad = g[:, None] * (onehot - tl.exp(logits - lse[:, None]))
        if HAS_SOFTCAP:  # the gradient of the logits before the cap: d(cap·tanh(z/cap))/dz = 1 - (logit/cap)²
            capped = logits / softcap  # -inf in padding columns, whose slope is never stored
            grad *= tl.where(cols[None, :] < v_end, 1.0 - capped * capped, 0.0)
        width = v_end - v_start
        ptrs = grad_ptr + rows[:, None].to(tl.int64) * width + (cols - v_start)[None, :]
        tl.store(ptrs, grad.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < v_end))

    @triton.jit
    def _row_logits(z_ptr, b_ptr, row, idx, V, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
        """Columns idx of a row of GEMM logits with the bias and the cap applied; -inf past V (vanish in exp)."""
        z = tl.load(z_ptr + row * V + idx, mask=idx < V, other=0.0)
        if HAS_BIAS:
            z += tl.load(b_ptr + idx, mask=idx < V, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = _softcap(z, softcap)
        return tl.where(idx < V, z, float("-inf"))

    @triton.jit
    def _row_grad_kernel(z_ptr, b_ptr, t_ptr, coef_ptr, grad_ptr, logp_ptr, lse_ptr, softcap, V,
                         BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
        """One row of GEMM logits (fp32, before bias and cap): its lse and the target's log-prob, and
        grad_logits = coef·(onehot − softmax)·(the cap's slope) in grad's dtype. Two reads of the row, one write."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        t = tl.load(t_ptr + row)
        m = tl.full([BLOCK], float("-inf"), tl.float32)  # per-lane running max and sum of exp (online softmax)
        acc = tl.zeros([BLOCK], tl.float32)
        target = 0.0
        for v in range(0, V, BLOCK):
            idx = v + cols
            z = _row_logits(z_ptr, b_ptr, row, idx, V, softcap, HAS_BIAS, HAS_SOFTCAP)
            target += tl.sum(tl.where(idx == t, z, 0.0), 0)
            new = tl.maximum(m, z)
            safe = tl.where(new == float("-inf"), 0.0, new)  # a lane that has seen only padding: exp(-inf) = 0
            acc = acc * tl.exp(m - safe) + tl.exp(z - safe)
            m = new
        top = tl.max(m, 0)
        lse = top + tl.log(tl.sum(acc * tl.exp(m - top), 0))
        tl.store(lse_ptr + row, lse)
        tl.store(logp_ptr + row, target - lse)
        c = tl.load(coef_ptr + row).to(tl.float32)
        for v in range(0, V, BLOCK):
            idx = v + cols
            z = _row_logits(z_ptr, b_ptr, row, idx, V, softcap, HAS_BIAS, HAS_SOFTCAP)
            grad = c * (tl.where(idx == t, 1.0, 0.0) - tl.exp(z - lse))
            if HAS_SOFTCAP:  # d(cap·tanh(x/cap))/dx = 1 - (logit/cap)²
                grad *= 1.0 - (z / softcap) * (z / softcap)
            tl.store(grad_ptr + row * V + idx, grad.to(grad_ptr.dtype.element_ty), mask=idx < V)

# pragma: no mutate start
# (the Triton path: its tests run in the interpreter, too slow for mutation testing)
def _launch_config(dtype):
    """Tile sizes: the classic Hopper bf16 GEMM tile; small tiles in the CPU interpreter (speed)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, PRECISION="ieee")
    if dtype == torch.float32:  # fp32 is for tests: exact (no tf32), smaller K tile to fit SMEM
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, PRECISION="ieee", num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, PRECISION="tf32", num_warps=8, num_stages=3)

def _triton_flags(b, softcap):
    """bias pointer (any tensor when there is none), the cap (ignored without one) and the constexpr switches."""
    return dict(HAS_BIAS=b is not None, HAS_SOFTCAP=softcap is not None), (1.0 if softcap is None else float(softcap))

def _triton_forward(h, w, b, t, softcap):
    M, H = h.shape
    V = w.shape[0]
    cfg = _launch_config(h.dtype)
    lse_part = torch.empty(M, triton.cdiv(V, cfg["BLOCK_N"]), device=h.device, dtype=torch.float32)
    target_logit = torch.full((M,), float("nan"), device=h.device)  # stays NaN for a target outside [0, V)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(V, cfg["BLOCK_N"]),)
    flags, cap = _triton_flags(b, softcap)
    _forward_kernel[grid](h, w, w if b is None else b, t, lse_part, target_logit, cap, M, V, H, **cfg, **flags)
    lse = lse_part.logsumexp(-1)
    return target_logit - lse, lse

_addmm_fp32_ok = None
def _addmm_fp32(acc, a, b):
    """acc (fp32) += a @ b (bf16): cuBLAS accumulating straight into fp32 when this torch supports it
    (checked once, numerically), else via a bf16 temporary."""
    global _addmm_fp32_ok
    if _addmm_fp32_ok is None:
        x, y = torch.randn(64, 32, device=a.device, dtype=a.dtype), torch.randn(32, 16, device=a.device, dtype=a.dtype)
        z = torch.ones(64, 16, device=a.device)
        try:
            torch.addmm(z, x, y, out_dtype=torch.float32, out=z)
            _addmm_fp32_ok = torch.allclose(z, 1 + x.float() @ y.float(), atol=1e-2, rtol=1e-2)
        except Exception:  # older torch, CPU, or a self-dtype rule this torch does not allow
            _addmm_fp32_ok = False
    if _addmm_fp32_ok:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += a @ b

def _mm_fp32(a, b):
    """a @ b as fp32, from bf16 or fp32 inputs (bf16: no rounding of the result to bf16 where torch allows)."""
    if a.dtype == torch.float32:
        return a @ b
    out = torch.zeros(a.shape[0], b.shape[1], device=a.device, dtype=torch.float32)
    _addmm_fp32(out, a, b)
    return out

class _FusedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, t, softcap):
        logp, lse = _triton_forward(h, w, b, t, softcap)
        ctx.save_for_backward(h, w, b, t, lse)
        ctx.softcap = softcap
        return logp

    @staticmethod
    def backward(ctx, g):
        h, w, b, t, lse = ctx.saved_tensors
        return (*_triton_grads(h, w, b, t, ctx.softcap, lse, g, ctx.needs_input_grad[:3]), None, None)

def _triton_grads(h, w, b, t, softcap, lse, g, need):
    """dh, dW, db of Σ_i g_i·logp_i: per vocab chunk, grad_logits from the Triton kernel, then cuBLAS."""
    need_dh, need_dw, need_db = need
    (M, H), V = h.shape, w.shape[0]
    cfg = _launch_config(h.dtype)
    flags, cap = _triton_flags(b, softcap)
    g = g.float().contiguous()
    dh = torch.zeros(M, H, device=h.device, dtype=torch.float32) if need_dh else None
    dw = torch.empty_like(w) if need_dw else None
    db = torch.empty(V, device=w.device, dtype=torch.float32) if need_db else None
    chunk = max(cfg["BLOCK_N"], GRAD_CHUNK_ELEMS // max(M, 1) // cfg["BLOCK_N"] * cfg["BLOCK_N"])
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        grad = torch.empty(M, v1 - v0, device=h.device, dtype=h.dtype)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(v1 - v0, cfg["BLOCK_N"]),)
        _grad_logits_kernel[grid](h, w, w if b is None else b, t, lse, g, grad, cap, M, H, v0, v1, **cfg, **flags)
        if need_db:
            torch.sum(grad, 0, dtype=torch.float32, out=db[v0:v1])
        if need_dw:
            torch.mm(grad.T, h, out=dw[v0:v1])
        if need_dh:
            if h.dtype == torch.float32:
                dh.addmm_(grad, w[v0:v1])
            else:
                _addmm_fp32(dh, grad, w[v0:v1])
    return (dh.to(h.dtype) if need_dh else None), dw, (db.to(b.dtype) if need_db else None)

# pragma: no mutate end
# ----------------------------------------------------------------------------------------------
# gradients in the forward pass, for callers that know their upstream gradient up to a scalar (SFT)

def _forward_and_grads(h, w, b, t, softcap, coef, chunk_rows, need, fused):
    """log-probs, log-sum-exp and the gradients of Σ_i coef_i·logp_i, in one pass over row chunks: the chunk's fp32
    logits (GEMM 1), grad_logits from them (fused: one Triton program per row, _row_grad_kernel; else torch,
    _grad_logits), dh = G·W (GEMM 2) and dW += Gᵀ·h (GEMM 3). Three GEMMs where a forward and a backward take four
    (the backward must recompute the logits). dW accumulates over the chunks in W's dtype: exact in fp32; in bf16
    one rounding per chunk (an fp32 accumulator would cost V·H·4 bytes)."""
    need_dh, need_dw, need_db = need
    logp = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    dh = torch.empty_like(h) if need_dh else None
    dw = torch.zeros_like(w) if need_dw else None
    db = torch.zeros(w.shape[0], device=w.device, dtype=torch.float32) if need_db else None
    for s in range(0, h.shape[0], chunk_rows):
        rows = slice(s, s + chunk_rows)
        logits = _mm_fp32(h[rows], w.T)
        if fused:  # bias, cap, lse, log-prob and grad_logits in one kernel
            grad = torch.empty(logits.shape, device=h.device, dtype=h.dtype)
            flags, cap = _triton_flags(b, softcap)
            _row_grad_kernel[(logits.shape[0],)](logits, logits if b is None else b, t[rows], coef[rows], grad,
                                                 logp[rows], lse[rows], cap, w.shape[0], **_row_config(), **flags)
            if need_db:
                db += grad.sum(0, dtype=torch.float32)
        else:
            grad = _torch_grad(logits, b, t[rows], coef[rows], softcap, lse[rows], logp[rows], db).to(h.dtype)
        del logits
        if need_dh:
            dh[rows] = grad @ w
        if need_dw:
            dw.addmm_(grad.T, h[rows])
    return logp, lse, dh, dw, db

def _row_config():
    return dict(BLOCK=64) if os.environ.get("TRITON_INTERPRET") == "1" else dict(BLOCK=4096, num_warps=8)

def _torch_grad(logits, b, t, coef, softcap, lse, logp, db):
    """_row_grad_kernel's work in torch ops: lse and logp written in place, db accumulated; grad_logits returned."""
    if b is not None:
        logits += b.float()
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)
    lse.copy_(logits.logsumexp(-1))
    logp.copy_(logits.gather(1, t[:, None]).squeeze(1) - lse)
    grad = _grad_logits(logits, lse, t, coef.float(), softcap)
    if db is not None:
        db += grad.sum(0)
    return grad

class _LogprobGradsInForward(torch.autograd.Function):
    """The forward computes the gradients for the caller's hint of its upstream gradient (_forward_and_grads); the
    backward scales them by the gradient it is given, which must be the hint times one scalar (checked, to 1e-5 of
    its largest entry). Any other gradient is recomputed exactly from the saved lse, as the other paths do."""
    @staticmethod
    def forward(ctx, h, w, b, t, softcap, coef, chunk_rows, fused):
        with torch.autocast(h.device.type, enabled=False):  # the inputs are in their compute dtype already
            logp, lse, dh, dw, db = _forward_and_grads(h, w, b, t, softcap, coef.float().contiguous(), chunk_rows,
                                                       ctx.needs_input_grad[:3], fused)
        ctx.save_for_backward(h, w, b, t, lse, coef, dh, dw, db)
        ctx.softcap, ctx.chunk_rows, ctx.fused = softcap, chunk_rows, fused
        return logp

    @staticmethod
    def backward(ctx, g):
        h, w, b, t, lse, coef, dh, dw, db = ctx.saved_tensors
        g, coef = g.float(), coef.float()
        scale = (g @ coef) / (coef @ coef)
        scale, residual, top = torch.stack([scale, (g - scale * coef).abs().max(), g.abs().max()]).tolist()  # 1 sync
        if residual <= 1e-5 * top:
            # in place: no second dW (a second backward through this graph then fails loudly: modified in place)
            grads = (None if dh is None else dh.mul_(scale), None if dw is None else dw.mul_(scale),
                     None if db is None else db.mul_(scale).to(b.dtype))
        else:
            need = ctx.needs_input_grad[:3]
            grads = (_triton_grads(h, w, b, t, ctx.softcap, lse, g, need) if ctx.fused else
                     _twin_grads(h, w, b, t, ctx.softcap, lse, g, ctx.chunk_rows, need))
        return (*grads, None, None, None, None, None)

# ----------------------------------------------------------------------------------------------
# public API

def token_logprobs(hidden, weight, targets, mask=None, fused=None, chunk_rows=None, bias=None, scale=1.0, softcap=None,
                   grad_hint=None):
    """fp32 log softmax(logits)[..., targets] with the logits an HF head forms (lm_head.head_of):
    logits = softcap·tanh(scale·(hidden @ weight.T + bias) / softcap), without a bias / cap when None.
    Positions where mask is 0/False give exactly 0 (and no gradient; their targets may be anything, e.g. -100).
    hidden [..., H], weight [V, H], bias [V], targets/mask [...] (mask: bool or any integer dtype).
    fused=None: Triton on CUDA, else the PyTorch twin; True/False force one.
    chunk_rows: twin rows per chunk (default: TWIN_CHUNK_ELEMS // V). Without grad: forward only.
    grad_hint [...] (or None): the gradient d loss / d log-prob the caller will send back, up to one scalar factor,
    known now (SFT: −w_b / n_b on each response token). The gradients are then computed in the forward pass, three
    GEMMs instead of four, and the backward scales them; a backward gradient that is not the hint times a scalar is
    recomputed exactly (slower, never wrong)."""
    if fused is None:
        fused = hidden.is_cuda and triton is not None
    shape, H = targets.shape, hidden.shape[-1]
    h, t = hidden.reshape(-1, H), targets.reshape(-1)
    if mask is not None:  # compact: masked rows never reach the matmuls
        keep = mask.reshape(-1).nonzero().squeeze(1)
        h, t = h.index_select(0, keep), t.index_select(0, keep)
        grad_hint = None if grad_hint is None else grad_hint.reshape(-1).index_select(0, keep)
    if scale != 1.0:  # scale·(hW + b) = (scale·h)W + scale·b: the kernels never see the scale
        h, bias = h * scale, (None if bias is None else bias * scale)
    if fused:
        h, weight, t = h.contiguous(), weight.contiguous(), t.contiguous()
        bias = None if bias is None else bias.contiguous()
    chunk_rows = chunk_rows or max(1, TWIN_CHUNK_ELEMS // weight.shape[0])
    softcap = None if softcap is None else float(softcap)
    params = [x for x in (hidden, weight, bias) if x is not None]
    need_grad = torch.is_grad_enabled() and any(x.requires_grad for x in params)
    if h.shape[0] == 0:  # all masked: zeros that still reach the graph, so backward() works
        logp = sum(x.sum() for x in params).float().mul(0).expand(0)
    elif need_grad and grad_hint is not None:
        logp = _LogprobGradsInForward.apply(h, weight, bias, t, softcap, grad_hint.reshape(-1), chunk_rows, fused)
    elif need_grad:
        logp = (_FusedLogprob.apply(h, weight, bias, t, softcap) if fused else
                _ChunkedLogprob.apply(h, weight, bias, t, softcap, chunk_rows))
    else:
        with torch.no_grad():
            logp = (_triton_forward(h, weight, bias, t, softcap) if fused else
                    _twin_forward(h, weight, bias, t, softcap, chunk_rows))[0]
    if mask is not None:
        logp = logp.new_zeros(mask.numel()).index_copy(0, keep, logp)
    return logp.reshape(shape)

def token_logprobs_torch(hidden, weight, targets, mask=None, chunk_rows=None, bias=None, scale=1.0, softcap=None):
    """The PyTorch twin, whatever the device (token_logprobs with fused=False)."""
    return token_logprobs(hidden, weight, targets, mask, fused=False, chunk_rows=chunk_rows, bias=bias, scale=scale,
                          softcap=softcap)
