"""Trajectory analysis: how straight a network's sampling ODE is, and what few steps cost.

For each network and each NFE budget, the deterministic Heun sampler (edm_sampler, S_churn=0) is run
from the same per-seed latents as generate.py, and compared with a many-step reference solution
from those latents:

  error      RMS over pixels of (N-step result - reference result), images in [-1, 1]
  deviation  max over the path of the distance of x(sigma) from the straight line x_T -> x_0,
             divided by |x_T - x_0| (0 for a straight path)
  turn       1 - cos(tangent dx/dsigma, chord x_T - x_0), averaged along the path uniformly in
             log sigma (0 when the tangent never turns away from the chord; the tangent is the
             denoiser's noise estimate (x - D(x; sigma)) / sigma, so this is how far that turns)

and the turn along sigma of the reference path, plus a strip of the states, denoiser outputs
D(x; sigma) and tangents along the reference path of the first seed. Outputs in --outdir:
trajectory.json, trajectory.csv, error_vs_nfe.png, curvature.png, strip.png.

    python tools/trajectory.py --network=runs/.../network-snapshot-000100.pkl --seeds=0-63 \\
        --nfe=5,7,9,11,15,19,27,35 --outdir=out/trajectory

Several --network options (each with a --name) are analysed from the same latents and overlaid.
"""

import csv
import json
import os

import click
import numpy as np
import torch
import tqdm

import dnnlib
from dnnlib.util import one_line
from sampling.edm import edm_sampler
from sampling.seeds import latents_for_seeds
from training.network_io import load_network

#----------------------------------------------------------------------------
# One sampler run, observed through the sampler's callback.

def heun_steps(nfe):
    """Heun with N steps evaluates the network 2N-1 times."""
    if nfe < 3 or nfe % 2 == 0:
        raise ValueError(f'NFE {nfe} is not a Heun budget: Heun with N >= 2 steps uses 2N-1 evaluations (3, 5, 7, ...)')
    return (nfe + 1) // 2

def sample_path(net, latents, class_labels, num_steps, **sampler_kwargs):
    """Final images [B, D] and the path: sigmas [S], states x [S+1, B, D] (x_T first, result last),
    tangents dx/dsigma [S, B, D] (float32, CPU), and the denoiser outputs of image 0 [S, D]."""
    sigmas, states, tangents, denoised0 = [], [], [], []
    def observe(step):
        sigmas.append(float(step.t_cur))
        states.append(step.x_cur.flatten(1).float().cpu())
        tangents.append(step.d_cur.flatten(1).float().cpu())
        denoised0.append(step.denoised[0].flatten().float().cpu())
    with torch.no_grad():
        result = edm_sampler(net, latents, class_labels, num_steps=num_steps, callback=observe, **sampler_kwargs)
    result = result.flatten(1).float().cpu()
    return result, np.array(sigmas), torch.stack(states + [result]), torch.stack(tangents), torch.stack(denoised0)

def path_geometry(states, tangents, sigmas):
    """Per image: max deviation from the chord (relative) and mean turn; per step turn [S, B].
    The mean weights steps uniformly in log sigma: by arc length (or sigma) nearly all weight would
    sit at high noise, where x is mostly its starting noise and nothing turns."""
    chord = states[0] - states[-1]                              # x_T - x_0; the tangent points along it
    length = chord.norm(dim=1).clamp(min=1e-12)
    unit = chord / length[:, None]
    rel = states - states[-1]
    perp = rel - (rel * unit).sum(-1, keepdim=True) * unit
    deviation = perp.norm(dim=-1).amax(dim=0) / length
    turn = 1 - torch.nn.functional.cosine_similarity(tangents, chord[None].expand_as(tangents), dim=-1)
    weights = torch.as_tensor(np.abs(np.gradient(np.log(sigmas))) if len(sigmas) > 1 else np.ones(1), dtype=turn.dtype)
    mean_turn = (turn * weights[:, None]).sum(0) / weights.sum()
    return deviation, mean_turn, turn

#----------------------------------------------------------------------------
# The analysis of one network.

