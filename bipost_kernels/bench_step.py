"""
End-to-end training-step benchmark (docs/efficiency.md): bipost's SFT, DPO and alright (SFT + DPO) updates on a
Llama-3.2-1B-shaped model built from its config (random init, bf16, vocab 128,256, sequences of 1,024 tokens), in
plain torch and DeepSpeed ZeRO-2 and ZeRO-3 (world of one), and TRL's DPOTrainer on the same model and pairs, the
anchor; then SFT with the head's gradients in the backward (sft_grads_in_forward=False: the "before"), a LoRA SFT
update (rank 16) and an RL update (8 sampled completions of 128 tokens per prompt), whose row shows the sampling
speed too. Every bipost row is one `python bipost.py` run with overrides; its numbers come from that run's metrics.jsonl
(tokens/s over the updates after the warm-up ones, the median MFU, the peak GPU memory), so they are what the training
log line shows. MFU counts 6·P FLOPs per trained token and 2·P more per token through the frozen reference.
    python bipost_kernels/bench_step.py --out bipost_kernels/results        # every row (~6 min on one H200)
    python bipost_kernels/bench_step.py --only sft:plain dpo:zero3    # some rows (trl:plain is the anchor; sft_lora, rl too)
    python bipost_kernels/bench_step.py --tiny                        # a 2-layer model on CPU: checks the script, times nothing
"""
import argparse, json, os, re, statistics, subprocess, sys, tempfile, time
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import memory_plan

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048, rope_theta=500000.0,
                tie_word_embeddings=True)  # Llama-3.2-1B's shape (its rope scaling aside: no effect on speed)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True)
JOBS = {'sft': dict(objectives=['sft'], strategy='sequential', weights=[1.0]),
        'dpo': dict(objectives=['dpo'], strategy='sequential', weights=[1.0]),
        'alright': dict(objectives=['sft', 'dpo'], strategy='alright', weights=[0.5, 0.5]),
        'sft_4gemm': dict(objectives=['sft'], strategy='sequential', weights=[1.0], sft_grads_in_forward=False),
        'sft_lora': dict(objectives=['sft'], strategy='sequential', weights=[1.0], lora_rank=16, lora_alpha=32),
        'rl': dict(objectives=['rl'], strategy='sequential', weights=[1.0], rl_group=8, rl_max_new_tokens=128)}
BACKENDS = {'plain': dict(deepspeed=False), 'zero2': dict(deepspeed=True, zero_stage=2),
            'zero3': dict(deepspeed=True, zero_stage=3)}


def make_model(path, shape, device, dtype):
    """A randomly initialised Llama of this shape saved as an HF dir, with a word-level tokenizer 't0' .. 't{V-1}'
    (TRL tokenizes text; 't5 t9' is the ids 5, 9 exactly), EOS = pad = the last id."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    V = shape['vocab_size']
    config = LlamaConfig(**shape, bos_token_id=None, eos_token_id=V - 1, pad_token_id=V - 1)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    words = Tokenizer(models.WordLevel({f't{i}': i for i in range(V)}, unk_token='t0'))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token=f't{V - 1}', pad_token=f't{V - 1}').save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def make_data(path, tokenizer, V, prompt, response, sft, pairs, seed=0):
    """bipost's prepared format (data/prepare.py) written directly (tokenizer: the model dir's, which decodes RL
    completions): random ids below V-1, each response ends in EOS;
    splits sft_train/sft_val (prompt + response), pref_train/pref_val (prompt + chosen + rejected), rl_train/rl_val
    (prompts)."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    meta = dict(vocab_size=V, eos_id=V - 1, pad_id=V - 1, tokenizer=tokenizer, max_length=prompt + response,
                splits={})
    for name, kind, n in (('sft_train', 'sft', sft), ('sft_val', 'sft', 8), ('pref_train', 'pref', pairs),
                          ('pref_val', 'pref', 8)):
        parts = [prompt] + [response] * (1 if kind == 'sft' else 2)
        rows = rng.integers(0, V - 1, size=(n, sum(parts)), dtype=np.uint32)
        for end in np.cumsum(parts)[1:]:
            rows[:, end - 1] = V - 1
        index = np.array([[i * sum(parts)] + parts for i in range(n)], dtype=np.int64)
        rows.tofile(os.path.join(path, f'{name}.bin'))
        np.save(os.path.join(path, f'{name}_index.npy'), index)
        meta['splits'][name] = dict(kind=kind, examples=n, tokens=int(rows.size), truncated=0, dropped=0,
                                    max_length=prompt + response)
    for name, n in (('rl_train', pairs), ('rl_val', 8)):  # prompts (random: every reward is 0, the speed is real)
        rows = rng.integers(0, V - 1, size=(n, prompt), dtype=np.uint32)
        rows.tofile(os.path.join(path, f'{name}.bin'))
        np.save(os.path.join(path, f'{name}_index.npy'), np.array([[i * prompt, prompt] for i in range(n)], np.int64))
        with open(os.path.join(path, f'{name}_extra.jsonl'), 'w') as f:
            f.writelines('{"answer": "1"}\n' for _ in range(n))
        meta['splits'][name] = dict(kind='prompt', examples=n, tokens=int(rows.size), truncated=0, dropped=0,
                                    max_length=prompt)
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)


