"""
The headline experiment: SFT + DPO on the demo data with every strategy, measured.

    OMP_NUM_THREADS=1 python data/demo/tradeoff.py      # ~35 min on 2 CPU cores; then data/demo/plot_tradeoff.py

Per seed: SFT alone and DPO alone give each optimum f* (the lowest held-out loss any eval of that
run saw); then sequential SFT→DPO and DPO→SFT, mix, alright and maxright at λ ∈ {0.25, 0.5, 0.75}
(λ is always the weight of SFT), each with the same number of updates, the same seed and those f*
as optima. Then the one-stage baselines ORPO, CPO and SimPO, each alone at its own paper's β from the
same initial model, measured on the held-out SFT and DPO splits at the demo's DPO settings by an
eval_only run (see BASELINES). Every run is a plain `python bipost.py config/demo.py --key=value ...`
subprocess, waited for with os.wait4 so that its own peak RSS is measured. Writes data/demo/tradeoff.json (every
number, every trajectory) and prints the README table (--table: only print it, from the JSON). A run already finished in --out_root is
reused, so an interrupted experiment continues where it stopped. --methods=ORPO,CPO,SimPO runs only those
baselines and merges them into the existing --json (its f* and every other run kept).
"""
import argparse, json, math, os, shutil, statistics, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STRATEGIES = ('sequential SFT→DPO', 'sequential DPO→SFT', 'mix', 'alright', 'maxright')
# the one-stage baselines, each trained alone with its own β (the shared `beta` holds the demo's DPO β = 5):
# ORPO's λ = 0.1 and CPO's β = 0.1 with α = 1 are the papers' and TRL's defaults (ORPOConfig, CPOConfig); SimPO's
# β = 2, γ = 1 (γ/β = 0.5) is the SimPO paper's Llama-3-Base setting (TRL's simpo_gamma is that γ)
BASELINES = {'ORPO': ('orpo', ['--beta=0.1']), 'CPO': ('cpo', ['--beta=0.1', '--cpo_alpha=1.0']),
             'SimPO': ('simpo', ['--beta=2.0', '--simpo_gamma=1.0'])}
METHODS = STRATEGIES + tuple(BASELINES)

parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
parser.add_argument('--seeds', default='1337,1338,1339')
parser.add_argument('--lambdas', default='0.25,0.5,0.75', help='weights of SFT')
parser.add_argument('--methods', default=','.join(METHODS))
parser.add_argument('--max_iters', type=int, default=300, help='updates per run, the same for every run')
parser.add_argument('--eval_interval', type=int, default=50, help='updates between evals: the plotted trajectory')
parser.add_argument('--out_root', default=os.path.join(ROOT, 'out-tradeoff'))
parser.add_argument('--json', default=os.path.join(ROOT, 'data', 'demo', 'tradeoff.json'))
parser.add_argument('--fresh', action='store_true', help='rerun every run, even one finished in out_root')
parser.add_argument('--extra', default='', help='more bipost overrides for every run, e.g. "--beta=0.2 --learning_rate=5e-4"')
parser.add_argument('--table', action='store_true', help="print the README's table from --json and exit (no runs)")
args = parser.parse_args()


def markdown_table(rows):
    """The README's results table. ms per update stays in the JSON, not here: the seed streams run side by side on
    shared cores, so their times measure the machine's load (quiet timings are bipost_kernels/bench_step.py's job)."""
    pm = lambda row, key, digits=3: f"{row[key]:.{digits}f} ± {row[key + '_std']:.{digits}f}"
    ratio = lambda x: '' if x is None else f'{x:.2f}×'
    lines = ['| method | λ (SFT) | f_SFT | f_DPO | ideal distance | DPO acc | SFT steps | peak RSS MB | × seq |',
             '|---|---|---|---|---|---|---|---|---|']
    dash = lambda x, spec: '—' if x is None else f'{x:{spec}}'  # a baseline has no λ and no separate SFT steps
    lines += [f"| {row['method']} | {dash(row['lam'], 'g')} | {pm(row, 'sft')} | {pm(row, 'dpo')} | {pm(row, 'ideal')} | "
              f"{pm(row, 'dpo_acc', 2)} | {dash(row['sft_share'], '.0%')} | {row['peak_rss_mb']:.0f} | "
              f"{ratio(row['peak_rss_mb_ratio'])} |" for row in rows]
    return '\n' + '\n'.join(lines)


