"""
Coreset selection on the demo (docs/coresets.md): BRIEF vs CRAIG vs random subsets of sft_train at several
fractions, each trained for the same number of epochs, beside training on all of it; held-out SFT loss on the whole
of sft_val, mean ± std over training seeds.

    python data/demo/brief_table.py                                  # ~15 min on 2 quiet CPU cores; prints markdown tables
    python data/demo/brief_table.py --seeds 1337 --fractions 0.05    # one seed, one fraction: ~3 min

1. Warm-up (config/brief_demo.py): 4 epochs on a random 5% from scratch; its export and Adam state give the features.
2. Features once (g_SFT, g_KN, g_IF of the last layer, Adam-preconditioned, 512 dims), then every selection from them
   (coreset_features): BRIEF and CRAIG once per fraction (deterministic), random once per fraction and seed.
3. Training from scratch on each coreset with its weights (example_weights; random: uniform), `--epochs` epochs of it;
   'brief-uniform': BRIEF's coreset without its weights (does the weighting help?).
Runs are sequential subprocesses of bipost.py, with OMP_NUM_THREADS=1 unless set.
"""
import os, sys, json, math, argparse, subprocess
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 2000  # examples of sft_train
BATCH = 16


def bipost(*args):
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')}
    run = subprocess.run([sys.executable, 'bipost.py', 'config/brief_demo.py', *args, '--overwrite=True'], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"bipost.py config/brief_demo.py {' '.join(args)} failed:\n{run.stderr[-3000:]}")
    return run.stdout


def final_val_loss(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if 'val/sft/loss' in r][-1]['val/sft/loss']


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out_dir', default=os.path.join(ROOT, 'out-brief-table'))
    parser.add_argument('--seeds', type=int, nargs='+', default=[1337, 1, 2])
    parser.add_argument('--fractions', type=float, nargs='+', default=[0.05, 0.1, 0.2])
    parser.add_argument('--methods', nargs='+', default=['brief', 'craig', 'random', 'brief-uniform'],
                        help="a -uniform suffix: that method's coreset trained without its weights")
    parser.add_argument('--epochs', type=int, default=16)
    args = parser.parse_args()
    out = lambda *parts: os.path.join(args.out_dir, *parts)

    bipost('--coreset=random', f"--out_dir={out('warmup-keep')}")  # a random 5% (seed 1337)
    bipost("--coreset=''", f"--keep_list={out('warmup-keep', 'keep.npy')}", f"--out_dir={out('warmup')}")
    features = out('features', 'coreset_features.pt')
    print(bipost(f"--init_from={out('warmup', 'hf')}", f"--coreset_adam={out('warmup')}", f"--out_dir={out('features')}")
          .strip().splitlines()[-1], flush=True)

    def train(name, seed, updates, keep='', weights=''):
        directory = out(f'train-{name}-seed{seed}')
        bipost("--coreset=''", f"--keep_list='{keep}'", f"--example_weights='{weights}'", f'--seed={seed}',
               f'--max_iters={updates}', f'--eval_interval={updates}', f'--out_dir={directory}', '--export_hf=False')
        return final_val_loss(directory)

    rows, summaries = [], {}
    for fraction in args.fractions:
        k = math.ceil(fraction * N - 1e-9)
        updates = math.ceil(args.epochs * k / BATCH)
        for method in args.methods:
            base, uniform = method.removesuffix('-uniform'), method.endswith('-uniform')
            losses, scores = [], []
            for seed in args.seeds:
                select = out(f'{base}-{fraction}' + (f'-seed{seed}' if base == 'random' else ''))
                if not os.path.exists(os.path.join(select, 'keep.npy')) or (base == 'random' and not uniform):
                    bipost(f'--coreset={base}', f'--coreset_fraction={fraction}', f'--coreset_features={features}',
                           f'--seed={seed}', f'--out_dir={select}')
                summary = json.load(open(os.path.join(select, 'coreset.json')))
                scores.append(summary)
                losses.append(train(f'{method}-{fraction}', seed, updates, os.path.join(select, 'keep.npy'),
                                    '' if uniform else os.path.join(select, 'weights.npy')))
            summaries[(method, fraction)] = scores[0]
            rows.append((method, fraction, k, updates, losses, np.mean([s['E_kn'] for s in scores]),
                         np.mean([s['E_if'] for s in scores]), scores[0]['alpha']))
            print(f"{method} {fraction}: {' '.join(f'{l:.4f}' for l in losses)}", flush=True)
    full_updates = math.ceil(args.epochs * N / BATCH)
    full = [train('all', seed, full_updates) for seed in args.seeds]

    lines = [f"{args.epochs} epochs of each training set, from scratch; held-out SFT loss on all 300 examples of sft_val, "
             f"mean ± sample std over seeds {args.seeds}.", "",
             "| fraction | method | examples | updates | val loss | E_KN | E_IF | α |", "|---|---|---|---|---|---|---|---|"]
    std = lambda values: np.std(values, ddof=1) if len(values) > 1 else 0.0
    for method, fraction, k, updates, losses, e_kn, e_if, alpha in rows:
        lines.append(f"| {fraction:.0%} | {method} | {k} | {updates} | {np.mean(losses):.4f} ± {std(losses):.4f} | "
                     f"{e_kn:.3f} | {e_if:.3f} | {'' if alpha is None else f'{alpha:.3f}'} |")
    lines.append(f"| 100% | all data | {N} | {full_updates} | {np.mean(full):.4f} ± {std(full):.4f} | 0 | 0 | |")
    print('\n' + '\n'.join(lines))
    with open(out('table.md'), 'w') as f:  # data/demo/brief_table.md is a copy of the run docs/coresets.md shows
        f.write('\n'.join(lines) + '\n')

if __name__ == '__main__':
    main()
