"""Few-step sampling study: every solver of sampling/solvers.py on EDM's (rho 7), log-SNR and GITS's
searched noise levels, with and without AFS, at small NFE, on each --network, against EDM's Heun.

`run`, for each network:
- truncation error: RMS over pixels of (result - 511-NFE solution) from the same latents, mean over
  seeds, on two disjoint seed sets: --select-seeds pick the best configuration per NFE (the tables'
  "best levels" cells, the FD-digits candidates, the plots' points) and --error-seeds report its error,
  so that the reported error is not the minimum of many noisy ones. The few-step solvers end at sigma_min, as does their reference
  (iPNDM on 512 EDM levels); Heun (rho 7, 72, 90) ends at 0, as does its reference (Heun, 256 steps).
  GITS's levels come from one teacher run on --search-seeds (held out from the errors); iPNDM also
  gets levels from tools/schedule_search.py's --metric=solver at --solver-search-nfe;
- FD-digits (bench/digits_fd.py's classifier features, --fd-seeds samples rounded to uint8) of the
  --fd-top configurations of least error per NFE (distinct solvers), of Heun (rho 7; the AOT paper's
  rho 90 at 27 NFE and rho 72 at 29); a second seed draw for Heun at 35 NFE and the best per NFE;
- the fewest NFE at which a few-step configuration, and Heun, come within 10% of Heun's FD-digits at 35 NFE,
  picked on the first seed draw and checked on the second (does it hold there against Heun's second draw?).
`report` merges runs (one network per process uses both cores) into markdown tables and two plots.
Each run records its provenance (commit and uncommitted changes, torch, thread count, CPU, command).
A check of part of the study: --solvers, --levels, --nfe and --heun-nfe take subsets, --no-fd skips
FD-digits (and needs no --data), e.g.

    python bench/fewstep_study.py run --network=AOT.pkl --name=AOT --solvers=ipndm,unipc --levels=edm,logsnr --no-fd --out=out/check.json

    python bench/fewstep_study.py run --data=datasets/uci-digits-16x16.zip --network=AOT.pkl --name=AOT --out=out/fewstep/aot.json
    python bench/fewstep_study.py run --data=datasets/uci-digits-16x16.zip --network=EDM.pkl --name=EDM --out=out/fewstep/edm.json
    python bench/fewstep_study.py report --out=out/fewstep/study out/fewstep/aot.json out/fewstep/edm.json
"""

import json
import os
import warnings

import click
import numpy as np
import scipy.linalg
import torch
import tqdm

from bench.digits_fd import frechet, load_digits, quantize, train_classifier
from bench.report import provenance, provenance_line
from tools import schedule_search
from tools.trajectory import heun_steps, parse_int_list, pyplot
from sampling import schedules, solvers
from sampling.edm import edm_sampler
from sampling.seeds import latents_for_seeds
from training.network_io import load_network

LEVELS = ('edm', 'logsnr', 'gits') # EDM's rho 7, uniform in log-SNR, GITS's search (metric dev)
HEUN_RHOS = (7, 72, 90) # EDM's, and the AOT paper's conditional / unconditional choices

def picked_by(r):
    """The error a configuration is picked by: the selection seeds' (an older run's: the reported one)."""
    return r.get('select_error', r['error'])

def pick(rows):
    """The configuration of least selection error, or None."""
    return min(rows, key=picked_by) if rows else None

def names_list(text, choices, what):
    """A comma-separated subset of `choices`, in the order given."""
    out = [s.strip() for s in text.split(',') if s.strip()]
    bad = [s for s in out if s not in choices]
    if bad or not out:
        raise click.BadParameter(f'{",".join(bad) or "nothing"}: choose from {",".join(choices)}', param_hint=what)
    return out

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

def draws(net, seeds, batch):
    return [latents_for_seeds(net, chunk)[:2] for chunk in schedule_search.batches(seeds, batch)]

def run_solver(net, seeds, solver, sigmas, afs, batch):
    return torch.cat([solvers.sample(net, z, c, solver=solver, sigmas=sigmas, afs=afs).float() for z, c in draws(net, seeds, batch)])