def summarize(records, warmup):
    """tokens/s over the timed updates (after warmup), their median MFU, the run's peak GiB, ms per objective."""
    timed = [r for r in records if 'ms' in r][warmup:]
    if not timed:
        raise RuntimeError("no timed update was logged")
    ms = sum(r['ms'] for r in timed)
    per_objective = {}
    for r in timed:
        per_objective.setdefault(r['objective'], []).append(r['ms'])
    return dict(updates=len(timed), tokens_per_update=statistics.median(r['tokens'] for r in timed),
                tok_s=sum(r['tokens'] for r in timed) / ms * 1000,
                mfu=statistics.median(r['mfu'] for r in timed) if 'mfu' in timed[0] else None,
                peak_gib=max(r.get('peak_gib', 0.0) for r in timed) or None,
                gen_tok_s=statistics.median(r['train/rl/gen_tokens_per_s'] for r in timed)
                if 'train/rl/gen_tokens_per_s' in timed[0] else None,
                ms_per_update={k: statistics.median(v) for k, v in per_objective.items()})


def run_bipost(job, backend, model_dir, data_dir, work, args):
    out = os.path.join(work, f'{job}-{backend}')
    overrides = dict(init_from=model_dir, dataset=data_dir, out_dir=out, overwrite=True, batch_size=args.pairs,
                     max_iters=args.warmup + args.iters, eval_interval=10**9, eval_iters=1, log_interval=1,
                     save_checkpoints=False, export_hf=False, warmup_iters=0, learning_rate=1e-6, min_lr=1e-7, beta=0.1,
                     length_normalize=False, dtype=args.dtype, device=args.device, **JOBS[job], **BACKENDS[backend])
    cmd = [sys.executable, os.path.join(ROOT, 'bipost.py')] + [f'--{k}={v}' for k, v in overrides.items()]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"bipost.py exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-600:]}")
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f]
    return dict(summarize(records, args.warmup), wall_s=time.time() - started)


def run_trl(model_dir, data_dir, n_params, args):
    """TRL's DPOTrainer with its defaults (fp32 weights under bf16 autocast, the reference a copy on the GPU) on the
    same pairs, timed per step by a callback."""
    try:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
    except ImportError as e:  # optional extras; the other rows do not need them
        raise ImportError(f"{e}: the anchor row needs TRL, not in requirements.txt: pip install trl datasets") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    tokens, index = np.fromfile(os.path.join(data_dir, 'pref_train.bin'), dtype=np.uint32), \
        np.load(os.path.join(data_dir, 'pref_train_index.npy'))
    text = lambda ids: ' '.join(f't{i}' for i in ids)
    rows = [dict(prompt=text(tokens[o:o + p]), chosen=' ' + text(tokens[o + p:o + p + c]),
                 rejected=' ' + text(tokens[o + p + c:o + p + c + r])) for o, p, c, r in index]
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[-1] = time.perf_counter() - times[-1]

    cuda = args.device.startswith('cuda')
    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.pairs,
                       max_steps=args.warmup + args.iters, learning_rate=1e-6, beta=0.1, bf16=cuda and args.dtype == 'bfloat16',
                       max_length=args.prompt + args.response, save_strategy='no', report_to='none', logging_steps=10**6,
                       use_cpu=not cuda, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Timer()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.time()
    trainer.train()
    timed = times[args.warmup:]
    per_step = args.pairs * 2 * (args.prompt + args.response)
    peak = memory_plan.peak_flops(torch.cuda.get_device_name()) if cuda else None
    return dict(updates=len(timed), tokens_per_update=per_step, tok_s=per_step * len(timed) / sum(timed),
                mfu=statistics.median(8 * n_params * per_step / t / peak for t in timed) if peak else None,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                ms_per_update={'dpo': statistics.median(timed) * 1000}, wall_s=time.time() - started)