if args.table:
    with open(args.json) as f:
        print(markdown_table(json.load(f)['table']))
    sys.exit(0)
seeds = [int(s) for s in args.seeds.split(',')]
lambdas = [float(x) for x in args.lambdas.split(',')]
methods = args.methods.split(',')
if unknown := [m for m in methods if m not in METHODS]:
    sys.exit(f"tradeoff.py: --methods: unknown {unknown}; choose from {','.join(METHODS)}")
merge = all(m in BASELINES for m in methods)  # baselines only: the strategies' runs and f* come from --json
if merge and not os.path.exists(args.json):
    sys.exit(f"tradeoff.py: --methods={args.methods} adds baselines to {args.json}, which does not exist: run the "
             f"strategies first (python data/demo/tradeoff.py)")
common = ['config/demo.py', f'--max_iters={args.max_iters}', f'--eval_interval={args.eval_interval}',
          '--export_hf=False', '--always_save_checkpoint=False', '--log_interval=1'] + args.extra.split()


def launch(out_dir, overrides, label):
    """One bipost subprocess into a clean out_dir; returns (its command, wall seconds, peak RSS MB, metrics records)."""
    shutil.rmtree(out_dir, ignore_errors=True)  # bipost appends to metrics.jsonl: start clean
    os.makedirs(out_dir)
    command = [sys.executable, 'bipost.py', *overrides, f'--out_dir={out_dir}']
    print(f'[{time.strftime("%H:%M:%S")}] {label}', flush=True)
    started = time.time()
    with open(os.path.join(out_dir, 'stdout.log'), 'w') as log:
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: ru_maxrss is its peak RSS (KiB on Linux)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - started
    if child.returncode:
        sys.exit(f'run failed (exit {child.returncode}): {" ".join(command)}\n  see {out_dir}/stdout.log')
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return command, wall, usage.ru_maxrss / 1024, [json.loads(line) for line in f]


def bipost(name, seed, objectives, strategy, weights, optima, more=()):
    """One training run (or its saved result); returns its record."""
    out_dir = os.path.join(args.out_root, f'seed{seed}', name)
    done = os.path.join(out_dir, 'run.json')
    if os.path.exists(done) and not args.fresh:
        with open(done) as f:
            return json.load(f)
    command, wall, peak_rss_mb, records = launch(
        out_dir, [*common, f'--seed={seed}', f'--objectives={objectives}', f'--strategy={strategy}',
                  f'--weights={weights}', f'--optima={optima}', *more], f'seed {seed} {name}')
    evals = [r for r in records if 'val/sft/loss' in r or 'val/dpo/loss' in r]
    updates = [r for r in records if 'objective' in r]
    # an update that ran an eval first, and the very first update (warm-up of the allocator), are left out of ms
    timed = [r['ms'] for r in updates if (r['iter'] - 1) % args.eval_interval and r['iter'] > 1]
    record = {
        'name': name, 'seed': seed, 'objectives': objectives, 'strategy': strategy, 'weights': weights, 'optima': optima,
        'command': ' '.join(command[1:]), 'wall_s': wall, 'peak_rss_mb': peak_rss_mb,
        'ms_per_update': statistics.fmean(timed), 'updates': len(updates),
        'sft_share': statistics.fmean(r['objective'].split('+').count('sft') / len(r['objective'].split('+')) for r in updates),
        'trajectory': [{'iter': r['iter'], 'sft': r.get('val/sft/loss'), 'dpo': r.get('val/dpo/loss'),
                        'dpo_acc': r.get('val/dpo/rewards/accuracies'), 'ideal': r.get('val/ideal_distance')} for r in evals]}
    with open(done, 'w') as f:
        json.dump(record, f, indent=1)
    return record


