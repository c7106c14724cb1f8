"""Does pairing speed up training? Plain EDM, in-batch assignment (Immiscible Diffusion), AOT's pool
of 512 and nearest-of-K noise (Improved Immiscible Diffusion) on the bundled digits, conditional and
unconditional, with the same budget, seeds and schedule (docs/training-speed.md).

`train` runs train.py for every configuration, one after the other, each in a folder of its own
under --outdir; a re-run continues every unfinished run from its newest state (Ctrl-C saves it), so
the study spreads over sittings. Pools are built in the training process (--workers=0): the
pairing's cost is in each run's seconds per kimg (and its share in aot_wait).
`eval` measures every snapshot at a multiple of --every kimg not measured yet (results in
OUTDIR/eval.json): FD-digits of
--fd-seeds samples (Heun at 11 and 35 NFE, rounded to uint8), the truncation error at 11 and 35 NFE
against the network's own --ref-steps Heun solution (tools/trajectory.py), and for conditional
networks how often the digit classifier gives a sample the class it was asked for. The classifier
is trained once (bench/digits_fd.py) and kept in OUTDIR/classifier.pt, so every sitting measures
in the same feature space.
`report` writes tables and plots against kimg and against training time (kimg times the run's
median seconds per kimg). `shift` measures, on
pools alone, how far each coupling's noise leans towards its images (norm and projection).

    python bench/training_speed_study.py train --data=datasets/uci-digits-16x16.zip --outdir=study/speed
    python bench/training_speed_study.py eval --data=datasets/uci-digits-16x16.zip --outdir=study/speed
    python bench/training_speed_study.py report --outdir=study/speed --out=docs/figures/training-speed
    python bench/training_speed_study.py shift --data=datasets/uci-digits-16x16.zip
"""

import glob
import json
import os
import re
import subprocess
import sys
import warnings

import click
import numpy as np
import scipy.linalg
import torch

import dnnlib
from bench.digits_fd import DigitClassifier, frechet, load_digits, quantize, train_classifier
from bench.fewstep_study import names_list
from bench.report import provenance
from sampling.edm import edm_sampler
from sampling.seeds import latents_for_seeds
from tools.trajectory import analyze, heun_steps, parse_int_list, pyplot
from training.network_io import load_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The couplings compared: train.py flags. --aot=64 is the per-GPU batch: in-batch assignment.
COUPLINGS = {'edm': ['--aot=0'], 'in-batch': ['--aot=64'], 'aot-512': ['--aot=512'],
             'nearest-4': ['--nearest-of=4'], 'nearest-16': ['--nearest-of=16']}
SEEDS = {'edm': [0, 1], 'in-batch': [0, 1], 'aot-512': [0, 1], 'nearest-4': [0, 1], 'nearest-16': [0]}
# docs/aot-study.md's network and schedule; a snapshot every --tick kimg.
COMMON = ['--arch=ddpmpp', '--cbase=16', '--cres=1,2', '--batch=64', '--augment=0', '--dropout=0', '--lr-rampup=2',
          '--snap=1', '--dump=1000', '--grid=16', '--workers=0', '--nosubdir']
NFES = (11, 35)

def run_name(coupling, cond, seed):
    return f'{coupling}-{"cond" if cond else "uncond"}-s{seed}'

def parse_run_name(name):
    m = re.fullmatch(r'(.+)-(cond|uncond)-s(\d+)', name)
    return (m.group(1), m.group(2) == 'cond', int(m.group(3))) if m else None

def planned_runs(couplings, conds, seeds=None):
    """Seed 0 of everything first: a study cut short still compares every coupling."""
    runs = [(c, cond, s) for cond in conds for c in couplings for s in (seeds or SEEDS[c])]
    return sorted(runs, key=lambda r: r[2])

def atomic_json(path, obj):
    with dnnlib.util.atomic_write(path) as tmp:
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1)

@click.group()
def cli():
    """Training-speed study of the noise couplings (docs/training-speed.md)."""

#----------------------------------------------------------------------------