def run_heun(net, seeds, nfe, rho, batch):
    return torch.cat([edm_sampler(net, z, c, num_steps=heun_steps(nfe), rho=rho).float() for z, c in draws(net, seeds, batch)])

def rms_error(x, ref):
    return (x - ref).flatten(1).pow(2).mean(dim=1).sqrt().mean().item()

class Levels:
    """The noise levels of each kind for a network: fixed formulas, and GITS's DP on the jump costs of
    one teacher run over the warm-up latents (the DP alone differs per number of levels)."""

    def __init__(self, net, search_seeds, teacher_steps, batch):
        t = schedule_search.TEACHER
        self.teacher_sigmas = schedules.get_sigmas(t['disc'], teacher_steps, rho=t['rho'])
        cost, _ = schedule_search.teacher_costs(net, draws(net, search_seeds, batch), self.teacher_sigmas, 'dev')
        self.cost = cost.numpy()

    @classmethod
    def fixed(cls):
        """The fixed formulas only (no teacher run: GITS's levels not asked for)."""
        return cls.__new__(cls)

    def __call__(self, kind, num):
        if kind == 'gits':
            return self.teacher_sigmas[schedule_search.best_path(self.cost, num, coeff=1.15)]
        return schedules.get_sigmas(kind, num, rho=7)

def save(path, record):
    with open(path + '.tmp', 'w') as f:
        json.dump(record, f, indent=1)
    os.replace(path + '.tmp', path)

@click.group()
def cli():
    """Few-step sampling study: `run` measures networks, `report` writes tables and plots."""

