"""Search the noise levels of a few-step solver for a given network, without data.

GITS (Chen et al., ICML 2024; zju-pi/diff-sampler gits_utils.py): a teacher (iPNDM on --teacher-steps
EDM levels, rho 7) solves the ODE from the warm-up latents of --seeds (drawn as generate.py draws
them); the cost of a one-step Euler jump from every teacher level i to every later level j is
averaged over them (--metric=dev: how much farther the jump lands from the straight line x_T -> x_0
than the teacher at j, the paper's trajectory deviation; --metric=l2: distance from the teacher at j);
dynamic programming then picks the --steps levels that minimise c(i0,i1) + coeff c(i1,i2) +
coeff^2 c(i2,i3) + ...; --coeff 1.15, the paper's, weighs later jumps more.

With --afs (the solver's analytical first step), GITS adds a level as diff-sampler does: the teacher
level between the first two chosen that gives the solver's least error on the warm-up latents, so
--steps + 1 levels cost what --steps levels cost without AFS.

--metric=solver goes beyond GITS: GITS's cost is one Euler step, while what counts is the chosen
solver's own result. Starting from the best of EDM's (rho 7) and log-SNR levels, coordinate
descent on log sigma moves one inner level at a time while the solver's final error against the
teacher's result (mean L2 over the warm-up latents) goes down. Every run reports that error for
the levels it found and for EDM's (rho 7) and log-SNR levels.

    python tools/schedule_search.py --network=net.pkl --solver=ipndm --steps=11 --out=ipndm-11.json
    python generate.py --network=net.pkl --solver=ipndm --sigmas=ipndm-11.json --outdir=out

Writes {"sigmas": [...], ...how they were made...} for generate.py --sigmas. CPU or GPU; several
GPUs share the warm-up latents under torchrun (torchrun --standalone --nproc_per_node=4
tools/schedule_search.py ...). See docs/few-step.md.
"""

import json
import os
import time

import click
import numpy as np
import torch
import tqdm

from torch_utils import distributed as dist
from sampling import schedules, solvers
from sampling.seeds import latents_for_seeds, parse_seeds
from training.network_io import load_network

TEACHER = dict(solver='ipndm', order=4, disc='edm', rho=7) # iPNDM on EDM's levels

def teacher(net, latents, class_labels, sigmas, callback=None):
    return solvers.sample(net, latents, class_labels, solver=TEACHER['solver'], sigmas=sigmas, order=TEACHER['order'], callback=callback)

#----------------------------------------------------------------------------
# Teacher trajectories and the cost of one-step jumps between their levels.

def teacher_path(net, latents, class_labels, sigmas):
    """The teacher's states at every level [L, B, D] and its slopes dx/dsigma at all but the last [L-1, B, D]."""
    states, slopes = [], []
    def observe(step):
        states.append(step.x.flatten(1))
        slopes.append(((step.x - step.denoised) / step.sigma).flatten(1))
    final = teacher(net, latents, class_labels, sigmas, callback=observe)
    return torch.stack(states + [final.flatten(1)]), torch.stack(slopes)

def deviation(points, start, end):
    """Distance of points [..., B, D] from the straight lines start -> end [B, D] of their samples."""
    unit = (end - start) / (end - start).norm(dim=-1, keepdim=True)
    to_end = end - points
    return (to_end - (to_end * unit).sum(-1, keepdim=True) * unit).norm(dim=-1)

