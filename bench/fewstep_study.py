"""Few-step sampling study: every solver of training/solvers.py on every kind of noise levels, with
and without AFS, at small NFE, on each --network, against EDM's Heun.

For each network and configuration (solver, levels, AFS, NFE):
- truncation error: RMS over pixels of (result - 511-NFE solution) from the same latents (seeds
  --error-seeds), mean over seeds. The few-step solvers end at sigma_min, as does their reference
  (iPNDM on 512 EDM levels); Heun ends at 0, as does its reference (Heun, 256 steps);
- FD-digits (bench/digits_fd.py's classifier features, --fd-seeds samples rounded to uint8) for each
  solver on the levels with the lowest error at that NFE, and for Heun at 35 NFE (rho 7, EDM's
  setting) and at 27/35 NFE with the paper's rho 90; a second seed draw (--fd-seeds2) for the
  headline rows;
- the fewest NFE at which a configuration comes within 10% of Heun's FD-digits at 35 NFE.

    python bench/fewstep_study.py --data=datasets/uci-digits-16x16.zip --network=EDM.pkl --name=EDM \\
        --network=AOT.pkl --name=AOT --out=out/fewstep/study

Writes PREFIX.json, PREFIX.md (tables) and PREFIX-error.png, PREFIX-fd.png.
"""

import json
import os
import sys
import warnings

import click
import numpy as np
import scipy.linalg
import torch
import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.digits_fd import frechet, load_digits, train_classifier
from training import sampling, solvers
from training.images import to_uint8
from training.network_io import load_network
from tools.trajectory import parse_int_list, pyplot

LEVELS = {'edm': dict(disc='edm', rho=7), 'logsnr': dict(disc='logsnr'), 'time-uniform': dict(disc='time-uniform', rho=1)}

def levels_for(solver, nfe, afs):
    """Number of noise levels giving exactly `nfe` evaluations, or None when impossible."""
    for num in range(2, 200):
        if solvers.nfe(solver, num, afs) == nfe:
            try:
                solvers.check_solver(solver, torch.zeros(num), afs=afs)
            except ValueError:
                return None
            return num
        if solvers.nfe(solver, num, afs) > nfe:
            return None

def run_solver(net, seeds, solver, sigmas, afs, batch):
    out = []
    for i in range(0, len(seeds), batch):
        latents, labels, _ = sampling.latents_for_seeds(net, seeds[i:i + batch])
        out.append(solvers.sample(net, latents, labels, solver=solver, sigmas=sigmas, afs=afs).float())
    return torch.cat(out)