def analyze(net, seeds, nfes, ref_steps=256, batch=64, device='cpu', class_idx=None, progress=True, **sampler_kwargs):
    """Dict with, per NFE, error / deviation / turn (mean and std over seeds), the reference run's
    geometry and turn profile along sigma, and the first seed's path for the strip."""
    steps = [heun_steps(nfe) for nfe in nfes]
    if max(steps) > ref_steps:
        raise ValueError(f'NFE {max(nfes)} needs {max(steps)} Heun steps, more than the reference solution ({ref_steps} steps); raise --ref-steps')
    per_nfe = {nfe: dict(error=[], deviation=[], turn=[]) for nfe in nfes}
    ref = dict(deviation=[], turn=[], profile=[])
    strip = None
    batches = [seeds[i:i + batch] for i in range(0, len(seeds), batch)]
    bar = tqdm.tqdm(total=len(batches) * (len(nfes) + 1), unit='run', disable=not progress)
    for batch_seeds in batches:
        latents, class_labels, _ = latents_for_seeds(net, batch_seeds, device=device, class_idx=class_idx)
        result_ref, sigmas, states, tangents, denoised0 = sample_path(net, latents, class_labels, ref_steps, **sampler_kwargs)
        deviation, mean_turn, turn = path_geometry(states, tangents, sigmas)
        ref['deviation'].append(deviation); ref['turn'].append(mean_turn); ref['profile'].append(turn)
        if strip is None:
            strip = dict(sigma=sigmas, state=states[:-1, 0], denoised=denoised0, tangent=tangents[:, 0], result=result_ref[0])
        bar.update(1)
        for nfe, num_steps in zip(nfes, steps):
            result, sigmas, states, tangents, _ = sample_path(net, latents, class_labels, num_steps, **sampler_kwargs)
            deviation, mean_turn, _ = path_geometry(states, tangents, sigmas)
            error = (result - result_ref).square().mean(dim=1).sqrt()
            for key, value in dict(error=error, deviation=deviation, turn=mean_turn).items():
                per_nfe[nfe][key].append(value)
            bar.update(1)
    bar.close()

    def stats(values):
        v = torch.cat(values).double()
        return dict(mean=float(v.mean()), std=float(v.std()) if len(v) > 1 else 0.0)
    return dict(
        runs=[dict(nfe=nfe, steps=s, **{key: stats(per_nfe[nfe][key]) for key in ('error', 'deviation', 'turn')}) for nfe, s in zip(nfes, steps)],
        reference=dict(steps=ref_steps, nfe=2 * ref_steps - 1, deviation=stats(ref['deviation']), turn=stats(ref['turn']),
                       profile=dict(sigma=strip['sigma'].tolist(), turn=torch.cat(ref['profile'], dim=1).double().mean(dim=1).tolist())),
        strip=strip)

#----------------------------------------------------------------------------
# Outputs.

def pyplot():
    import matplotlib
    matplotlib.use('Agg') # files only, also without a display
    import matplotlib.pyplot as plt
    return plt

def save_atomic(path, write):
    tmp = path + '.tmp'
    write(tmp)
    os.replace(tmp, path)

def plot_error(results, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    for name, res in results.items():
        nfe = [r['nfe'] for r in res['runs'] if r['steps'] < res['reference']['steps']]
        err = [r['error']['mean'] for r in res['runs'] if r['steps'] < res['reference']['steps']]
        ax.plot(nfe, err, 'o-', label=name)
    ax.set_xlabel('NFE (Heun)'); ax.set_ylabel('RMS error vs reference'); ax.set_yscale('log')
    ax.set_title(f'Truncation error ({next(iter(results.values()))["reference"]["steps"]}-step reference)', fontsize=10)
    ax.grid(alpha=0.3, which='both'); ax.legend(fontsize=8)
    fig.tight_layout()
    save_atomic(path, lambda tmp: fig.savefig(tmp, format='png'))
    plt.close(fig)

def plot_curvature(results, path):
    plt = pyplot()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for name, res in results.items():
        profile = res['reference']['profile']
        ax0.plot(profile['sigma'], profile['turn'], label=f'{name} (path mean {res["reference"]["turn"]["mean"]:.3f})')
        ax1.plot([r['nfe'] for r in res['runs']], [r['deviation']['mean'] for r in res['runs']], 'o-',
                 label=f'{name} (reference {res["reference"]["deviation"]["mean"]:.3f})')
    ax0.set_xscale('log'); ax0.invert_xaxis()
    ax0.set_xlabel('sigma (sampling goes left to right)')
    ax0.set_ylabel('1 - cos(tangent, chord x_T - x_0)'); ax0.set_title('Tangent turn along the reference path', fontsize=10)
    ax1.set_xlabel('NFE (Heun)'); ax1.set_ylabel('max distance from chord / |chord|'); ax1.set_title('Path deviation from a straight line', fontsize=10)
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3); ax.legend(fontsize=8)
    fig.tight_layout()
    save_atomic(path, lambda tmp: fig.savefig(tmp, format='png'))
    plt.close(fig)