def jump_costs(states, slopes, sigmas, metric):
    """[L, L] costs of an Euler jump from teacher level i to each later level j, summed over the
    batch (0 elsewhere): dev = its deviation minus the teacher's at j; l2 = its distance from the teacher at j."""
    if metric not in ('dev', 'l2'):
        raise ValueError(f'unknown metric {metric!r}: choose dev or l2')
    L = len(sigmas)
    cost = torch.zeros([L, L], dtype=torch.float64, device=states.device)
    start, end = states[0], states[-1]
    if metric == 'dev':
        teacher_dev = deviation(states, start, end)
        unit = (end - start) / (end - start).norm(dim=-1, keepdim=True)
        across = lambda v: v - (v * unit).sum(-1, keepdim=True) * unit # the part perpendicular to the line
    for i in range(L - 1):
        steps = (sigmas[i + 1:] - sigmas[i]).reshape(-1, 1)        # [L-1-i, 1]
        if metric == 'dev':
            # The jump to level j lands at x_i + s_j d_i; its distance from the line is |a - s_j g|, a and g the
            # parts of x_0 - x_i and d_i across the line. Three dot products per sample give every j: the
            # jumps themselves ([L-1-i, B, D] per level) cost more than the teacher's network on small images.
            a, g = across(end - states[i]), across(slopes[i])
            aa, ag, gg = (a * a).sum(-1), (a * g).sum(-1), (g * g).sum(-1)
            jump_dev = (aa - 2 * steps * ag + steps ** 2 * gg).clamp(min=0).sqrt() # [L-1-i, B]
            cost[i, i + 1:] = (jump_dev - teacher_dev[i + 1:]).sum(-1)
        else:
            jumps = states[i] + steps[..., None] * slopes[i]        # [L-1-i, B, D]
            cost[i, i + 1:] = (jumps - states[i + 1:]).norm(dim=-1).sum(-1)
    return cost

def best_path(cost, num_steps, coeff):
    """GITS's dynamic programme: indices 0 = i0 < i1 < ... < i_{K} = L-1 (K = num_steps - 1) into the
    teacher's levels minimising cost[i0,i1] + coeff * cost[i1,i2] + coeff^2 * ...; ties go to the
    smaller index, as in the reference."""
    cost = np.asarray(cost)
    L, K = len(cost), num_steps - 1
    if not 2 <= num_steps <= L:
        raise ValueError(f'cannot pick {num_steps} of {L} teacher levels: use 2 to {L} steps or more teacher steps')
    # V[k][j]: least cost of reaching the last level from level j in k jumps; nxt[k][j]: the next level.
    V = np.full((K + 1, L), np.inf)
    nxt = np.zeros((K + 1, L), dtype=np.int64)
    V[1] = cost[:, -1]
    for k in range(2, K + 1):
        for j in range(L - 2):
            candidates = cost[j, j + 1 : L - 1] + coeff * V[k - 1, j + 1 : L - 1]
            nxt[k, j] = j + 1 + np.argmin(candidates)
            V[k, j] = candidates[nxt[k, j] - j - 1]
    path = [0]
    for k in range(K, 1, -1):
        path.append(int(nxt[k, path[-1]]))
    return path + [L - 1]

#----------------------------------------------------------------------------
# The whole search.

def seed_list(text, option):
    """The seeds of a list like 0-255,300 (None for None), its error as the option's."""
    try:
        return None if text is None else parse_seeds(text)
    except ValueError as e:
        raise click.BadParameter(f'{e} (example: {option}=0-255 or {option}=1,2,5-10)', param_hint=option) from None

def seed_text(seeds):
    """'a-b' for a range, else the list (None stays None)."""
    return f'{seeds[0]}-{seeds[-1]}' if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)) else seeds

def batches(seeds, batch):
    return [seeds[i : i + batch] for i in range(0, len(seeds), batch)]

def mean_over_ranks(total, count):
    """total / count summed over the torchrun processes (each holds its share of the warm-up latents)."""
    if torch.distributed.is_initialized():
        count = torch.as_tensor(float(count), dtype=torch.float64, device=total.device)
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    return total / count

