"""
Measures the bilevel data selector on the demo (docs/data-selection.md): 25% of sft_noisy_train is corrupted
(sft_noisy_train_corrupt.npy knows which; training never sees that file).

    python data/demo/selection_eval.py                 # ~11 min on 2 CPU cores; prints markdown tables
    python data/demo/selection_eval.py --seeds 1337    # one training seed, ~5 min

1. Selection (config/select_demo.py), once per lower_level variant: AUC of the weights for "clean above
   corrupted" (1.0 = every corrupted example ranked below every clean one, 0.5 = chance) and the precision of the
   bottom 25% of the ranking (the fraction of it that is corrupted; 0.25 = chance, 1.0 = perfect).
2. Training (config/select_train.py), SFT only, the same number of updates for each training set: the kept 80%
   (lower_level='copy'), all examples, a random subset of the same size, and (a bound) exactly the clean examples.
   Reported: the held-out SFT loss on the whole of sft_val at the end, per seed.
Runs are sequential subprocesses of bipost.py, with OMP_NUM_THREADS=1 unless set (2 shared cores: more threads
make torch slower here, not faster).
"""
import os, sys, json, argparse, subprocess
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, 'data', 'demo')


def bipost(*args):
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')}
    run = subprocess.run([sys.executable, 'bipost.py', *args, '--overwrite=True'], cwd=ROOT, env=env,  # a rerun starts over
                         capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"bipost.py {' '.join(args)} failed:\n{run.stderr[-3000:]}")


def final_val_loss(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if 'val/sft/loss' in r][-1]['val/sft/loss']


def auc(weights, corrupt):
    """P(a clean example outranks a corrupted one), ties count half."""
    clean, bad = weights[~corrupt][:, None], weights[corrupt][None, :]
    return float(((clean > bad) + 0.5 * (clean == bad)).mean())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out_dir', default=os.path.join(ROOT, 'out-selection-eval'))
    parser.add_argument('--seeds', type=int, nargs='+', default=[1337, 1, 2])
    parser.add_argument('--variants', nargs='+', default=['copy', 'reference', 'none'])
    args = parser.parse_args()
    corrupt = np.load(os.path.join(DEMO, 'sft_noisy_train_corrupt.npy'))
    print(f"| lower_level (θ̂) | AUC | precision of bottom 25% |\n|---|---|---|")
    for variant in args.variants:
        out = os.path.join(args.out_dir, f'select-{variant}')
        bipost('config/select_demo.py', f'--out_dir={out}', f"--lower_level='{variant}'")
        weights, ranking = np.load(os.path.join(out, 'weights.npy')), np.load(os.path.join(out, 'ranking.npy'))
        bottom = ranking[-int(0.25 * len(ranking)):]
        print(f"| {variant} | {auc(weights, corrupt):.3f} | {corrupt[bottom].mean():.3f} |", flush=True)

    keep = np.load(os.path.join(args.out_dir, f'select-{args.variants[0]}', 'keep.npy'))
    random_keep = np.sort(np.random.default_rng(0).choice(len(corrupt), len(keep), replace=False))
    sets = {f'kept by the selector ({args.variants[0]})': keep, 'all': None, 'random subset, same size': random_keep,
            'exactly the clean examples (bound)': np.flatnonzero(~corrupt)}
    print(f"\n| trained on | examples | corrupted | " + " | ".join(f"val loss, seed {s}" for s in args.seeds)
          + " | mean |\n|---|---|---|" + "---|" * (len(args.seeds) + 1))
    for i, (name, ids) in enumerate(sets.items()):
        keep_list = ''
        if ids is not None:
            keep_list = os.path.join(args.out_dir, f'keep-{i}.npy')
            np.save(keep_list, ids)
        ids = np.arange(len(corrupt)) if ids is None else ids
        losses = []
        for seed in args.seeds:
            out = os.path.join(args.out_dir, f'train-{i}-seed{seed}')
            bipost('config/select_train.py', f'--out_dir={out}', f"--keep_list='{keep_list}'", f'--seed={seed}')
            losses.append(final_val_loss(out))
        print(f"| {name} | {len(ids)} | {corrupt[ids].mean():.1%} | " + " | ".join(f"{l:.4f}" for l in losses)
              + f" | {np.mean(losses):.4f} |", flush=True)


if __name__ == '__main__':
    main()