def plot_strip(results, shapes, path, columns=8):
    """Per network three rows along the reference path of the first seed: the state (shown
    variance-preserving, x / sqrt(1 + sigma^2)), the denoiser output, the tangent (normalized)."""
    plt = pyplot()
    rows = [(name, kind) for name in results for kind in ('state', 'denoised', 'tangent')]
    fig, axes = plt.subplots(len(rows), columns + 1, figsize=(1.1 * (columns + 1) + 1, 1.1 * len(rows) + 0.4), dpi=120, squeeze=False)
    for row, (name, kind) in enumerate(rows):
        strip, (c, h, w) = results[name]['strip'], shapes[name]
        picks = np.unique(np.searchsorted(-strip['sigma'], -np.geomspace(strip['sigma'][0], strip['sigma'][-1], columns)).clip(max=len(strip['sigma']) - 1))
        picks = np.pad(picks, (0, columns - len(picks)), mode='edge')
        for col in range(columns + 1):
            ax = axes[row, col]
            ax.set_xticks([]); ax.set_yticks([])
            if col == columns:
                img = strip['result'] if kind == 'denoised' else None
                if row == 0:
                    ax.set_title('result', fontsize=7)
            else:
                i, sigma = picks[col], strip['sigma'][picks[col]]
                img = {'state': strip['state'][i] / np.sqrt(1 + sigma ** 2), 'denoised': strip['denoised'][i],
                       'tangent': strip['tangent'][i] / (3 * strip['tangent'][i].std().clamp(min=1e-12))}[kind]
                if row == 0:
                    ax.set_title(f'sigma {sigma:.3g}', fontsize=7)
            if img is None:
                ax.axis('off')
                continue
            img = (img.reshape(c, h, w).clamp(-1, 1).permute(1, 2, 0).numpy() + 1) / 2
            ax.imshow(img[:, :, 0] if c == 1 else img, cmap='gray', vmin=0, vmax=1, interpolation='nearest')
            if col == 0:
                ax.set_ylabel(f'{name}\n{kind}', fontsize=7)
    fig.tight_layout(pad=0.3)
    save_atomic(path, lambda tmp: fig.savefig(tmp, format='png'))
    plt.close(fig)

def write_outputs(results, shapes, settings, outdir):
    os.makedirs(outdir, exist_ok=True)
    doc = dict(settings=settings, networks={name: {k: v for k, v in res.items() if k != 'strip'} for name, res in results.items()})
    def write_json(tmp):
        with open(tmp, 'w') as f:
            json.dump(doc, f, indent=1)
    save_atomic(os.path.join(outdir, 'trajectory.json'), write_json)
    def write_csv(tmp):
        with open(tmp, 'w', newline='') as f:
            out = csv.writer(f)
            out.writerow(['network', 'nfe', 'steps', 'error', 'error_std', 'deviation', 'deviation_std', 'turn', 'turn_std'])
            for name, res in results.items():
                for r in res['runs'] + [dict(res['reference'], error=dict(mean=0.0, std=0.0))]:
                    out.writerow([name, r['nfe'], r['steps'], *(f'{r[k][s]:.6g}' for k in ('error', 'deviation', 'turn') for s in ('mean', 'std'))])
    save_atomic(os.path.join(outdir, 'trajectory.csv'), write_csv)
    plot_error(results, os.path.join(outdir, 'error_vs_nfe.png'))
    plot_curvature(results, os.path.join(outdir, 'curvature.png'))
    plot_strip(results, shapes, os.path.join(outdir, 'strip.png'))

#----------------------------------------------------------------------------

def parse_int_list(text, what):
    """dnnlib.util.parse_int_list for a Click option: a bad part is a usage error naming it."""
    try:
        return dnnlib.util.parse_int_list(text, what)
    except ValueError as e:
        raise click.BadParameter(f'{e} in the {what} list')