@cli.command()
@click.option('--data', help='Labelled digits dataset', metavar='ZIP|DIR', required=True)
@click.option('--outdir', help='Study folder: one run folder per configuration', metavar='DIR', required=True)
@click.option('--kimg', help='Training budget of every run', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=120, show_default=True)
@click.option('--tick', help='kimg between ticks, each with a snapshot', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=10, show_default=True)
@click.option('--couplings', help='Couplings to train', metavar='LIST', default=','.join(COUPLINGS), show_default=True)
@click.option('--cond', 'conds', help='Conditional, unconditional or both', metavar='LIST', default='0,1', show_default=True)
@click.option('--seeds', help='Training seeds of every coupling  [default: 0,1; nearest-16: 0]', metavar='LIST')
@click.option('--extra', help='More train.py flags for every run (e.g. the tiny sizes of a test)', metavar='STR', default='')
def train(data, outdir, kimg, tick, couplings, conds, seeds, extra):
    """Train (or continue) every run of the study, one after the other."""
    seeds = parse_int_list(seeds, 'seed') if seeds else None
    runs = planned_runs(names_list(couplings, COUPLINGS, '--couplings'), [bool(int(c)) for c in conds.split(',')], seeds)
    for i, (coupling, cond, seed) in enumerate(runs):
        folder = os.path.join(outdir, run_name(coupling, cond, seed))
        print(f'[{i + 1}/{len(runs)}] {folder}', flush=True)
        cmd = [sys.executable, os.path.join(ROOT, 'train.py'), f'--outdir={folder}', f'--data={data}', f'--cond={int(cond)}',
               f'--seed={seed}', f'--duration={kimg / 1000:g}', f'--tick={tick:g}', *COMMON, *COUPLINGS[coupling], *extra.split()]
        code = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))).returncode
        if code != 0: # 75: stopped by a signal, its state saved; a re-run continues
            sys.exit(code)

#----------------------------------------------------------------------------

def classifier_for(outdir, data):
    """The digit classifier of this study: trained once and kept, so every sitting measures alike."""
    path = os.path.join(outdir, 'classifier.pt')
    images, labels = load_digits(data)
    if os.path.isfile(path):
        saved = torch.load(path, weights_only=True)
        net = DigitClassifier(images.shape[1], images.shape[2], int(labels.max()) + 1)
        net.load_state_dict(saved['state'])
        return net.eval().requires_grad_(False), saved['accuracy'], images, labels
    with torch.enable_grad():
        net, accuracy, _ = train_classifier(images, labels)
    with dnnlib.util.atomic_write(path) as tmp:
        torch.save(dict(state=net.state_dict(), accuracy=accuracy), tmp)
    return net, accuracy, images, labels

def measure(net, classifier, real_feat, fd_seeds, error_seeds, ref_steps, batch):
    """FD-digits and class accuracy at NFES (Heun, rho 7), truncation errors at NFES."""
    out = {}
    for nfe in NFES:
        samples, asked = [], []
        for start in range(0, len(fd_seeds), batch):
            latents, class_labels, _ = latents_for_seeds(net, fd_seeds[start:start + batch])
            samples.append(quantize(edm_sampler(net, latents, class_labels, num_steps=heun_steps(nfe))))
            asked.append(None if class_labels is None else class_labels.argmax(dim=1))
        samples = torch.cat(samples)
        out[f'fd{nfe}'] = frechet(classifier.features(samples), real_feat)
        if net.label_dim:
            out[f'class{nfe}'] = (classifier(samples).argmax(dim=1) == torch.cat(asked)).float().mean().item()
    traj = analyze(net, error_seeds, list(NFES), ref_steps=ref_steps, batch=batch, progress=False)
    out.update({f'error{r["nfe"]}': r['error']['mean'] for r in traj['runs']})
    return out

@cli.command(name='eval')
@click.option('--data', help='Labelled digits dataset (the training data)', metavar='ZIP|DIR', required=True)
@click.option('--outdir', help='Study folder', metavar='DIR', required=True)
@click.option('--fd-seeds', help='Seeds of FD-digits (the second draw of docs/aot-study.md)', metavar='LIST', default='500-999', show_default=True)
@click.option('--error-seeds', help='Seeds of the truncation errors', metavar='LIST', default='0-31', show_default=True)
@click.option('--ref-steps', help='Heun steps of the reference solution', type=click.IntRange(min=18), default=256, show_default=True)
@click.option('--batch', help='Images per sampler call', type=click.IntRange(min=1), default=250, show_default=True)
@click.option('--every', help='Measure the snapshots at multiples of this many kimg', metavar='KIMG', type=click.IntRange(min=1), default=20, show_default=True)
@torch.no_grad()
def evaluate(data, outdir, fd_seeds, error_seeds, ref_steps, batch, every):
    """Measure every snapshot of the study not measured yet."""
    warnings.filterwarnings('ignore', category=scipy.linalg.LinAlgWarning)
    fd_seeds, error_seeds = parse_int_list(fd_seeds, 'seed'), parse_int_list(error_seeds, 'seed')
    classifier, accuracy, images, _ = classifier_for(outdir, data)
    real_feat = classifier.features(images)
    path = os.path.join(outdir, 'eval.json')
    results = json.load(open(path)) if os.path.isfile(path) else {}
    settings = dict(fd_seeds=len(fd_seeds), error_seeds=len(error_seeds), ref_steps=ref_steps, classifier_accuracy=accuracy)
    if results.get('settings', settings) != settings:
        raise click.ClickException(f'{path} was measured with {results["settings"]}, this is {settings}; use those options or another --outdir')
    results['settings'] = settings
    runs = results.setdefault('runs', {})
    for folder in sorted(glob.glob(os.path.join(outdir, '*', 'network-snapshot-*.pkl'))):
        name = os.path.basename(os.path.dirname(folder))
        kimg = int(re.search(r'(\d+)\.pkl$', folder).group(1))
        if parse_run_name(name) is None or kimg % every or str(kimg) in runs.get(name, {}):
            continue
        print(f'{name} {kimg} kimg', flush=True)
        row = measure(load_network(folder, verbose=False), classifier, real_feat, fd_seeds, error_seeds, ref_steps, batch)
        runs.setdefault(name, {})[str(kimg)] = dict(row, provenance=provenance())
        atomic_json(path, results) # after each snapshot: an interrupted eval loses at most one
    print(f'{sum(len(r) for r in runs.values())} snapshots measured in {path}')

