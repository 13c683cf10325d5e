"""
LM-head benchmark (protocol in docs/efficiency.md): per-token log-prob fwd+bwd, reference forward and the DPO
head step, every method as a ratio to anchors timed in the same run (the three bare GEMMs, the logits
GEMM, the 8NHV DPO floor). Needs a CUDA GPU.
    python bipost_kernels/bench.py                            # Llama-3-8B head: H=4096, V=128256, N in 8192 16384
    python bipost_kernels/bench.py --tokens 4096 --vocab 32000  # quicker
    python bipost_kernels/bench.py --out bipost_kernels/results      # also writes kernels_<gpu>.md and .jsonl there
Liger-Kernel and cut-cross-entropy are compared only if already installed (never required).
"""
import argparse, gc, math, os, sys
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bipost_kernels.logprob import token_logprobs
from bipost_kernels.dpo import dpo_losses

GiB = 2**30
LINES, RECORDS = [], []  # what was printed (markdown) and one dict per table row, for --out

def say(line=""):
    print(line, flush=True)
    LINES.append(line)
    if line.strip().startswith("### "):
        RECORDS.append({"table": line.strip()[4:]})  # a header: the rows below belong to it

def bench_ms(fn, grads):
    """median, p20, p80 in ms, excluding compilation (do_bench warms up for 200 ms first)."""
    import triton
    return triton.testing.do_bench(fn, warmup=200, rep=2000, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads)

def extra_memory(fn, grads):
    """peak minus baseline for one call, in GiB, with gradients freed first."""
    for x in grads:
        x.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for x in grads:
        x.grad = None
    return peak / GiB