def run_heun(net, seeds, nfe, rho, batch):
    out = []
    for i in range(0, len(seeds), batch):
        latents, labels, _ = sampling.latents_for_seeds(net, seeds[i:i + batch])
        out.append(sampling.edm_sampler(net, latents, labels, num_steps=(nfe + 1) // 2, rho=rho).float())
    return torch.cat(out)

def rms_error(x, ref):
    return (x - ref).flatten(1).pow(2).mean(dim=1).sqrt().mean().item()

def as_measured(x):
    # Rounded to uint8 as generate.py writes images, back to [-1, 1].
    return torch.as_tensor(to_uint8(x)).permute(0, 3, 1, 2).float() / 127.5 - 1

@click.command()
@click.option('--data', help='Labelled digits dataset', metavar='ZIP|DIR', required=True)
@click.option('--network', 'networks', help='Network snapshot; repeat', metavar='PATH', multiple=True, required=True)
@click.option('--name', 'names', help='Label of each --network', metavar='STR', multiple=True, required=True)
@click.option('--nfe', help='NFE budgets of the few-step solvers', metavar='LIST', default='4,5,6,7,8,10,12,15', show_default=True)
@click.option('--heun-nfe', help='NFE budgets of Heun (odd)', metavar='LIST', default='7,9,11,15,19,27,35', show_default=True)
@click.option('--error-seeds', help='Seeds of the truncation error', metavar='LIST', default='0-63', show_default=True)
@click.option('--fd-seeds', help='Seeds of FD-digits', metavar='LIST', default='0-499', show_default=True)
@click.option('--fd-seeds2', help='Second seed draw for the headline rows', metavar='LIST', default='500-999', show_default=True)
@click.option('--batch', help='Images per sampler call', type=int, default=250, show_default=True)
@click.option('--out', help='Output prefix', metavar='PATH', required=True)
@torch.no_grad()
def main(data, networks, names, nfe, heun_nfe, error_seeds, fd_seeds, fd_seeds2, batch, out):
    """Few-step solvers x noise levels x AFS on each network: truncation error and FD-digits."""
    if len(names) != len(networks):
        raise click.BadParameter('give one --name per --network', param_hint='--name')
    nfes, heun_nfes = parse_int_list(nfe, 'NFE'), parse_int_list(heun_nfe, 'NFE')
    error_seeds, fd_seeds, fd_seeds2 = [parse_int_list(s, 'seed') for s in (error_seeds, fd_seeds, fd_seeds2)]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    warnings.filterwarnings('ignore', category=scipy.linalg.LinAlgWarning)
    images, labels = load_digits(data)
    with torch.enable_grad():
        classifier, accuracy, _ = train_classifier(images, labels)
    real = classifier.features(images)
    fd = lambda x: frechet(classifier.features(as_measured(x)), real)
    result = dict(settings=dict(nfe=nfes, heun_nfe=heun_nfes, error_seeds=len(error_seeds), fd_seeds=len(fd_seeds),
                                classifier_accuracy=accuracy), networks={})

    for name, path in zip(names, networks):
        net = load_network(path)
        ref = run_solver(net, error_seeds, 'ipndm', solvers.get_sigmas('edm', 512), False, batch)
        heun_ref = run_heun(net, error_seeds, 511, 7, batch)
        rows = []
        configs = [(s, lv, afs, n) for s in solvers.SOLVERS for lv in LEVELS for afs in (False, True) for n in nfes]
        for solver, lv, afs, n in tqdm.tqdm(configs, desc=f'{name} errors'):
            num = levels_for(solver, n, afs)
            if num is None:
                continue
            sigmas = solvers.get_sigmas(num_steps=num, **LEVELS[lv])
            x = run_solver(net, error_seeds, solver, sigmas, afs, batch)
            rows.append(dict(solver=solver, levels=lv, afs=afs, nfe=n, error=rms_error(x, ref)))
        for rho in (7, 90):
            for n in heun_nfes:
                rows.append(dict(solver='heun', levels=f'edm-rho{rho}', afs=False, nfe=n, error=rms_error(run_heun(net, error_seeds, n, rho, batch), heun_ref)))

        # FD-digits: each solver (+/- AFS) on its best levels per NFE; Heun's references.
        best = {}
        for r in rows:
            key = (r['solver'], r['afs'], r['nfe'])
            if r['solver'] != 'heun' and (key not in best or r['error'] < best[key]['error']):
                best[key] = r
        for r in tqdm.tqdm(list(best.values()), desc=f'{name} FD'):
            num = levels_for(r['solver'], r['nfe'], r['afs'])
            r['fd'] = fd(run_solver(net, fd_seeds, r['solver'], solvers.get_sigmas(num_steps=num, **LEVELS[r['levels']]), r['afs'], batch))
        heun_rows = [r for r in rows if r['solver'] == 'heun' and r['nfe'] in (27, 35)]
        for r in heun_rows:
            r['fd'] = fd(run_heun(net, fd_seeds, r['nfe'], int(r['levels'][7:]), batch))
        target = next(r['fd'] for r in heun_rows if r['levels'] == 'edm-rho7' and r['nfe'] == 35)
        fewest = {}
        for r in best.values():
            key = (r['solver'], r['afs'])
            if r['fd'] <= 1.1 * target and r['nfe'] < fewest.get(key, (1 << 30, None))[0]:
                fewest[key] = (r['nfe'], r['levels'])
        # Second draw: Heun 35 and each solver's fewest-NFE configuration.
        heun35 = next(r for r in heun_rows if r['levels'] == 'edm-rho7' and r['nfe'] == 35)
        heun35['fd2'] = fd(run_heun(net, fd_seeds2, 35, 7, batch))
        for (solver, afs), (n, lv) in fewest.items():
            r = best[(solver, afs, n)]
            r['fd2'] = fd(run_solver(net, fd_seeds2, solver, solvers.get_sigmas(num_steps=levels_for(solver, n, afs), **LEVELS[lv]), afs, batch))
        result['networks'][name] = dict(path=path, rows=rows, heun35_fd=target,
                                        fewest={f'{s}{"+afs" if a else ""}': dict(nfe=n, levels=lv) for (s, a), (n, lv) in fewest.items()})
        print(f'{name}: Heun 35 NFE FD-digits {target:.2f}; fewest NFE within 10%:',
              ', '.join(f'{s}{"+afs" if a else ""} {n} ({lv})' for (s, a), (n, lv) in sorted(fewest.items())) or 'none')

    with open(out + '.json', 'w') as f:
        json.dump(result, f, indent=1)
    write_tables(result, out + '.md')
    plot(result, out)

def write_tables(result, path):
    lines = []
    for name, res in result['networks'].items():
        rows = res['rows']
        nfes = sorted({r['nfe'] for r in rows if r['solver'] != 'heun'})
        lines += [f'### {name}: truncation error (RMS vs the 511-NFE solution), best levels per cell', '',
                  '| solver | AFS | ' + ' | '.join(f'{n} NFE' for n in nfes) + ' |', '|---|---|' + '---:|' * len(nfes)]
        for solver in solvers.SOLVERS:
            for afs in (False, True):
                cells = []
                for n in nfes:
                    cand = [r for r in rows if r['solver'] == solver and r['afs'] == afs and r['nfe'] == n]
                    b = min(cand, key=lambda r: r['error']) if cand else None
                    cells.append(f'{b["error"]:.4f} ({b["levels"]})' if b else '')
                lines.append(f'| {solver} | {"yes" if afs else ""} | ' + ' | '.join(cells) + ' |')
        heun = [r for r in rows if r['solver'] == 'heun']
        lines += ['', '| Heun | ' + ' | '.join(f'{r["nfe"]} NFE' for r in heun if r['levels'] == 'edm-rho7') + ' |',
                  '|---|' + '---:|' * len([r for r in heun if r['levels'] == 'edm-rho7'])]
        for lv in ('edm-rho7', 'edm-rho90'):
            lines.append(f'| {lv} | ' + ' | '.join(f'{r["error"]:.4f}' for r in heun if r['levels'] == lv) + ' |')
        lines += ['', f'### {name}: FD-digits (best levels by error; second seed draw in brackets)', '',
                  '| solver | AFS | ' + ' | '.join(f'{n} NFE' for n in nfes) + ' |', '|---|---|' + '---:|' * len(nfes)]
        for solver in solvers.SOLVERS:
            for afs in (False, True):
                cells = []
                for n in nfes:
                    b = [r for r in rows if r['solver'] == solver and r['afs'] == afs and r['nfe'] == n and 'fd' in r]
                    cells.append((f'{b[0]["fd"]:.1f}' + (f' [{b[0]["fd2"]:.1f}]' if 'fd2' in b[0] else '')) if b else '')
                lines.append(f'| {solver} | {"yes" if afs else ""} | ' + ' | '.join(cells) + ' |')
        lines += ['', 'Heun: ' + ', '.join(f'{r["levels"]} {r["nfe"]} NFE {r["fd"]:.1f}' + (f' [{r["fd2"]:.1f}]' if 'fd2' in r else '')
                                      for r in rows if 'fd' in r and r['solver'] == 'heun'),
                  '', 'Fewest NFE within 10% of Heun at 35 NFE: ' + (', '.join(f'{k} {v["nfe"]} ({v["levels"]})' for k, v in sorted(res['fewest'].items())) or 'none'), '']
    with open(path, 'w') as f:
        f.write('\n'.join(lines))

def plot(result, out):
    plt = pyplot()
    for what, key in [('error', 'error'), ('fd', 'fd')]:
        fig, axes = plt.subplots(1, len(result['networks']), figsize=(6 * len(result['networks']), 4.5), squeeze=False)
        for ax, (name, res) in zip(axes[0], result['networks'].items()):
            for solver in list(solvers.SOLVERS) + ['heun']:
                for afs in (False, True):
                    pts = {}
                    for r in res['rows']:
                        if r['solver'] == solver and r['afs'] == afs and key in r and (solver != 'heun' or r['levels'] == 'edm-rho7'):
                            pts[r['nfe']] = min(pts.get(r['nfe'], float('inf')), r[key])
                    if pts:
                        xs = sorted(pts)
                        ax.plot(xs, [pts[x] for x in xs], marker='o', linestyle='--' if afs else '-', label=solver + (' + AFS' if afs else ''))
            ax.set_yscale('log'); ax.set_xlabel('NFE'); ax.set_title(f'{name}: {"truncation error" if key == "error" else "FD-digits"}')
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(f'{out}-{what}.png', dpi=110)
        plt.close(fig)

if __name__ == '__main__':
    main()