#----------------------------------------------------------------------------

@cli.command()
@click.option('--data', help='Dataset', metavar='ZIP|DIR', required=True)
@click.option('--pools', help='Pools of --batch images per coupling', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--batch', help='Images per step (per-GPU batch; in-batch pools and nearest-of pools have this size)', type=click.IntRange(min=1), default=64, show_default=True)
@torch.no_grad()
def shift(data, pools, batch):
    """How each coupling's noise leans towards its images, measured on pools without training."""
    from training.dataset import ImageFolderDataset
    from training.pools import PoolStream
    print(f'{data}, {pools} x {batch} images per coupling, no augmentation: means over pools')
    print('| coupling | labels | image-noise distance before -> after | noise norm / sqrt(D) | projection on the image |')
    print('|---|---|---|---:|---:|')
    for cond in (False, True):
        dataset = ImageFolderDataset(data, use_labels=cond)
        for coupling, flags in COUPLINGS.items():
            aot_pool = next((int(f.split('=')[1]) for f in flags if f.startswith('--aot=')), 0)
            nearest = next((int(f.split('=')[1]) for f in flags if f.startswith('--nearest-of=')), 0)
            size = aot_pool or batch
            stream = PoolStream(dataset, size, seed=0, pair=aot_pool > 0, nearest_of=nearest)
            stats = [stream.make_pool(k)['stats'] for k in range(max(pools * batch // size, 1))]
            m = {key: float(np.mean([float(s[key]) for s in stats])) for key in stats[0]}
            print(f'| {coupling} | {"classes" if cond else "none"} | {m["cost_before"]:.3f} -> {m["cost_after"]:.3f} '
                  f'({1 - m["cost_after"] / m["cost_before"]:.1%}) | {m["noise_norm"]:.4f} | {m["noise_proj"]:.3f} |')

#----------------------------------------------------------------------------

def training_log(folder):
    """Per tick of a run: kimg, seconds per kimg, pool-building share, and the coupling's statistics."""
    ticks = [json.loads(line) for line in open(os.path.join(folder, 'stats.jsonl'))]
    mean = lambda t, key: t[key]['mean'] if key in t else float('nan')
    return [dict(kimg=mean(t, 'Progress/kimg'), sec_per_kimg=mean(t, 'Timing/sec_per_kimg'), wait=mean(t, 'Timing/aot_wait_frac'),
                 **{k: mean(t, f'AOT/{k}') for k in ('cost_before', 'cost_after', 'noise_norm', 'noise_proj')})
            for t in ticks]

def sec_per_kimg(log):
    """The run's median over its ticks after the first (start-up): a paused process or a tick slowed
    by other work on a shared machine moves the median little, where summed tick times take it all."""
    return float(np.nanmedian([t['sec_per_kimg'] for t in log[1:]] or [float('nan')]))

def curves(outdir, results):
    """{(coupling, cond): {seed: [(kimg, hours, metrics)]}} of the measured snapshots; hours are kimg
    times the run's median seconds per kimg."""
    out = {}
    for name, snaps in results['runs'].items():
        coupling, cond, seed = parse_run_name(name)
        cost = sec_per_kimg(training_log(os.path.join(outdir, name)))
        rows = [(int(kimg), int(kimg) * cost / 3600, metrics) for kimg, metrics in sorted(snaps.items(), key=lambda kv: int(kv[0]))]
        out.setdefault((coupling, cond), {})[seed] = rows
    return out

def seed_mean(runs, key):
    """(kimg, hours, mean over seeds) at the snapshots every seed has."""
    common = sorted(set.intersection(*({k for k, _, _ in rows} for rows in runs.values())))
    pick = lambda rows, k: next(r for r in rows if r[0] == k)
    return [(k, np.mean([pick(rows, k)[1] for rows in runs.values()]), np.mean([pick(rows, k)[2][key] for rows in runs.values()])) for k in common]

METRICS = {'fd35': ('FD-digits, Heun 35 NFE', 'low'), 'fd11': ('FD-digits, Heun 11 NFE', 'low'),
           'error11': ('truncation error, 11 NFE', 'low'), 'error35': ('truncation error, 35 NFE', 'low'),
           'class35': ('asked class kept, 35 NFE', 'high')}

def first_reaching(points, target, better):
    for kimg, _, value in points:
        if (value <= target) if better == 'low' else (value >= target):
            return kimg
    return None

@cli.command()
@click.option('--outdir', help='Study folder (eval.json and the runs)', metavar='DIR', required=True)
@click.option('--out', help='Output prefix: PREFIX.md, PREFIX-kimg.png, PREFIX-time.png', metavar='PATH', required=True)
def report(outdir, out):
    """Tables and plots of the measured snapshots."""
    results = json.load(open(os.path.join(outdir, 'eval.json')))
    data = curves(outdir, results)
    lines = [f'Classifier held-out accuracy {results["settings"]["classifier_accuracy"]:.3f}; {results["settings"]}', '']
    for cond in (False, True):
        groups = {c: data[(c, cond)] for c in COUPLINGS if (c, cond) in data}
        if 'edm' not in groups:
            continue
        keys = [k for k in METRICS if cond or not k.startswith('class')]
        lines += [f'### {"Conditional" if cond else "Unconditional"}', '',
                  '| coupling | seeds | last kimg | ' + ' | '.join(METRICS[k][0] for k in keys) + ' | kimg to reach EDM\'s last FD-digits (35 NFE) | s/kimg | pool share | distance gain | noise norm | projection |',
                  '|---|---:|---:|' + '---:|' * len(keys) + '---:|---:|---:|---:|---:|---:|']
        edm_final = seed_mean(groups['edm'], 'fd35')[-1]
        for coupling, runs in groups.items():
            finals = {k: seed_mean(runs, k)[-1] for k in keys}
            reach = first_reaching(seed_mean(runs, 'fd35'), edm_final[2], 'low')
            logs = [t for seed in runs for t in training_log(os.path.join(outdir, run_name(coupling, cond, seed)))[1:]] # tick 0: start-up
            med = lambda key: float(np.nanmedian([t[key] for t in logs])) if logs else float('nan')
            gain = 1 - med('cost_after') / med('cost_before')
            lines.append(f'| {coupling} | {len(runs)} | {finals[keys[0]][0]} | ' + ' | '.join(f'{finals[k][2]:.4g}' for k in keys)
                         + f' | {reach if reach is not None else "not reached"} | {med("sec_per_kimg"):.1f} | {med("wait"):.1%} | {gain:.1%} | {med("noise_norm"):.4f} | {med("noise_proj"):.3f} |')
        lines.append('')
    with open(out + '.md', 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))
    plt = pyplot()
    for axis, label in (('kimg', 'training images (kimg)'), ('time', 'training time (hours, this machine)')):
        fig, axes = plt.subplots(2, len(METRICS), figsize=(4 * len(METRICS), 7), squeeze=False)
        for row, cond in enumerate((False, True)):
            for col, (key, (title, _)) in enumerate(METRICS.items()):
                ax = axes[row, col]
                for i, coupling in enumerate(COUPLINGS):
                    if (coupling, cond) in data and all(key in m for rows in data[(coupling, cond)].values() for _, _, m in rows):
                        pts = seed_mean(data[(coupling, cond)], key)
                        ax.plot([p[0] if axis == 'kimg' else p[1] for p in pts], [p[2] for p in pts], marker='o', ms=3,
                                color=plt.cm.tab10(i), label=coupling)
                ax.set_title(f'{"cond" if cond else "uncond"}: {title}', fontsize=9)
                ax.set_xlabel(label, fontsize=8)
                if key != 'class35' and ax.lines and min(min(line.get_ydata()) for line in ax.lines) > 0:
                    ax.set_yscale('log')
                ax.grid(alpha=0.3)
        next((ax for ax in axes.flat if ax.lines), axes[0, 0]).legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f'{out}-{axis}.png', dpi=100)
        plt.close(fig)
    print(f'Wrote {out}.md, {out}-kimg.png, {out}-time.png')

if __name__ == '__main__':
    cli()