def teacher_costs(net, draws, teacher_sigmas, metric, progress=True):
    """(the jump costs of metric dev|l2 averaged over the warm-up latents, or None for metric=solver;
    the teacher's results per batch). draws: (latents, class_labels) batches."""
    total = torch.zeros([len(teacher_sigmas)] * 2, dtype=torch.float64, device=teacher_sigmas.device)
    results = []
    for latents, class_labels in tqdm.tqdm(draws, desc='teacher', unit='batch', disable=not progress):
        states, slopes = teacher_path(net, latents, class_labels, teacher_sigmas)
        results.append(states[-1].reshape(latents.shape))
        if metric != 'solver':
            total += jump_costs(states, slopes, teacher_sigmas, metric)
    cost = mean_over_ranks(total, sum(len(latents) for latents, _ in draws)) if metric != 'solver' else None
    return cost, results

def solver_error(net, draws, targets, sigmas, **solver_kwargs):
    """Mean L2 distance of the solver's results from the teacher's over the warm-up latents."""
    distances = [(solvers.sample(net, latents, class_labels, sigmas=sigmas, **solver_kwargs) - target).flatten(1).norm(dim=1)
                 for (latents, class_labels), target in zip(draws, targets)]
    return mean_over_ranks(torch.cat(distances).sum(), sum(len(d) for d in distances)).item()

def descend(error, sigmas, max_sweeps=20, step=0.25, min_step=0.01, progress=True):
    """Coordinate descent on log sigma of the inner levels: move one level by +-step (staying between
    its neighbours) while error(sigmas) goes down; halve the step after a sweep without a move.
    Returns (sigmas, error, evaluations)."""
    log_sigmas = sigmas.log()
    levels = lambda log_sigmas: torch.cat([sigmas[:1], log_sigmas[1:-1].exp(), sigmas[-1:]]) # ends kept exactly
    best, evaluations = error(sigmas), 1
    bar = tqdm.tqdm(total=max_sweeps, desc='descent', unit='sweep', disable=not progress)
    for _ in range(max_sweeps):
        moved = False
        for k in range(1, len(sigmas) - 1):
            for direction in (1, -1):
                trial = log_sigmas.clone()
                trial[k] += direction * step
                if not log_sigmas[k + 1] < trial[k] < log_sigmas[k - 1]:
                    continue
                value = error(levels(trial))
                evaluations += 1
                if value < best:
                    best, log_sigmas, moved = value, trial, True
                    break
        bar.update(1)
        bar.set_postfix(error=f'{best:.4g}', step=f'{step:.3g}')
        if not moved:
            step /= 2
            if step < min_step:
                break
    bar.close()
    return levels(log_sigmas), best, evaluations

def afs_level(error, teacher_sigmas, indices, progress=True):
    """GITS with AFS (diff-sampler's get_dp_list): the analytic first step saves a network call, spent
    on one level more: the teacher level k between the first two chosen whose levels give the least
    error(sigmas), the smallest k on ties. Returns (indices, their error, k); with no teacher level
    between the first two, the indices as they are and k None. Costs indices[1] - 1 solver runs."""
    best = (error(teacher_sigmas[indices]), indices, None) if indices[1] == 1 else (float('inf'), None, None)
    for k in tqdm.tqdm(range(1, indices[1]), desc='AFS level', unit='level', disable=not progress):
        candidate = indices[:1] + [k] + indices[1:]
        value = error(teacher_sigmas[candidate])
        if value < best[0]:
            best = (value, candidate, k)
    return best[1], best[0], best[2]