@cli.command()
@click.option('--data', help='Labelled digits dataset (for FD-digits)', metavar='ZIP|DIR')
@click.option('--network', 'networks', help='Network snapshot; repeat', metavar='PATH', multiple=True, required=True)
@click.option('--name', 'names', help='Label of each --network', metavar='STR', multiple=True, required=True)
@click.option('--solvers', 'solver_names', help='Few-step solvers to run', metavar='LIST', default=','.join(solvers.SOLVERS), show_default=True)
@click.option('--levels', 'level_names', help='Noise levels to run', metavar='LIST', default=','.join(LEVELS), show_default=True)
@click.option('--nfe', help='NFE budgets of the few-step solvers', metavar='LIST', default='4,5,6,8,10,12,15', show_default=True)
@click.option('--heun-nfe', help='NFE budgets of Heun (odd; empty: none)', metavar='LIST', default='7,9,11,15,19,27,29,35', show_default=True)
@click.option('--heun-fd-nfe', help='Heun budgets with FD-digits (rho 7; rho 90 at 27, rho 72 at 29 where listed)', metavar='LIST', default='7,11,19,27,35', show_default=True)
@click.option('--error-seeds', help='Seeds of the reported truncation error (evaluation set)', metavar='LIST', default='0-31', show_default=True)
@click.option('--select-seeds', help='Seeds that pick the best configuration per NFE (disjoint from --error-seeds)', metavar='LIST', default='2000-2031', show_default=True)
@click.option('--search-seeds', help='Warm-up seeds of the searches (held out from the errors)', metavar='LIST', default='1000-1127', show_default=True)
@click.option('--solver-search-seeds', help='Warm-up seeds of --metric=solver (its cost grows with them)', metavar='LIST', default='1000-1031', show_default=True)
@click.option('--solver-search-nfe', help='NFE at which --metric=solver levels are searched for iPNDM (empty: none)', metavar='LIST', default='5,8,10', show_default=True)
@click.option('--sweeps', help='Coordinate-descent sweeps of --metric=solver', type=int, default=4, show_default=True)
@click.option('--no-fd', help='Skip FD-digits (truncation errors only)', is_flag=True)
@click.option('--fd-top', help='Configurations with FD-digits per NFE: the best by error, distinct solvers', type=int, default=2, show_default=True)
@click.option('--fd-seeds', help='Seeds of FD-digits', metavar='LIST', default='0-499', show_default=True)
@click.option('--fd-seeds2', help='Second seed draw: Heun 35 and the best per NFE', metavar='LIST', default='500-999', show_default=True)
@click.option('--epochs', help='Training epochs of the FD-digits classifier', type=int, default=30, show_default=True)
@click.option('--batch', help='Images per sampler call', type=int, default=250, show_default=True)
@click.option('--out', help='Output JSON', metavar='FILE', required=True)
@torch.no_grad()
def run(data, networks, names, solver_names, level_names, nfe, heun_nfe, heun_fd_nfe, error_seeds, select_seeds, search_seeds, solver_search_seeds,
        solver_search_nfe, sweeps, no_fd, fd_top, fd_seeds, fd_seeds2, epochs, batch, out):
    """Measure each --network: truncation errors of every configuration, FD-digits of the best."""
    if len(names) != len(networks):
        raise click.BadParameter('give one --name per --network', param_hint='--name')
    run_solvers, run_levels = names_list(solver_names, solvers.SOLVERS, '--solvers'), names_list(level_names, LEVELS, '--levels')
    nfes, heun_fd_nfes = [parse_int_list(s, 'NFE') for s in (nfe, heun_fd_nfe)]
    heun_nfes, search_nfes = [parse_int_list(s, 'NFE') if s.strip() else [] for s in (heun_nfe, solver_search_nfe)]
    search_nfes = search_nfes if 'ipndm' in run_solvers else []
    if any(n % 2 == 0 for n in heun_nfes + heun_fd_nfes):
        raise click.BadParameter('Heun costs an odd NFE (2 x steps - 1)', param_hint='--heun-nfe')
    if not no_fd and (data is None or max(heun_fd_nfes) not in heun_nfes):
        raise click.UsageError('FD-digits needs --data and Heun at the largest --heun-fd-nfe in --heun-nfe; or give --no-fd')
    error_seeds, select_seeds, search_seeds, solver_search_seeds, fd_seeds, fd_seeds2 = [
        parse_int_list(s, 'seed') for s in (error_seeds, select_seeds, search_seeds, solver_search_seeds, fd_seeds, fd_seeds2)]
    if set(select_seeds) & set(error_seeds):
        raise click.BadParameter('the selection seeds must be disjoint from --error-seeds', param_hint='--select-seeds')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    warnings.filterwarnings('ignore', category=scipy.linalg.LinAlgWarning)
    accuracy = None
    if not no_fd:
        images, labels = load_digits(data)
        with torch.enable_grad():
            classifier, accuracy, _ = train_classifier(images, labels, epochs=epochs)
        real = classifier.features(images)
        fd = lambda x: frechet(classifier.features(quantize(x)), real)
    picking = f'best configuration per NFE picked on seeds {select_seeds[0]}-{select_seeds[-1]} ({len(select_seeds)}), ' \
              f'errors reported on seeds {error_seeds[0]}-{error_seeds[-1]} ({len(error_seeds)})'
    result = dict(settings=dict(data=data, solvers=run_solvers, levels=run_levels, nfe=nfes, heun_nfe=heun_nfes, error_seeds=len(error_seeds),
                                select_seeds=len(select_seeds), search_seeds=len(search_seeds), solver_search_seeds=len(solver_search_seeds),
                                fd=not no_fd, fd_seeds=len(fd_seeds), fd_seeds2=len(fd_seeds2), sweeps=sweeps, classifier_accuracy=accuracy,
                                picking=picking, provenance=provenance()), networks={})

    for name, path in zip(names, networks):
        net = load_network(path)
        res = result['networks'][name] = dict(path=path, picking=picking, provenance=result['settings']['provenance'], rows=[])
        rows = res['rows']
        # Truncation errors. The few-step solvers end at sigma_min, as does their reference (iPNDM on
        # 512 EDM levels); Heun ends at 0, as does its reference (Heun, 256 steps). Each configuration
        # is measured on the evaluation seeds (error) and the selection seeds (select_error).
        edm512 = schedules.get_sigmas('edm', 512)
        refs = {key: run_solver(net, seeds, 'ipndm', edm512, False, batch) for key, seeds in (('error', error_seeds), ('select_error', select_seeds))}
        errors = lambda solver, sigmas, afs: {key: rms_error(run_solver(net, seeds, solver, sigmas, afs, batch), refs[key])
                                              for key, seeds in (('error', error_seeds), ('select_error', select_seeds))}
        heun_ref = run_heun(net, error_seeds, 511, 7, batch) if heun_nfes else None
        levels = Levels(net, search_seeds, 61, batch) if 'gits' in run_levels else Levels.fixed()
        configs = [(s, lv, afs, n) for s in run_solvers for lv in run_levels for afs in (False, True) for n in nfes]
        for solver, lv, afs, n in tqdm.tqdm(configs, desc=f'{name} errors'):
            num = levels_for(solver, n, afs)
            if num is not None:
                sigmas = levels(lv, num)
                rows.append(dict(solver=solver, levels=lv, afs=afs, nfe=n, sigmas=sigmas.tolist(), **errors(solver, sigmas, afs)))
        for n in tqdm.tqdm(search_nfes, desc=f'{name} solver search'): # --metric=solver for iPNDM
            sigmas, _ = schedule_search.search(net, draws(net, solver_search_seeds, batch), levels_for('ipndm', n, False), metric='solver',
                                               solver='ipndm', sweeps=sweeps, progress=False)
            rows.append(dict(solver='ipndm', levels='solver-search', afs=False, nfe=n, sigmas=sigmas.tolist(), **errors('ipndm', sigmas, False)))
        for rho in HEUN_RHOS: # nothing is picked among Heun's rows: the evaluation seeds only
            for n in heun_nfes:
                rows.append(dict(solver='heun', levels=f'edm-rho{rho}', afs=False, nfe=n,
                                 error=rms_error(run_heun(net, error_seeds, n, rho, batch), heun_ref)))
        save(out, result)
        if no_fd:
            print(f'{name}: truncation errors only (--no-fd); {picking}')
            continue

        # FD-digits: per NFE the fd_top configurations of least selection error (one per solver); Heun.
        for n in tqdm.tqdm(nfes, desc=f'{name} FD'):
            ranked, seen = sorted((r for r in rows if r['nfe'] == n and r['solver'] != 'heun'), key=picked_by), set()
            for r in ranked:
                if r['solver'] not in seen and len(seen) < fd_top:
                    seen.add(r['solver'])
                    r['fd'] = fd(run_solver(net, fd_seeds, r['solver'], torch.tensor(r['sigmas'], dtype=torch.float64), r['afs'], batch))
        paper = {27: 90, 29: 72} # the AOT paper's settings, where listed
        for r in rows:
            if r['solver'] == 'heun' and r['nfe'] in heun_fd_nfes and r['levels'] in ('edm-rho7', f'edm-rho{paper.get(r["nfe"])}'):
                r['fd'] = fd(run_heun(net, fd_seeds, r['nfe'], int(r['levels'][7:]), batch))
        heun35 = next(r for r in rows if r['solver'] == 'heun' and r['levels'] == 'edm-rho7' and r['nfe'] == max(heun_fd_nfes))
        heun35['fd2'] = fd(run_heun(net, fd_seeds2, heun35['nfe'], 7, batch))
        for n in nfes: # second draw of the best per NFE: the spread between draws
            r = min((r for r in rows if r['nfe'] == n and r['solver'] != 'heun' and 'fd' in r), key=lambda r: r['fd'])
            r['fd2'] = fd(run_solver(net, fd_seeds2, r['solver'], torch.tensor(r['sigmas'], dtype=torch.float64), r['afs'], batch))
        res['heun_fd'] = dict(nfe=heun35['nfe'], fd=heun35['fd'], fd2=heun35['fd2'])
        res['fewest'] = fewest_within(rows, 1.1 * heun35['fd'])
        for pick in res['fewest'].values(): # picked on the first draw, checked on the second
            r = pick.pop('row')
            if 'fd2' not in r:
                r['fd2'] = fd(run_heun(net, fd_seeds2, r['nfe'], int(r['levels'][7:]), batch) if r['solver'] == 'heun' else
                              run_solver(net, fd_seeds2, r['solver'], torch.tensor(r['sigmas'], dtype=torch.float64), r['afs'], batch))
            pick.update(fd2=r['fd2'], holds=r['fd2'] <= 1.1 * heun35['fd2'])
        save(out, result)
        print(f'{name}: Heun {heun35["nfe"]} NFE FD-digits {heun35["fd"]:.2f}; fewest NFE within 10%: ' +
              (', '.join(f'{k} {v["nfe"]}' for k, v in res['fewest'].items()) or 'none') + f'; {picking}')
    print(f'Wrote "{out}"; tables and plots: python bench/fewstep_study.py report --out=PREFIX {out}')