@click.command()
@click.option('--network', 'networks', help='Network snapshot (.pkl, URL or .safetensors); repeat to compare', metavar='PATH', multiple=True, required=True)
@click.option('--name', 'names',       help='Label of each --network in the plots  [default: file name]', metavar='STR', multiple=True)
@click.option('--outdir',              help='Where to write trajectory.json/.csv and the PNGs', metavar='DIR', type=str, required=True)
@click.option('--seeds',               help='Random seeds (latents as generate.py)', metavar='LIST', default='0-63', show_default=True)
@click.option('--nfe',                 help='Heun NFE budgets (odd, 2*steps-1)', metavar='LIST', default='5,7,9,11,15,19,27,35', show_default=True)
@click.option('--ref-steps',           help='Heun steps of the reference solution', metavar='INT', type=click.IntRange(min=2), default=256, show_default=True)
@click.option('--rho',                 help='Time step exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7, show_default=True)
@click.option('--sigma_min',           help='Lowest noise level', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.002, show_default=True)
@click.option('--sigma_max',           help='Highest noise level', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=80, show_default=True)
@click.option('--class', 'class_idx',  help='Class label  [default: random per seed]', metavar='INT', type=click.IntRange(min=0))
@click.option('--batch',               help='Seeds per batch (memory: 2 x (ref-steps+1) x batch x pixels floats)', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--device',              help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str)
def main(networks, names, outdir, seeds, nfe, ref_steps, rho, sigma_min, sigma_max, class_idx, batch, device):
    """Truncation error and curvature of the Heun sampler's ODE paths, per NFE."""
    seeds = parse_int_list(seeds, 'seed')
    nfes = sorted(set(parse_int_list(nfe, 'NFE')))
    try:
        [heun_steps(n) for n in nfes]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--nfe')
    if names and len(names) != len(networks):
        raise click.BadParameter(f'{len(names)} names for {len(networks)} networks; give one --name per --network or none', param_hint='--name')
    names = list(names) or [os.path.splitext(os.path.basename(p))[0] for p in networks]
    if len(set(names)) != len(names):
        raise click.BadParameter(f'networks need distinct labels, got {names}; give each a --name', param_hint='--name')
    if sigma_min >= sigma_max:
        raise click.BadParameter(f'--sigma_min {sigma_min} must be below --sigma_max {sigma_max}', param_hint='--sigma_min')
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))

    results, shapes = {}, {}
    for name, path in zip(names, networks):
        try:
            net = load_network(path, device=device)
        except Exception as e: # unreadable, corrupt or not a network: one line, whatever the cause
            raise click.ClickException(f'Cannot load network "{path}": {one_line(e)}. Give a network-snapshot-*.pkl, a .safetensors file or a URL to one.')
        print(f'{name}: {len(seeds)} seeds, NFE {",".join(map(str, nfes))}, {ref_steps}-step reference')
        try:
            results[name] = analyze(net, seeds, nfes, ref_steps, batch, device, class_idx,
                                    rho=rho, sigma_min=sigma_min, sigma_max=sigma_max)
        except ValueError as e:
            raise click.ClickException(str(e))
        shapes[name] = (net.img_channels, net.img_resolution, net.img_resolution)
        for r in results[name]['runs']:
            print(f'  NFE {r["nfe"]:3d}: error {r["error"]["mean"]:.4f}  deviation {r["deviation"]["mean"]:.4f}  turn {r["turn"]["mean"]:.4f}')
        ref = results[name]['reference']
        print(f'  reference ({ref["nfe"]} NFE): deviation {ref["deviation"]["mean"]:.4f}  turn {ref["turn"]["mean"]:.4f}')

    settings = dict(networks=dict(zip(names, networks)), seeds=len(seeds), first_seed=seeds[0], nfe=nfes, ref_steps=ref_steps,
                    rho=rho, sigma_min=sigma_min, sigma_max=sigma_max, class_idx=class_idx, sampler='edm_sampler (Heun, S_churn=0)')
    write_outputs(results, shapes, settings, outdir)
    print(f'Wrote trajectory.json, trajectory.csv, error_vs_nfe.png, curvature.png, strip.png to "{outdir}"')

if __name__ == '__main__':
    main()
