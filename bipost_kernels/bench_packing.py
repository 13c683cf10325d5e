"""
Padded vs packed micro-batches (docs/packing.md): one SFT training step (forward + backward through objectives.sft,
the head's gradients in the forward as bipost trains) on the same micro-batches, packing=False then True, alternating,
several repeats; medians, reported as packed / padded ratios (BENCH.md: only ratios from one run mean anything).

Two workloads:
  demo       data/demo's sft_train, micro-batches of 16 (config/demo.py), the demo's 2-layer 128-wide scratch Llama
  lognormal  lengths drawn log-normally (median 256 tokens, σ = 1, clipped to 20..2,048; the prompt a uniform 10-50 %
             of each), a shape like the long-tailed length histograms of public chat SFT mixes, not fitted to one;
             micro-batches of 8 examples; a 4-layer 256-wide Llama (vocab 8,192, 10 M parameters)
Reported per workload: real tokens/s, the activations saved for the backward (bytes of the tensors autograd keeps:
what padding inflates; the process's peak RSS is printed too, for both modes together), and the share of the padded
step's FLOPs that went to padding: linear layers (every position of the rectangle) and attention (causal scores per
row), from the batch's shape; and the positions and attention scores of the packed rows [R, W] (packing.py; sdpa
scores every pair of a row) over the padded rows' B x L and B x L x L. CPU: run it with OMP_NUM_THREADS=1 on a quiet machine and say how loaded it was.
    OMP_NUM_THREADS=1 python bipost_kernels/bench_packing.py                 # both workloads (~3 min on one core)
    OMP_NUM_THREADS=1 python bipost_kernels/bench_packing.py --repeats 3 --batches 2 --only demo
"""
import argparse, os, resource, statistics, sys, time
from types import SimpleNamespace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import objectives, packing  # noqa: E402  (the repo root is on the path first)


def llama(vocab, hidden, layers, heads, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                         tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(config)


def right_padded(rows, prompts, pad_id):
    """Split.batch's layout: token rows right-padded, attention and response masks."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(r)
    positions = torch.arange(L)
    lengths = torch.tensor([len(r) for r in rows])[:, None]
    attention = positions < lengths
    return {'input_ids': ids, 'attention_mask': attention.long(),
            'response_mask': (positions >= torch.tensor(prompts)[:, None]) & attention}


def demo_batches(n, batch_size=16):
    from data.loader import Split, load_meta
    data_dir = os.path.join(ROOT, 'data', 'demo')
    meta = load_meta(data_dir)
    split = Split(data_dir, 'sft_train', 'sft', meta, seed=0)
    batches = [split.batch(split.next_ids(batch_size)) for _ in range(n)]
    return batches, llama(meta['vocab_size'], 128, 2, 4)


def lognormal_batches(n, batch_size=8, vocab=8192, seed=0):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n):
        lengths = np.clip(np.round(rng.lognormal(np.log(256), 1.0, batch_size)), 20, 2048).astype(int)
        prompts = [int(l * rng.uniform(0.1, 0.5)) for l in lengths]
        rows = [rng.integers(0, vocab - 1, l) for l in lengths]
        batches.append(right_padded(rows, prompts, vocab - 1))
    return batches, llama(vocab, 256, 4, 4)


def padding_share(batch):
    """Share of the padded step's FLOPs spent on padding: (linear layers, attention scores), from the shapes; and
    the packed rows' positions and attention scores (sdpa scores every pair of a row [R, W]) over the padded ones."""
    mask = batch['attention_mask']
    B, L = mask.shape
    real = mask.sum(1).double()
    linear = 1 - float(real.sum()) / (B * L)
    attention = 1 - float((real * (real + 1) / 2).sum()) / (B * L * (L + 1) / 2)  # causal score pairs per row
    R, W = packing.pack(batch['input_ids'], mask).input_ids.shape
    return linear, attention, R * W / (B * L), R * W * W / (B * L * L)


def saved_bytes(step):
    """Bytes of the tensors autograd saves for the backward during step() (storage counted once)."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def measure(batches, model, repeats):
    ctx = {mode: SimpleNamespace(fused_kernels=False, grads_in_forward=True, packing=mode == 'packed')
           for mode in ('padded', 'packed')}

    def step(batch, mode):
        losses, _ = objectives.sft(model, batch, ctx[mode])
        losses.mean().backward()
        model.zero_grad(set_to_none=True)

    tokens = sum(int(b['attention_mask'].sum()) for b in batches)
    for mode in ('padded', 'packed'):  # warm-up: allocator, first-call costs
        step(batches[0], mode)
    times = {'padded': [], 'packed': []}
    for _ in range(repeats):  # alternating, so that load on the machine falls on both alike
        for mode in ('padded', 'packed'):
            start = time.perf_counter()
            for batch in batches:
                step(batch, mode)
            times[mode].append(time.perf_counter() - start)
    memory = {mode: max(saved_bytes(lambda: step(b, mode)) for b in batches) for mode in times}
    speed = {mode: tokens / statistics.median(t) for mode, t in times.items()}
    shares = np.mean([padding_share(b) for b in batches], 0)
    return dict(tokens=tokens, speed=speed, memory=memory, times=times, linear=shares[0], attention=shares[1],
                positions=shares[2], scores=shares[3])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--batches', type=int, default=2, help='micro-batches per repeat')
    parser.add_argument('--only', choices=['demo', 'lognormal'])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} | load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} | {args.repeats} repeats x {args.batches} micro-batches")
    print("| workload | real tokens | padded tok/s | packed tok/s | packed / padded speed | saved activations padded "
          "| packed | packed / padded | padding share of linear FLOPs | of attention FLOPs | packed / padded positions "
          "| scores |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, make in (('demo', demo_batches), ('lognormal', lognormal_batches)):
        if args.only and name != args.only:
            continue
        batches, model = make(args.batches)
        r = measure(batches, model, args.repeats)
        mib = {mode: r['memory'][mode] / 2**20 for mode in r['memory']}
        print(f"| {name} | {r['tokens']} | {r['speed']['padded']:.0f} | {r['speed']['packed']:.0f} | "
              f"{r['speed']['packed'] / r['speed']['padded']:.2f} | {mib['padded']:.1f} MiB | {mib['packed']:.1f} MiB | "
              f"{mib['packed'] / mib['padded']:.2f} | {100 * r['linear']:.0f} % | {100 * r['attention']:.0f} % | {r['positions']:.2f} | {r['scores']:.2f} |")
    print(f"peak RSS of this process (both modes): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == '__main__':
    main()
