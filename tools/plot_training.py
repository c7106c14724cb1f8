"""Plot training curves from the stats.jsonl of one or more runs, e.g. EDM against EDM-AOT.

    python tools/plot_training.py --run=runs/00000-... --run=runs/00001-... --out=curves.png
"""

import json
import os

import click

DEFAULT_KEYS = ['Loss/loss', 'Timing/sec_per_kimg', 'Timing/aot_wait_frac']

def read_stats(run_dir):
    """kimg and per-tick means of every statistic in run_dir/stats.jsonl, without tick 0.

    Tick 0 of a fresh run is a single step (its timings include start-up), so it is left out. A
    resumed run starts at the tick it resumed from: its first row is a full tick and is kept."""
    path = os.path.join(run_dir, 'stats.jsonl')
    if not os.path.isfile(path):
        raise click.ClickException(f'{path} not found; --run takes a training run directory')
    rows = []
    with open(path) as f:
        for num, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise click.ClickException(f'{path}, line {num}: not JSON; is the file damaged?')
    if not rows:
        raise click.ClickException(f'{path} is empty: the run has not finished a tick yet')
    rows = [row for row in rows if row.get('Progress/tick', {}).get('mean', 1) != 0] or rows[-1:]
    kimg = [row['Progress/kimg']['mean'] for row in rows]
    keys = [key for key, value in rows[-1].items() if isinstance(value, dict)] # skips 'timestamp'
    return kimg, {key: [row[key]['mean'] if key in row else float('nan') for row in rows] for key in keys}

@click.command()
@click.option('--run', 'runs', help='Training run directory (repeat to compare runs)', metavar='DIR', multiple=True, required=True)
@click.option('--out', help='Output PNG', metavar='PNG', required=True)
@click.option('--key', 'keys', help='Statistic to plot (repeatable)  [default: loss, sec/kimg, AOT wait]', metavar='NAME', multiple=True)
def main(runs, out, keys):
    """Plot per-tick training statistics (stats.jsonl) against kimg, one panel per statistic."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    keys = list(keys) or DEFAULT_KEYS
    data = {run: read_stats(run) for run in runs}
    for key in keys:
        if not any(key in stats for _, stats in data.values()):
            raise click.ClickException(f'No run has statistic {key!r}; see the keys in stats.jsonl')
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for run, (kimg, stats) in data.items():
            if key in stats:
                ax.plot(kimg, stats[key], label=os.path.basename(os.path.normpath(run)))
        ax.set_xlabel('kimg')
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f'Saved the plot of {", ".join(keys)} for {len(runs)} run(s) to {os.path.abspath(out)}')

if __name__ == '__main__':
    main()