def baseline(method, seed):
    """A one-stage baseline at seed: its objective alone for every update at its own β, from the seed's initial model
    (the strategies' start), then an eval_only run of its export on both held-out splits at the demo's DPO settings
    (β = 5, length-normalized) with that initial model as the reference: f_DPO means what it means in every row."""
    objective, own = BASELINES[method]
    initial = os.path.join(args.out_root, f'seed{seed}', 'initial')
    if not os.path.exists(os.path.join(initial, 'hf', 'model.safetensors')):
        # one update at lr 1e-30 moves no fp32 weight (it is far below any weight's rounding step): the export is the
        # seed's scratch model, the one every strategy starts from and uses as its DPO reference (its held-out losses
        # match their iter-0 evals to 1e-9)
        launch(initial, ['config/demo.py', *args.extra.split(), f'--seed={seed}', '--max_iters=1',
                         '--learning_rate=1e-30', '--min_lr=0.0', '--always_save_checkpoint=False'],
               f'seed {seed} initial model')
    record = bipost(method, seed, [objective], 'sequential', [1.0], [],
                    more=[*own, f'--init_from={initial}/hf', '--export_hf=True'])
    evaluated = os.path.join(args.out_root, f'seed{seed}', method, 'eval')
    done = os.path.join(evaluated, 'eval.json')
    if not os.path.exists(done) or args.fresh:
        command, *_, records = launch(evaluated, ['config/demo.py', *args.extra.split(), f'--seed={seed}',
                                                  '--eval_only=True', f'--init_from={os.path.dirname(evaluated)}/hf',
                                                  f'--reference_from={initial}/hf'], f'seed {seed} {method} eval')
        with open(done, 'w') as f:
            json.dump({'command': ' '.join(command[1:]), 'eval': records[-1]}, f, indent=1)
    with open(done) as f:
        measured = json.load(f)
    point = measured['eval']
    return dict(record, eval_command=measured['command'], sft_share=None,
                trajectory=[{'iter': args.max_iters, 'sft': point['val/sft/loss'], 'dpo': point['val/dpo/loss'],
                             'dpo_acc': point['val/dpo/rewards/accuracies']}])


def ideal(point, optimum):
    return math.hypot(point['sft'] - optimum['sft'], point['dpo'] - optimum['dpo'])


t_start = time.time()
if merge:  # the strategies' runs and each seed's f* as they are in --json; the same budget, or the rows don't compare
    with open(args.json) as f:
        previous = json.load(f)
    optimum = {int(s): o for s, o in previous['optima'].items()}
    setup = previous['setup']
    if common != setup['common_overrides'] or not set(seeds) <= set(optimum):
        sys.exit(f"tradeoff.py: {args.json} was measured with seeds {setup['seeds']} and {setup['common_overrides']}; "
                 f"the baselines need the same (--seeds, --max_iters, --eval_interval, --extra)")
    runs = [r for r in previous['runs'] if r['method'] not in methods]