def search(net, draws, num_steps, teacher_steps=61, metric='dev', coeff=1.15, sigma_min=0.002, sigma_max=80,
           solver='ipndm', sweeps=20, check_draws=(), progress=True, **solver_kwargs):
    """The noise levels (float64 tensor) and a dict of how they were made, with the solver's error
    (solver_error) on them and on EDM's (rho 7) and log-SNR levels, over the warm-up latents and,
    if given, over the held-out check_draws."""
    if metric not in ('dev', 'l2', 'solver'):
        raise ValueError(f'unknown metric {metric!r}: choose dev, l2 or solver')
    teacher_sigmas = schedules.get_sigmas(TEACHER['disc'], teacher_steps, sigma_min, sigma_max, TEACHER['rho'], device=draws[0][0].device)
    solvers.check_solver(solver, teacher_sigmas[:num_steps], **solver_kwargs) # before the teacher runs
    cost, targets = teacher_costs(net, draws, teacher_sigmas, metric, progress)
    error = lambda sigmas: solver_error(net, draws, targets, sigmas, solver=solver, **solver_kwargs)
    fixed = {'edm': schedules.edm_sigmas(num_steps, sigma_min, sigma_max, 7, device=teacher_sigmas.device),
             'logsnr': schedules.logsnr_sigmas(num_steps, sigma_min, sigma_max, device=teacher_sigmas.device)}
    gits_afs = metric != 'solver' and solver_kwargs.get('afs', False)
    if gits_afs: # the found levels get an AFS level more: compare at their NFE
        fixed = {name: levels(num_steps + 1, sigma_min, sigma_max, device=teacher_sigmas.device) for name, levels in
                 [('edm', schedules.edm_sigmas), ('logsnr', schedules.logsnr_sigmas)]}
    errors = {name: error(sigmas) for name, sigmas in fixed.items()}
    if metric == 'solver':
        start = min(errors, key=errors.get)
        sigmas, errors['searched'], runs = descend(error, fixed[start], max_sweeps=sweeps, progress=progress)
        made = dict(start=start, solver_runs=runs + len(fixed))
    else:
        indices = best_path(cost.cpu().numpy(), num_steps, coeff)
        made = dict(indices=indices)
        if gits_afs:
            indices, errors['searched'], made['afs_level'] = afs_level(error, teacher_sigmas, indices, progress)
            made.update(indices=indices, gits_indices=made['indices'])
        else:
            errors['searched'] = error(teacher_sigmas[indices])
        sigmas = teacher_sigmas[indices]
    if check_draws: # the same comparison on latents the search has not seen
        _, check_targets = teacher_costs(net, check_draws, teacher_sigmas, 'solver', progress)
        made['held_out_errors'] = {name: solver_error(net, check_draws, check_targets, levels, solver=solver, **solver_kwargs)
                                   for name, levels in dict(fixed, searched=sigmas).items()}
    return sigmas, dict(made, errors=errors, teacher_nfe=teacher_steps - 1)

#----------------------------------------------------------------------------

