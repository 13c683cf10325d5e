"""
DPO or PPO? on the RL demo (docs/reward-model.md): for each seed, the SFT warm-up of rl_table.py
(config/rl_sft_warmup.py), then preference pairs from the warm-up's OWN samples on rl_train's prompts (a verified
answer chosen over a wrong one), and from the warm-up, with the same pairs and the same number of updates:
  DPO          DPO on the pairs
  PPO-RM       a reward model trained on the pairs (objective rm), then PPO against it (rl_reward=<rm>/hf)
  GRPO-RM      the same reward model, GRPO's group-normalized advantages
  RLVR         GRPO against the verifier itself (rewards.verify_number): the upper bound, no pairs needed
  each of those jointly with SFT (objectives ['sft', X], strategy alright, λ = ½: rl_table.py's joint row)
every final model (and the warm-up) judged as rl_table.py does: greedy accuracy on rl_val, SFT loss on sft_add_val
(200 held-out problems); the reward model and DPO by their pair accuracy on pairs from held-out prompts; time per
update (mean ms of the run's updates).

    python data/demo/rlhf_table.py                    # 3 seeds, 300 updates each run: ~30 min on 2 shared cores
    python data/demo/rlhf_table.py --seeds=1 --iters=10   # a smoke run, ~3 min

Writes <out>/rlhf_table.json (every number) and prints the markdown table docs/reward-model.md shows (--print_only:
again, from that file). data/demo/rlhf_table.json is the run the docs quote: --print_only --out=data/demo.
"""
import argparse
import json
import os
import random
import sys
from collections import Counter

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from data.demo.rl_table import bipost, records, judge  # noqa: E402  the same runs, the same judge
from data.prepare import Tokenizer, prepare  # noqa: E402
from rewards import verify_number  # noqa: E402

HELD_OUT = 0.2  # share of rl_train's prompts whose pairs only measure pair accuracy (never trained on)
SAMPLES = 16  # completions per prompt for the pairs: more prompts get both a right and a wrong one (RL's group is 8)
SPLITS = "{'sft': 'sft_add_train', 'rl': 'rl_train', 'dpo': 'pref_train', 'rm': 'pref_train'}"
VAL_SPLITS = "{'sft': 'sft_add_val', 'rl': 'rl_val', 'dpo': 'pref_val', 'rm': 'pref_val'}"
PPO = ['--rl_advantage=ppo', '--rl_whiten=True', '--rl_kl_in_reward=True', '--rl_reward_norm=True']
RUNS = {  # name: (its objective, trained against the reward model, overrides of config/rl_demo.py)
    'DPO': ('dpo', False, []),
    'PPO-RM': ('rl', True, PPO),
    'GRPO-RM': ('rl', True, []),
    'RLVR': ('rl', False, []),
}


def demo_config():
    """config/rl_demo.py's globals: the RL demo's sampling settings, so that the pairs are sampled as RL samples."""
    config = {}
    exec(open(os.path.join(ROOT, 'config', 'rl_demo.py')).read(), config)
    return config


def preference_pairs(prompts, samples, verdicts):
    """One pair per prompt from its sampled completions and their verdicts (True: verified right): the prompt's most
    frequent right completion chosen over its most frequent wrong one (ties: the one sampled first). The most
    frequent wrong answer is the model's likeliest mistake, the one a preference should push down. A prompt with no
    right or no wrong sample gives no pair (see docs/reward-model.md for why)."""
    pairs = []
    for prompt, texts, right in zip(prompts, samples, verdicts):
        counts = [Counter(t for t, r in zip(texts, right) if r == wanted) for wanted in (True, False)]
        if all(counts):
            (chosen, _), (rejected, _) = (c.most_common(1)[0] for c in counts)  # Counter keeps first-seen order
            pairs.append({'prompt': prompt, 'chosen': chosen, 'rejected': rejected})
    return pairs


