"""
The trade-off plot of data/demo/tradeoff.json: held-out f_DPO against f_SFT.

    python data/demo/plot_tradeoff.py     # writes data/demo/tradeoff.png; needs matplotlib (pip install matplotlib)

One trajectory per method at λ = 0.5 (the mean over seeds at every eval, a dot per eval; the bars on
the final point are ± one standard deviation over seeds), a faint dashed line through each method's
final points at every λ, the single-objective runs in grey, the one-stage baselines (ORPO, CPO, SimPO: final
points only, ± one standard deviation) as diamonds, and the ideal point (f*_SFT, f*_DPO).
"""
import json, os, statistics, sys

try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("plot_tradeoff.py needs matplotlib, an optional extra not in requirements.txt: pip install matplotlib")

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = {'sequential SFT→DPO': 'tab:red', 'sequential DPO→SFT': 'tab:orange', 'mix': 'tab:purple',
          'alright': 'tab:blue', 'maxright': 'tab:green', 'SFT only': '0.45', 'DPO only': '0.45'}
BASELINES = {'ORPO': 'tab:brown', 'CPO': 'tab:pink', 'SimPO': 'tab:olive'}

with open(os.path.join(HERE, 'tradeoff.json')) as f:
    result = json.load(f)
runs, table = result['runs'], result['table']


def mean_trajectory(method, lam):
    group = [r['trajectory'] for r in runs if r['method'] == method and r['lam'] == lam]
    return [(statistics.fmean(t[i]['sft'] for t in group), statistics.fmean(t[i]['dpo'] for t in group))
            for i in range(min(map(len, group)))]


fig, ax = plt.subplots(figsize=(8, 6))
for method, color in COLORS.items():
    single = method.endswith('only')
    lam = 1.0 if method == 'SFT only' else 0.0 if method == 'DPO only' else 0.5
    if not any(r['method'] == method for r in runs):
        continue
    x, y = zip(*mean_trajectory(method, lam))
    ax.plot(x, y, '-', color=color, lw=1 if single else 1.8, alpha=0.6 if single else 0.9, marker='.', ms=4,
            label=method if single else f'{method} (λ = 0.5)')
    row = next(r for r in table if r['method'] == method and r['lam'] == lam)
    ax.errorbar(row['sft'], row['dpo'], xerr=row['sft_std'], yerr=row['dpo_std'], fmt='o', color=color, ms=7,
                capsize=3, zorder=5)
    if not single:  # the same method's final points at every λ
        finals = sorted((r['lam'], r['sft'], r['dpo']) for r in table if r['method'] == method)
        ax.plot([p[1] for p in finals], [p[2] for p in finals], '--', color=color, lw=1, alpha=0.35)
        for l, sx, dy in finals:
            if l != 0.5:
                ax.plot(sx, dy, 'o', color=color, ms=4, alpha=0.35)
for method, color in BASELINES.items():  # trained alone at their papers' β, evaluated at the demo's DPO settings
    row = next((r for r in table if r['method'] == method), None)
    if row:
        ax.errorbar(row['sft'], row['dpo'], xerr=row['sft_std'], yerr=row['dpo_std'], fmt='D', color=color, ms=6,
                    capsize=3, zorder=5, label=f'{method} (baseline)')
x0, y0 = mean_trajectory('SFT only', 1.0)[0]
ax.plot(x0, y0, 's', color='black', ms=7, label='initial model')
optima = result['optima'].values()
ax.plot(statistics.fmean(o['sft'] for o in optima), statistics.fmean(o['dpo'] for o in optima), '*', color='gold',
        mec='black', ms=16, zorder=6, label='ideal point (f*_SFT, f*_DPO)')
ax.set_xlabel('held-out SFT loss f_SFT (nats per response token)')
ax.set_ylabel('held-out DPO loss f_DPO')
setup = result['setup']
ax.set_title(f"SFT + DPO on the demo: {setup['max_iters']} updates, {len(setup['seeds'])} seeds\n"
             "lines: λ = 0.5 trajectories (mean over seeds); faint: final points at λ = " +
             ', '.join(f'{l:g}' for l in setup['lambdas']), fontsize=10)
ax.set_xlim(left=0)
ax.set_ylim(bottom=0)
ax.grid(alpha=0.3)
ax.legend(fontsize=8, loc='upper right')
fig.tight_layout()
fig.savefig(os.path.join(HERE, 'tradeoff.png'), dpi=120)
print(f"wrote {os.path.join(HERE, 'tradeoff.png')}")