def peaked_inputs(N, H, V, seed=0):
    """bf16 h, W with logit std ~3.5 and targets drawn from the model's own softmax (like a trained model)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, H, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=gen) * (3.5 / math.sqrt(H))).bfloat16().requires_grad_()
    t = torch.empty(N, dtype=torch.long, device="cuda")
    with torch.no_grad():
        for s in range(0, N, 1024):
            probs = (h[s:s + 1024] @ w.T).float().softmax(-1)
            t[s:s + 1024] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    g = torch.randn(N, device="cuda", generator=gen)
    return h, w, t, g

# ----------------------------------------------------------------------------------------------
# providers: (h, w, t) -> per-token log-probs [N] fp32 (differentiable)

def naive(h, w, t):
    return (h @ w.T).float().log_softmax(-1).gather(1, t[:, None]).squeeze(1)

def _chunk_logprobs(h, w, t):
    logits = (h @ w.T).float()
    return logits.gather(1, t[:, None]).squeeze(1) - logits.logsumexp(-1)
_compiled_chunk = torch.compile(_chunk_logprobs, dynamic=False)

def compiled_chunked(h, w, t, chunk=2048):
    return torch.cat([_compiled_chunk(h[s:s + chunk], w, t[s:s + chunk]) for s in range(0, len(t), chunk)])

def providers(grad_hint=None):
    out = {"naive torch": naive, "torch.compile chunked 2048": compiled_chunked,
           "bipost twin": lambda h, w, t: token_logprobs(h, w, t, fused=False),
           "bipost fused": lambda h, w, t: token_logprobs(h, w, t, fused=True)}
    if grad_hint is not None:  # SFT's path: the upstream gradient (g below) known in the forward, 3 GEMMs
        out["bipost grads in forward"] = lambda h, w, t: token_logprobs(h, w, t, fused=True, grad_hint=grad_hint)
        out["bipost grads in forward, torch elementwise"] = \
            lambda h, w, t: token_logprobs(h, w, t, fused=False, grad_hint=grad_hint)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="none")
        out["Liger fused linear CE"] = lambda h, w, t: -liger(w, h, t).float()
    except ImportError:
        say("note: liger-kernel not installed, skipped")
    try:
        from cut_cross_entropy import linear_cross_entropy
        out["cut-cross-entropy"] = lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none").float()
    except ImportError:
        say("note: cut-cross-entropy not installed, skipped")
    return out

def fp32_reference(h, w, t, g):
    """log-probs, dh, dW in fp32 (chunked twin, TF32 off)."""
    hf, wf = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    logp = token_logprobs(hf, wf, t, fused=False)
    (logp * g).sum().backward()
    return logp.detach(), hf.grad, wf.grad

def rel_err(a, b):
    return ((a.float() - b).norm() / b.norm()).item()

def row(name, ms, anchor, gib="", errs=("", "", "")):
    table = next(r["table"] for r in reversed(RECORDS) if "table" in r)
    RECORDS.append({"table_of": table, "method": name, "ms_p50": ms[0], "ms_p20": ms[1], "ms_p80": ms[2],
                    "ratio": ms[0] / anchor, "extra_gib": gib if isinstance(gib, float) else None,
                    "errors": [e if isinstance(e, float) else None for e in errs]})
    fmt = lambda x: f"{x:.2e}" if isinstance(x, float) else x
    gib = f"{gib:.2f}" if isinstance(gib, float) else gib
    say(f"| {name} | {ms[0]:.1f} ({ms[1]:.1f}-{ms[2]:.1f}) | {ms[0] / anchor:.2f} | {gib} | " + " | ".join(map(fmt, errs)) + " |")

def guarded(name, body):
    """run one provider; an OOM or a missing feature becomes a table row instead of a crash."""
    try:
        body()
    except torch.cuda.OutOfMemoryError:
        say(f"| {name} | OOM | | | | | |")
    except Exception as e:  # a provider's API drift must not stop the benchmark
        say(f"| {name} | failed: {type(e).__name__}: {str(e)[:80]} | | | | | |")
    gc.collect()
    torch.cuda.empty_cache()

# ----------------------------------------------------------------------------------------------

def bench_head(N, H, V):
    h, w, t, g = peaked_inputs(N, H, V)
    ref_logp, ref_dh, ref_dw = fp32_reference(h, w, t, g)
    grad_logits = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    def three_gemms():
        h.detach() @ w.detach().T, grad_logits @ w.detach(), grad_logits.T @ h.detach()
    t_gemm = bench_ms(three_gemms, None)
    t_logits = bench_ms(lambda: h.detach() @ w.detach().T, None)
    del grad_logits
    torch.cuda.empty_cache()
    say(f"\n### per-token log-prob, head fwd+bwd, N={N} H={H} V={V} (bf16, peaked logits)\n")
    say("| method | ms p50 (p20-p80) | ratio to T_gemm | extra GiB | max abs err logp | rel err dh | rel err dW |")
    say("|---|---|---|---|---|---|---|")
    row("three bare GEMMs (T_gemm)", t_gemm, t_gemm[0])
    for name, fn in providers(grad_hint=g).items():
        def body():
            step = lambda: (fn(h, w, t) * g).sum().backward()
            ms = bench_ms(step, [h, w])
            gib = extra_memory(step, [h, w])
            logp = fn(h, w, t)
            (logp * g).sum().backward()
            errs = ((logp.detach() - ref_logp).abs().max().item(), rel_err(h.grad, ref_dh), rel_err(w.grad, ref_dw))
            h.grad = w.grad = None
            row(name, ms, t_gemm[0], gib, errs)
        guarded(name, body)
    say(f"\n### reference forward (no grad), N={N}: ratio to the logits GEMM alone\n")
    say("| method | ms p50 (p20-p80) | ratio to logits GEMM | extra GiB | max abs err logp | | |")
    say("|---|---|---|---|---|---|---|")
    row("logits GEMM h @ W.T", t_logits, t_logits[0])
    for name, fn in providers().items():
        def body():
            with torch.no_grad():
                ms = bench_ms(lambda: fn(h, w, t), None)
                gib = extra_memory(lambda: fn(h, w, t), [])
                err = (fn(h, w, t) - ref_logp).abs().max().item()
            row(name, ms, t_logits[0], gib, (err, "", ""))
        guarded(name, body)
    return t_gemm[0]

def bench_dpo(pairs, length, H, V, t_gemm_per_token):
    """policy head fwd+bwd + reference head fwd + DPO loss, 30-50 % of each sequence masked as prompt."""
    N = 2 * pairs * length
    h, w, t, _ = peaked_inputs(N, H, V, seed=1)
    gen = torch.Generator(device="cuda").manual_seed(2)
    h_ref = (h.detach() + 0.1 * torch.randn(h.shape, device="cuda", generator=gen).bfloat16())
    w_ref = w.detach().clone()
    prompt = (torch.rand(2 * pairs, device="cuda", generator=gen) * 0.2 + 0.3) * length  # 30-50 % prompt
    mask = torch.arange(length, device="cuda")[None, :] >= prompt[:, None]
    floor = t_gemm_per_token * N * 8 / 6  # 8NHV FLOPs at the rate of the three bare GEMMs (6NHV)
    def bipost(fused):
        def step():
            policy = token_logprobs(h, w, t, mask.view(-1), fused=fused).view(2 * pairs, length)
            with torch.no_grad():
                reference = token_logprobs(h_ref, w_ref, t, mask.view(-1), fused=fused).view(2 * pairs, length)
            dpo_losses(policy, reference, mask, 0.1, fused=fused)[0].mean().backward()
        return step
    def naive_step():
        policy = naive(h, w, t).view(2 * pairs, length)
        with torch.no_grad():
            reference = naive(h_ref, w_ref, t).view(2 * pairs, length)
        dpo_losses(policy, reference, mask, 0.1, fused=False)[0].mean().backward()
    steps = {"naive torch": naive_step, "bipost twin": bipost(False), "bipost fused": bipost(True)}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        liger = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)
        target = torch.where(mask.view(-1), t, -100).view(2 * pairs, length)
        steps["Liger fused linear DPO"] = lambda: liger(w, h.view(2 * pairs, length, H), target,
                                                        ref_input=h_ref.view(2 * pairs, length, H), ref_weight=w_ref)[0].backward()
    except ImportError:
        say("note: liger-kernel not installed, skipped")
    say(f"\n### DPO head step, {pairs} pairs x {length} (N={N}), {100 * (1 - mask.float().mean().item()):.0f} % prompt\n")
    say("| method | ms p50 (p20-p80) | ratio to 8NHV floor | extra GiB | | | |")
    say("|---|---|---|---|---|---|---|")
    say(f"| floor: 8NHV at the measured GEMM rate | {floor:.1f} | 1.00 | | | | |")
    for name, step in steps.items():
        guarded(name, lambda: row(name, bench_ms(step, [h, w]), floor, extra_memory(step, [h, w])))

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dpo", type=str, nargs="*", default=["4x2048", "8x1024"], help="pairs x length")
    parser.add_argument("--out", default="", help="also write the tables to OUT/kernels_<gpu>.md and .jsonl")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bipost_kernels/bench.py measures GPU kernels and needs CUDA; on CPU run the tests instead: "
                 "python -m pytest -q test_bipost.py -k kernel")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    import triton, datetime
    say(f"# bipost kernels on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{datetime.date.today()}: python bipost_kernels/bench.py {' '.join(sys.argv[1:])}")
    per_token = None
    for N in args.tokens:
        per_token = bench_head(N, args.hidden, args.vocab) / N
    for spec in args.dpo:
        pairs, length = map(int, spec.split("x"))
        bench_dpo(pairs, length, args.hidden, args.vocab, per_token)
    if args.out:
        import json, re
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, "kernels_" + re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_"))
        with open(stem + ".md", "w") as f:
            f.write("\n".join(LINES) + "\n")
        with open(stem + ".jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in RECORDS if "method" in r)
        print(f"wrote {stem}.md and {stem}.jsonl")