@torch.no_grad()
def sample(model_dir, prompts, group, temperature, max_new_tokens, seed, batch=256):
    """group completions per prompt at the RL demo's temperature, decoded as the RL rewards see them."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    tok = Tokenizer('demo')
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    config = GenerationConfig(do_sample=True, temperature=temperature, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(seed)
    texts = []
    for start in range(0, len(prompts), batch):
        ids = [tok.bos + tok.encode(p) for p in prompts[start:start + batch]]
        width = max(map(len, ids))  # left-padded, as RL's rollouts
        input_ids = torch.tensor([[tok.pad_id] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        out = model.generate(input_ids=input_ids.repeat_interleave(group, 0), attention_mask=mask.repeat_interleave(
            group, 0), generation_config=config)[:, width:]
        texts += [bytes(t for t in row.tolist() if t < 256).decode('utf-8', 'replace')
                  for row in out]  # ids 0-255 are the bytes, 256 the EOS (and pad)
    return [texts[i:i + group] for i in range(0, len(texts), group)]


def build_pairs(warmup, dataset, seed, config):
    """Samples the warm-up on rl_train, writes pairs_{train,val}.jsonl and prepares the seed's dataset (the demo's
    addition splits plus pref_train / pref_val) into dataset. Returns the pair statistics."""
    with open(os.path.join(ROOT, 'data', 'demo', 'rl_train.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    prompts = [r['prompt'] for r in rows]
    samples = sample(warmup, prompts, SAMPLES, config['rl_temperature'], config['rl_max_new_tokens'], seed)
    verdicts = [[bool(v) for v in verify_number(None, texts, answer=[r['answer']] * len(texts))]
                for texts, r in zip(samples, rows)]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = int(len(order) * HELD_OUT)
    parts = {'pref_val': sorted(order[:cut]), 'pref_train': sorted(order[cut:])}
    os.makedirs(dataset, exist_ok=True)
    sources = {name: os.path.join(ROOT, 'data', 'demo', f'{name}.jsonl')
               for name in ('sft_add_train', 'sft_add_val', 'rl_train', 'rl_val')}
    stats = {'sample_accuracy': float(np.mean(verdicts)),
             'all_right': sum(all(v) for v in verdicts), 'all_wrong': sum(not any(v) for v in verdicts)}
    for name, indices in parts.items():
        pairs = preference_pairs([prompts[i] for i in indices], [samples[i] for i in indices],
                                 [verdicts[i] for i in indices])
        sources[name] = os.path.join(dataset, f'pairs_{name}.jsonl')
        with open(sources[name], 'w') as f:
            f.writelines(json.dumps(p) + '\n' for p in pairs)
        stats[f'{name}_pairs'] = len(pairs)
    prepare(dataset, 'demo', sources, max_length=128)
    return stats


def update_ms(out_dir):
    """Mean milliseconds per update: the run's training time over its updates (a joint run alternates cheap SFT
    updates with dear ones, so a median would pick one kind)."""
    return float(np.mean([r['ms'] for r in records(out_dir) if 'ms' in r]))


def pair_accuracy(out_dir, key):
    return [r[key] for r in records(out_dir) if key in r][-1]


def table(saved):
    """The markdown table: means ± std over seeds, the change from each seed's own warm-up (paired, as rl_table.py),
    and the time per update as a ratio to DPO's in the same seed's run."""
    results, seeds, pairs = saved['results'], saved['seeds'], saved['pairs']
    mean = lambda key: np.mean([p[key] for p in pairs])
    print(f"{seeds} seed(s), {saved['iters']} updates per run from the SFT warm-up; pairs from the warm-up's own "
          f"samples ({mean('sample_accuracy'):.2f} of them right): {mean('pref_train_pairs'):.0f} train and "
          f"{mean('pref_val_pairs'):.0f} held-out pairs per seed; held-out: 200 unseen additions\n")
    print("| run | held-out accuracy ↑ | change | held-out SFT loss ↓ | change | held-out pair accuracy | ms / update "
          "| × DPO |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        cells = []
        for key in ('accuracy', 'sft_loss'):
            values = np.array([r.get(key, np.nan) for r in runs])
            change = values - np.array([r[key] for r in results['warm-up']])
            cells += ['' if np.isnan(values).all() else f"{values.mean():.3f} ± {values.std():.3f}",
                      '' if name == 'warm-up' or np.isnan(values).all() else f"{change.mean():+.3f} ± {change.std():.3f}"]
        if 'pair_accuracy' in runs[0]:
            values = np.array([r['pair_accuracy'] for r in runs])
            cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
        else:
            cells.append('')
        if 'ms' in runs[0]:
            ms = np.array([r['ms'] for r in runs])
            ratio = ms / np.array([r['ms'] for r in results['DPO']])
            cells += [f"{ms.mean():.0f}", f"{ratio.mean():.1f}"]
        else:
            cells += ['', '']
        print(f"| {name} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--iters', type=int, default=300, help='updates of every run after the warm-up')
    parser.add_argument('--out', default='out-rlhf-table')
    parser.add_argument('--print_only', action='store_true', help='print the table of an earlier run from its json')
    parser.add_argument('--extra', default='', help="overrides for every bipost.py run, e.g. '--packing=False' (the "
                        "rows data/demo/rlhf_table.json was measured on)")
    args = parser.parse_args()
    extra = args.extra.split()
    out = os.path.join(ROOT, args.out)
    if args.print_only:
        with open(os.path.join(out, 'rlhf_table.json')) as f:
            return table(json.load(f))
    config = demo_config()
    names = ['warm-up', 'reward model', *RUNS, *(f'SFT + {n}' for n in RUNS)]
    results, pairs = {name: [] for name in names}, []
    for seed in range(1337, 1337 + args.seeds):
        base = os.path.join(out, f'seed{seed}')
        warmup, dataset = os.path.join(base, 'warmup'), os.path.join(base, 'data')
        bipost('config/rl_sft_warmup.py', f'--seed={seed}', f'--out_dir={warmup}', '--overwrite=True', *extra)
        results['warm-up'].append(judge(os.path.join(warmup, 'hf'), os.path.join(base, 'judge-warmup'), *extra))
        pairs.append(build_pairs(os.path.join(warmup, 'hf'), dataset, seed, config))
        common = [f'--seed={seed}', f'--init_from={os.path.join(warmup, "hf")}', f'--dataset={dataset}',
                  f'--train_splits={SPLITS}', f'--val_splits={VAL_SPLITS}', f'--max_iters={args.iters}',
                  f'--eval_interval={args.iters}', *extra]
        rm = os.path.join(base, 'rm')
        bipost('config/rl_demo.py', '--objectives=["rm"]', '--weights=[1.0]', *common, f'--out_dir={rm}',
               '--overwrite=True')
        results['reward model'].append({'pair_accuracy': pair_accuracy(rm, 'val/rm/accuracy'), 'ms': update_ms(rm)})
        reward = [f'--rl_reward={os.path.join(rm, "hf")}', '--rl_reward_scale=1.0']
        for name, (objective, uses_rm, overrides) in RUNS.items():
            for joint in (False, True):
                run_name = f'SFT + {name}' if joint else name
                mix = [f'--objectives=["sft", "{objective}"]', '--weights=[0.5, 0.5]', '--strategy=alright'] if joint \
                    else [f'--objectives=["{objective}"]', '--weights=[1.0]']
                run = os.path.join(base, run_name.replace(' + ', '+'))
                bipost('config/rl_demo.py', *common, *overrides, *mix, *(reward if uses_rm else []), f'--out_dir={run}',
                       '--overwrite=True')
                result = judge(os.path.join(run, 'hf'), os.path.join(base, f'judge-{os.path.basename(run)}'), *extra)
                result['ms'] = update_ms(run)
                if objective == 'dpo':
                    result['pair_accuracy'] = pair_accuracy(run, 'val/dpo/rewards/accuracies')
                results[run_name].append(result)
        print(f"seed {seed}: {pairs[-1]}; " + ", ".join(
            f"{n} acc {r[-1].get('accuracy', r[-1].get('pair_accuracy')):.3f}" for n, r in results.items()), flush=True)
    saved = {'seeds': args.seeds, 'iters': args.iters, 'pairs': pairs, 'results': results}
    with open(os.path.join(out, 'rlhf_table.json'), 'w') as f:
        json.dump(saved, f, indent=1)
    print()
    table(saved)


if __name__ == '__main__':
    main()