def label(r):
    return r['solver'] + ('+afs' if r['afs'] else '') + ('' if r['solver'] == 'heun' else f' ({r["levels"]})')

def fewest_within(rows, target):
    """{'few-step': pick, 'heun': pick}: per family the fewest NFE with FD-digits (first draw) <= target;
    each pick names its row, whose second draw then says whether it holds on other seeds."""
    out = {}
    for family, members in [('few-step', [r for r in rows if r['solver'] != 'heun']), ('heun', [r for r in rows if r['solver'] == 'heun'])]:
        hits = sorted((r for r in members if r.get('fd', float('inf')) <= target), key=lambda r: (r['nfe'], r['fd']))
        if hits:
            out[family] = dict(nfe=hits[0]['nfe'], config=label(hits[0]), fd=hits[0]['fd'], row=hits[0])
    return out

@cli.command()
@click.argument('results', nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option('--out', help='Output prefix of PREFIX.md, PREFIX-error.png, PREFIX-fd.png', metavar='PATH', required=True)
def report(results, out):
    """Tables and plots of one or more `run` results (their networks in order)."""
    merged = {}
    for path in results:
        with open(path) as f:
            merged.update(json.load(f)['networks'])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_tables(merged, out + '.md')
    plot(merged, out)
    print(f'Wrote "{out}.md", "{out}-error.png", "{out}-fd.png"')

def write_tables(networks, path):
    lines = []
    for name, res in networks.items():
        rows = res['rows']
        few = [r for r in rows if r['solver'] != 'heun']
        nfes = sorted({r['nfe'] for r in few})
        head = lambda first: ['| ' + first + ' | ' + ' | '.join(f'{n} NFE' for n in nfes) + ' |', '|---|' + '---:|' * len(nfes)]
        lines += [f'### {name}: truncation error (RMS vs the 511-NFE solution), best levels per cell', '',
                  f'{res.get("picking") or "best configuration per NFE picked on the seeds that report its error (an older run: optimistic)"}.', '']
        if res.get('provenance'):
            lines += [f'Made at {provenance_line(res["provenance"])}.', '']
        lines += head('solver')
        for solver in solvers.SOLVERS:
            for afs in (False, True):
                cells = [pick([r for r in few if r['solver'] == solver and r['afs'] == afs and r['nfe'] == n]) for n in nfes]
                lines.append(f'| {solver}{" + AFS" if afs else ""} | ' + ' | '.join(f'{b["error"]:.4f} ({b["levels"]})' if b else '' for b in cells) + ' |')
        lines += ['', f'iPNDM (no AFS) by noise levels:', ''] + head('levels')
        for lv in LEVELS + ('solver-search',):
            cells = [next((r for r in few if r['solver'] == 'ipndm' and not r['afs'] and r['levels'] == lv and r['nfe'] == n), None) for n in nfes]
            lines.append(f'| {lv} | ' + ' | '.join(f'{c["error"]:.4f}' if c else '' for c in cells) + ' |')
        heun = [r for r in rows if r['solver'] == 'heun']
        heun_nfes = sorted({r['nfe'] for r in heun})
        lines += ['', '| Heun | ' + ' | '.join(f'{n} NFE' for n in heun_nfes) + ' |', '|---|' + '---:|' * len(heun_nfes)]
        for rho in HEUN_RHOS:
            cells = {r['nfe']: r['error'] for r in heun if r['levels'] == f'edm-rho{rho}'}
            lines.append(f'| rho {rho} | ' + ' | '.join(f'{cells[n]:.4f}' if n in cells else '' for n in heun_nfes) + ' |')
        lines += ['', f'### {name}: FD-digits (second seed draw in brackets)', '', '| NFE | configuration | error | FD-digits |', '|---:|---|---:|---:|']
        for r in sorted((r for r in rows if 'fd' in r), key=lambda r: (r['nfe'], r['solver'] == 'heun', r['fd'])):
            lines.append(f'| {r["nfe"]} | {label(r) if r["solver"] != "heun" else "heun " + r["levels"]} | {r["error"]:.4f} | '
                         f'{r["fd"]:.2f}' + (f' [{r["fd2"]:.2f}]' if 'fd2' in r else '') + ' |')
        h = res.get('heun_fd')
        if h:
            held = lambda v: '' if 'fd2' not in v else f' [{v["fd2"]:.2f}: {"holds" if v["holds"] else "not within 10%"} on the second draw]'
            lines += ['', f'Heun {h["nfe"]} NFE (rho 7): FD-digits {h["fd"]:.2f} [{h["fd2"]:.2f}]; fewest NFE within 10% of it: ' +
                      (', '.join(f'{k} {v["nfe"]} NFE ({v["config"]}, {v["fd"]:.2f}{held(v)})' for k, v in res['fewest'].items()) or 'none')]
        lines.append('')
    with open(path, 'w') as f:
        f.write('\n'.join(lines))

def plot(networks, out):
    plt = pyplot()
    for key in ('error', 'fd'):
        cols = min(2, len(networks)) # pairs side by side (e.g. AOT and its EDM twin), one y scale
        rows = (len(networks) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False, sharey=True)
        axes = axes.flatten()
        for ax in axes[len(networks):]:
            ax.set_visible(False)
        for ax, (name, res) in zip(axes, networks.items()):
            if not any(key in r for r in res['rows']): # a run still measuring
                ax.set_title(f'{name}: not measured yet')
                continue
            for i, solver in enumerate(list(solvers.SOLVERS) + ['heun']):
                for afs in (False, True):
                    pts = {}
                    for r in res['rows']:
                        if r['solver'] == solver and r['afs'] == afs and key in r and (solver != 'heun' or r['levels'] == 'edm-rho7'):
                            pts.setdefault(r['nfe'], []).append(r)
                    # errors: the configuration picked on the selection seeds; FD-digits: the least measured
                    pts = {n: pick(c)['error'] if key == 'error' else min(r[key] for r in c) for n, c in pts.items()}
                    if pts:
                        xs = sorted(pts)
                        ax.plot(xs, [pts[x] for x in xs], marker='o', linestyle='--' if afs else '-',
                                color='black' if solver == 'heun' else plt.cm.tab10(i), label=solver + (' + AFS' if afs else ''))
            if key == 'fd':
                spread = [r for r in res['rows'] if 'fd2' in r]
                ax.scatter([r['nfe'] for r in spread], [r['fd2'] for r in spread], marker='x', color='gray', label='second seed draw', zorder=3)
                if 'heun_fd' in res: # absent while a run is still measuring FD-digits
                    ax.axhline(1.1 * res['heun_fd']['fd'], color='gray', linestyle=':', label=f'Heun {res["heun_fd"]["nfe"]} NFE + 10%')
            ax.set_xscale('log'); ax.set_yscale('log'); ax.set_xlabel('NFE')
            ax.set_xticks([4, 5, 6, 8, 10, 15, 20, 35]); ax.set_xticklabels(['4', '5', '6', '8', '10', '15', '20', '35'])
            ax.xaxis.set_minor_formatter(plt.NullFormatter())
            ax.set_title(f'{name}: {"truncation error (best levels)" if key == "error" else "FD-digits"}')
            ax.grid(alpha=0.3)
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(f'{out}-{key}.png', dpi=110)
        plt.close(fig)

if __name__ == '__main__':
    cli()
