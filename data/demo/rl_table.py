"""
The RL demo's table (docs/rl.md): for each seed, a brief SFT warm-up (config/rl_sft_warmup.py), then from its
checkpoint, 300 more updates of each of
  SFT          more SFT on the same task (the control: does RL beat simply training longer?)
  RL           RL alone (config/rl_demo.py)
  sequential   SFT then RL, 150 updates each (strategy 'sequential')
  joint        SFT + RL in one run (strategy 'alright', λ = ½)
and every final model (and the warm-up itself) judged on the same 200 held-out problems: greedy accuracy on rl_val
and the SFT loss (per-token NLL of the right answer) on sft_add_val. Mean ± std over the seeds.

    python data/demo/rl_table.py               # 3 seeds, ~20 min on one CPU core; prints the table
    python data/demo/rl_table.py --seeds=1     # a quick look (~7 min)

Writes <out>/rl_table.json (every number) and prints the markdown table docs/rl.md shows (--print_only: again,
from that file). data/demo/rl_table.json is the run docs/rl.md quotes: --print_only --out=data/demo.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = {  # name: overrides of config/rl_demo.py
    'SFT': ['--objectives=["sft"]', '--weights=[1.0]'],
    'RL': [],
    'sequential': ['--objectives=["sft", "rl"]', '--weights=[0.5, 0.5]', '--strategy=sequential'],
    'joint': ['--objectives=["sft", "rl"]', '--weights=[0.5, 0.5]', '--strategy=alright'],
}


def bipost(*args):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    done = subprocess.run([sys.executable, 'bipost.py', *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"rl_table: bipost.py {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def records(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def judge(model_dir, out_dir, *extra):
    """Held-out greedy accuracy and SFT loss of one exported model (one eval of both objectives); extra: overrides."""
    bipost('config/rl_demo.py', f'--init_from={model_dir}', '--objectives=["sft", "rl"]', '--weights=[0.5, 0.5]',
           '--eval_only=True', f'--out_dir={out_dir}', '--overwrite=True', *extra)
    last = records(out_dir)[-1]
    return {'accuracy': last['val/rl/accuracy'], 'sft_loss': last['val/sft/loss']}


def table(saved):
    """The markdown table: means ± std over seeds, and the change from each seed's own warm-up (paired: the warm-up
    varies more across seeds than the runs after it do)."""
    results, seeds = saved['results'], saved['seeds']
    print(f"{seeds} seed(s); held-out: 200 unseen additions (greedy accuracy on rl_val, SFT loss on sft_add_val); "
          f"300 updates after the warm-up; RL sampled {saved['gen_tokens_per_s'] / 1000:.1f}k tokens/s on this CPU\n")
    print("| run (300 updates from the SFT warm-up) | held-out accuracy ↑ | change | held-out SFT loss ↓ | change |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        cells = []
        for key in ('accuracy', 'sft_loss'):
            values = np.array([r[key] for r in runs])
            change = values - np.array([r[key] for r in results['warm-up']])
            cells += [f"{values.mean():.3f} ± {values.std():.3f}",
                      '' if name == 'warm-up' else f"{change.mean():+.3f} ± {change.std():.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--out', default='out-rl-table')
    parser.add_argument('--print_only', action='store_true', help='print the table of an earlier run from its json')
    args = parser.parse_args()
    out = os.path.join(ROOT, args.out)
    if args.print_only:
        with open(os.path.join(out, 'rl_table.json')) as f:
            return table(json.load(f))
    results = {name: [] for name in ['warm-up', *RUNS]}
    speed = []
    for seed in range(1337, 1337 + args.seeds):
        base = os.path.join(out, f'seed{seed}')
        warmup = os.path.join(base, 'warmup')
        bipost('config/rl_sft_warmup.py', f'--seed={seed}', f'--out_dir={warmup}', '--overwrite=True')
        results['warm-up'].append(judge(os.path.join(warmup, 'hf'), os.path.join(base, 'judge-warmup')))
        for name, overrides in RUNS.items():
            run = os.path.join(base, name)
            bipost('config/rl_demo.py', *overrides, f'--seed={seed}', f'--init_from={os.path.join(warmup, "hf")}',
                   f'--out_dir={run}', '--overwrite=True')
            speed += [r['train/rl/gen_tokens_per_s'] for r in records(run) if 'train/rl/gen_tokens_per_s' in r]
            results[name].append(judge(os.path.join(run, 'hf'), os.path.join(base, f'judge-{name}')))
        print(f"seed {seed}: " + ", ".join(f"{n} acc {r[-1]['accuracy']:.3f} sft {r[-1]['sft_loss']:.3f}"
                                           for n, r in results.items()), flush=True)
    saved = {'seeds': args.seeds, 'results': results, 'gen_tokens_per_s': float(np.mean(speed))}
    with open(os.path.join(out, 'rl_table.json'), 'w') as f:
        json.dump(saved, f, indent=1)
    print()
    table(saved)


if __name__ == '__main__':
    main()