else:
    runs, optimum = [], {}
    for seed in seeds:
        # trained on one objective, evaluated on both: sequential with all of the updates on it
        single = {n: bipost(f'{n} only', seed, ['sft', 'dpo'], 'sequential', [1.0, 0.0] if n == 'sft' else [0.0, 1.0],
                            [0.0, 0.0]) for n in ('sft', 'dpo')}
        optimum[seed] = {n: min(p[n] for p in single[n]['trajectory']) for n in ('sft', 'dpo')}
        runs += [dict(r, method=f'{n.upper()} only', lam=1.0 if n == 'sft' else 0.0) for n, r in single.items()]
    for lam in sorted(lambdas, key=lambda x: abs(x - 0.5)):  # λ = 0.5, the headline, first for every seed
        for seed in seeds:
            f_sft, f_dpo = optimum[seed]['sft'], optimum[seed]['dpo']
            for method in [m for m in methods if m in STRATEGIES]:
                if method == 'sequential DPO→SFT':  # DPO first: the order of `objectives` is the order of training
                    config = (['dpo', 'sft'], 'sequential', [1 - lam, lam], [f_dpo, f_sft])
                else:
                    config = (['sft', 'dpo'], method.split()[0], [lam, 1 - lam], [f_sft, f_dpo])
                name = f'{method.replace(" ", "_").replace("→", "-")}_lam{lam}'
                runs.append(dict(bipost(name, seed, *config), method=method, lam=lam))
for method in [m for m in methods if m in BASELINES]:
    for seed in seeds:
        runs.append(dict(baseline(method, seed), method=method, lam=None))
for r in runs:  # ideal distances with each seed's f*, recomputed here from the two losses (by name)
    for point in r['trajectory']:
        if point['sft'] is not None and point['dpo'] is not None:
            point['ideal'] = ideal(point, optimum[r['seed']])
    r['final'] = r['trajectory'][-1]


def mean_spread(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


rows = []
present = [m for m in ('SFT only', 'DPO only', *METHODS) if any(r['method'] == m for r in runs)]
for method in present:
    for lam in sorted({r['lam'] for r in runs if r['method'] == method}, key=lambda x: (x is None, x or 0)):
        group = [r for r in runs if r['method'] == method and r['lam'] == lam]
        # a baseline (no λ) against the headline's sequential recipe, λ = 0.5
        baseline_runs = [r for r in runs if r['method'] == 'sequential SFT→DPO' and r['lam'] == (0.5 if lam is None else lam)]
        row = {'method': method, 'lam': lam, 'seeds': len(group)}
        for key in ('sft', 'dpo', 'ideal', 'dpo_acc'):
            row[key], row[key + '_std'] = mean_spread([r['final'][key] for r in group])
        for key in ('ms_per_update', 'peak_rss_mb', 'sft_share'):
            row[key] = None if any(r[key] is None for r in group) else statistics.fmean(r[key] for r in group)
        for key in ('ms_per_update', 'peak_rss_mb'):  # per seed against the sequential run just before it, then the
            # median over seeds: a shared machine's load drifts over the hour, much less over minutes
            base = {r['seed']: r[key] for r in baseline_runs}
            row[key + '_ratio'] = statistics.median(r[key] / base[r['seed']] for r in group) if baseline_runs else None
        rows.append(row)
wall = sum(r['wall_s'] for r in runs)
if not merge:
    setup = {'seeds': seeds, 'lambdas': lambdas, 'max_iters': args.max_iters, 'eval_interval': args.eval_interval,
             'common_overrides': common, 'omp_num_threads': os.environ.get('OMP_NUM_THREADS')}
setup.update(methods=[m for m in METHODS if m in present], runs_wall_s=wall)
if any(m in BASELINES for m in methods):
    setup['baselines_omp_num_threads'] = os.environ.get('OMP_NUM_THREADS')
with open(args.json, 'w') as f:
    json.dump({'setup': setup, 'optima': {str(s): o for s, o in optimum.items()}, 'table': rows, 'runs': runs}, f, indent=1)

print(f"\nf* (mean over {len(seeds)} seeds): SFT {statistics.fmean(o['sft'] for o in optimum.values()):.3f}, "
      f"DPO {statistics.fmean(o['dpo'] for o in optimum.values()):.3f}")
print(markdown_table(rows))
print(f"\n{len(runs)} runs, {wall / 60:.1f} min of training subprocesses ({(time.time() - t_start) / 60:.1f} min this call); "
      f"wrote {os.path.relpath(args.json, ROOT)}")