def table(results, device):
    """markdown: one row per run; alright's ms per update beside the sequential recipe's (the same objectives' updates
    in the single-objective runs of that backend, weighted as alright chose them); TRL's row is the anchor."""
    fmt = lambda x, spec: '' if x is None else format(x, spec)
    lines = [f"| run | backend | tokens/update | tok/s | MFU | peak GiB | ms/update | vs anchor |",
             "|---|---|---|---|---|---|---|---|"]
    anchor = results.get('trl:plain')
    for key, r in results.items():
        job, backend = key.split(':')
        if 'error' in r:
            lines.append(f"| {job} | {backend} | failed: {r['error'][:160]} | | | | | |")
            continue
        ms = ', '.join(f"{k} {v:.0f}" for k, v in r['ms_per_update'].items())
        if r.get('gen_tok_s'):  # rl: sampling speed (tok/s and MFU count trained tokens, not generation FLOPs)
            ms += f" ({r['gen_tok_s'] / 1000:.1f}k generated tok/s)"
        sequential = [results.get(f'{k}:{backend}', {}).get('ms_per_update', {}).get(k) for k in r['ms_per_update']]
        if job == 'alright' and all(sequential):
            ms += f" (sequential: {', '.join(f'{v:.0f}' for v in sequential)})"
        versus = ''
        if anchor and 'error' not in anchor and job == 'dpo':
            versus = f"{r['tok_s'] / anchor['tok_s']:.2f}x tok/s" + (
                f", {r['peak_gib'] / anchor['peak_gib']:.2f}x GiB" if r['peak_gib'] and anchor['peak_gib'] else '')
        lines.append(f"| {job} | {backend} | {r['tokens_per_update']:.0f} | {r['tok_s'] / 1000:.1f}k | "
                     f"{fmt(r['mfu'] and 100 * r['mfu'], '.0f')}{'%' * bool(r['mfu'])} | {fmt(r['peak_gib'], '.1f')} | "
                     f"{ms} | {versus} |")
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', nargs='*', default=None, help='job:backend rows, e.g. sft:plain trl:plain')
    parser.add_argument('--pairs', type=int, default=4, help='micro-batch: pairs for dpo, sequences for sft')
    parser.add_argument('--prompt', type=int, default=256)
    parser.add_argument('--response', type=int, default=768, help='prompt + response = the sequence length')
    parser.add_argument('--warmup', type=int, default=3, help='updates not timed (compilation, autotuning)')
    parser.add_argument('--iters', type=int, default=10, help='updates timed')
    parser.add_argument('--tiny', action='store_true', help='a 2-layer model on CPU in fp32: checks this script')
    parser.add_argument('--out', default='', help='write OUT/step_<gpu>.md and .jsonl')
    parser.add_argument('--work', default='', help='where the model, data and runs go (default: a temporary dir)')
    args = parser.parse_args()
    if args.tiny:
        args.device, args.dtype, shape = 'cpu', 'float32', TINY
        args.prompt, args.response = min(args.prompt, 16), min(args.response, 48)
    elif not torch.cuda.is_available():
        sys.exit("bipost_kernels/bench_step.py times training steps on a CUDA GPU; on CPU, --tiny checks the script")
    else:
        args.device, args.dtype, shape = 'cuda', 'bfloat16', LLAMA_1B
    rows = args.only or [f'{j}:{b}' for b in BACKENDS for j in ('sft', 'dpo', 'alright')] + \
        ['trl:plain', 'sft_4gemm:plain', 'sft_lora:plain', 'rl:plain']  # the anchor and the bars first
    unknown = [r for r in rows if r not in {f'{j}:{b}' for j in JOBS for b in BACKENDS} | {'trl:plain'}]
    if unknown:
        sys.exit(f"--only: unknown rows {unknown}: use job:backend with job in {list(JOBS)}, backend in "
                 f"{list(BACKENDS)}, or trl:plain")
    work = args.work or tempfile.mkdtemp(prefix='bipost-bench-')
    model_dir, data_dir = os.path.join(work, 'model'), os.path.join(work, 'data')
    n_params = make_model(model_dir, shape, args.device, torch.bfloat16 if args.dtype == 'bfloat16' else torch.float32)
    updates = (args.warmup + args.iters + 2) * args.pairs  # each run reads its own cursor from the start
    make_data(data_dir, model_dir, shape['vocab_size'], args.prompt, args.response, updates, updates)
    device = torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'
    import transformers
    header = (f"# bipost training step on {device}, torch {torch.__version__}, transformers {transformers.__version__}, "
              f"{time.strftime('%Y-%m-%d')}: {n_params / 1e9:.2f}B parameters, {args.pairs} x "
              f"{args.prompt + args.response} tokens (pairs for dpo), {args.iters} timed updates after {args.warmup}\n"
              f"# python bipost_kernels/bench_step.py {' '.join(sys.argv[1:])}")
    print(header, flush=True)
    results = {}
    for key in rows:
        job, backend = key.split(':')
        try:
            results[key] = run_trl(model_dir, data_dir, n_params, args) if job == 'trl' else \
                run_bipost(job, backend, model_dir, data_dir, work, args)
        except Exception as e:  # one failing row (an OOM, TRL's API drift) must not lose the others
            results[key] = dict(error=f"{type(e).__name__}: {e}".replace('\n', ' '))
        print(key, json.dumps(results[key]), flush=True)
        if args.out:  # after every row: a run cut short keeps what it measured
            os.makedirs(args.out, exist_ok=True)
            stem = os.path.join(args.out, 'step_' + re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_'))
            with open(stem + '.md', 'w') as f:
                f.write(header + '\n\n' + table(results, device) + '\n')
            with open(stem + '.jsonl', 'w') as f:
                f.writelines(json.dumps({'row': k, **v}) + '\n' for k, v in results.items())
    print('\n' + table(results, device))
    return results


if __name__ == '__main__':
    main()