@click.command()
@click.option('--network', 'network_path', help='Network snapshot (.pkl, URL or .safetensors)', metavar='PATH', required=True)
@click.option('--solver',                  help='Solver the levels are for (--metric=solver optimises its result)', type=click.Choice(list(solvers.SOLVERS)), default='ipndm', show_default=True)
@click.option('--steps', 'num_steps',      help='Noise levels to pick, sigma_max and sigma_min included (GITS with --afs adds one)', metavar='INT', type=click.IntRange(min=2), required=True)
@click.option('--seeds',                   help='Seeds of the warm-up latents (drawn as generate.py)', metavar='LIST', type=str, default='0-255', show_default=True)
@click.option('--check-seeds',             help='Held-out seeds on which the errors are also reported', metavar='LIST', type=str)
@click.option('--teacher-steps',           help='Levels of the teacher (iPNDM, EDM levels, rho 7)', metavar='INT', type=click.IntRange(min=3), default=61, show_default=True)
@click.option('--metric',                  help='Cost: GITS dev or l2 of one Euler jump, or the solver\'s final error', type=click.Choice(['dev', 'l2', 'solver']), default='dev', show_default=True)
@click.option('--coeff',                   help='GITS: weight growth per later jump', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1.15, show_default=True)
@click.option('--order',                   help='Max order of the solver  [default: the solver\'s]', metavar='INT', type=int)
@click.option('--afs',                     help='The solver uses the analytical first step (GITS: one level more, at the same NFE)', is_flag=True)
@click.option('--sweeps',                  help='--metric=solver: most sweeps of the coordinate descent', metavar='INT', type=click.IntRange(min=1), default=20, show_default=True)
@click.option('--sigma_min',               help='Smallest noise level', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.002, show_default=True)
@click.option('--sigma_max',               help='Largest noise level', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=80, show_default=True)
@click.option('--batch',                   help='Warm-up latents per batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--device',                  help='Device  [default: this process\'s GPU if any, else cpu]', metavar='STR', type=str)
@click.option('--out',                     help='JSON file to write', metavar='FILE', type=str, required=True)
def main(network_path, solver, num_steps, seeds, check_seeds, teacher_steps, metric, coeff, order, afs, sweeps, sigma_min, sigma_max, batch, device, out):
    """Search noise levels for --solver at --steps levels (GITS, or --metric=solver)."""
    seeds, check_seeds = seed_list(seeds, '--seeds'), seed_list(check_seeds, '--check-seeds')
    if num_steps > teacher_steps:
        raise click.BadParameter(f'{num_steps} levels cannot be picked from {teacher_steps} teacher levels; raise --teacher-steps', param_hint='--steps')
    if sigma_min >= sigma_max:
        raise click.BadParameter(f'--sigma_min {sigma_min} must be below --sigma_max {sigma_max}', param_hint='--sigma_min')
    dist.init() # under torchrun each process takes every world_size-th seed and the costs are summed
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for option, given in [('--seeds', seeds), ('--check-seeds', check_seeds)]:
        if given is not None and len(given) < world_size:
            raise click.BadParameter(f'{len(given)} seeds for {world_size} processes; give each process at least one', param_hint=option)
    device = dist.device() if device is None else torch.device(device)
    try:
        net = load_network(network_path, device=device, verbose=(rank == 0))
    except Exception as e: # unreadable, corrupt or not a network: one line, whatever the cause
        raise click.ClickException(f'Cannot load network "{network_path}": {" ".join(str(e).split())}')
    sigma_min, sigma_max = max(sigma_min, float(net.sigma_min)), min(sigma_max, float(net.sigma_max)) # the network's range

    draw = lambda seeds: [latents_for_seeds(net, chunk, device=device)[:2] for chunk in batches(seeds[rank::world_size], batch)]
    draws, check_draws = draw(seeds), draw(check_seeds or [])
    solver_kwargs = dict(afs=afs, **({} if order is None else dict(order=order)))
    start = time.time()
    try:
        with torch.no_grad():
            sigmas, made = search(net, draws, num_steps, teacher_steps, metric, coeff, sigma_min, sigma_max, solver, sweeps,
                                  check_draws, progress=(rank == 0), **solver_kwargs)
    except ValueError as e:
        raise click.ClickException(str(e))
    record = dict(sigmas=sigmas.tolist(), network=network_path, solver=solver, steps=num_steps, metric=metric,
                  coeff=coeff if metric != 'solver' else None, seeds=seed_text(seeds), check_seeds=seed_text(check_seeds),
                  teacher=dict(TEACHER, steps=teacher_steps, sigma_min=sigma_min, sigma_max=sigma_max), **solver_kwargs, **made,
                  processes=world_size, seconds=round(time.time() - start, 1))
    if rank != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
        json.dump(record, f, indent=1)
    print(f'{metric} levels for {solver}, {num_steps} levels: {", ".join(f"{s:.4g}" for s in sigmas.tolist())}')
    for key, count in [('errors', len(seeds)), ('held_out_errors', len(check_seeds or []))]:
        if key in made:
            print(f'{solver}\'s error against the teacher (mean L2 over {count} {key.replace("errors", "").replace("_", " ")}latents): ' +
                  ', '.join(f'{name} {value:.4g}' for name, value in made[key].items()))
    print(f'Wrote "{out}"; use: generate.py --solver={solver} --sigmas={out}')

if __name__ == '__main__':
    main()
