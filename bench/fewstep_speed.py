"""Few-step sampling speed against its floor, and the schedule search's cost against sampling.

Measured side by side in one run on one network and batch; rounds interleave the rows, so that load
changes hit them alike (medians kept). On CPU the times are the process's CPU time, which other
programs on a shared machine do not inflate; on CUDA wall time between synchronisations.

(a) generate.py's loop per batch (sampling.generate.generate_images and write_behind over --loop-batches batches:
    per-seed latents, the sampler generate.py builds for --solver=NAME --steps=N, uint8, and one PNG
    per seed written by a thread while the next batch samples) for each few-step solver and for
    EDM's Heun (no --solver, the reference), against its floor: NFE network forwards on the same
    batch. Goal: floor / loop >= 0.95 (the solver's own work at most 5%). Two ways: direct (the loop
    timed just after NFE forwards, the median of the rounds' ratios), and decomposed: the loop run
    with the network replaced by a stored output (NoNetwork) times everything but the network, the
    rest; floor / (floor + rest). On CPU the verdict is the decomposed ratio: CPU time counts the
    writing thread as if it ran in turn (the overlap is invisible), and on a busy machine the direct
    ratio moves by +-10% from round to round while the rest is small and measured alone. On CUDA it
    is the direct ratio: wall time is steady there, and only it shows the writes overlapping the GPU.
(b) tools/schedule_search.py's search at its defaults (GITS, --metric=dev, teacher iPNDM on 61 EDM
    levels, --coeff 1.15, with its report of the solver's errors) on the warm-up latents of
    --search-seeds, against generate.py sampling the same latents at the teacher's NFE
    (--solver=ipndm --steps=61): direct and decomposed (NFE per latent x one forward + the rest).
    Goal: the search costs less (sampling / search > 1).

    python bench/fewstep_speed.py                     # golden test network (16x16x3, random weights)
    python bench/fewstep_speed.py --network=runs/.../network-snapshot-000030.pkl
"""

import statistics
import tempfile
import time

import click
import torch

from bench import report
from bench.sampling_speed import golden_network
from tools import schedule_search
from sampling import generate as generation, schedules, solvers
from sampling.denoisers import MinBatchNet
from sampling.seeds import latents_for_seeds
from training.network_io import load_network

SAMPLERS = ['heun', *generation.FEW_STEP] # heun: EDM's sampler, generate.py without --solver

def generate_sampler(net, device, name, steps):
    """(sampler_fn, its keyword arguments, NFE) as generate.py builds them for --steps=steps and
    --solver=name (no --solver for heun), its other sampler options at their defaults."""
    defaults = dict(rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1) # generate.py's, which are EDM's
    sampler_kwargs = dict(num_steps=steps, **defaults, **({} if name == 'heun' else dict(solver=name)))
    sampler = generation.make_sampler(net, sampler_kwargs, device=device)
    return sampler.fn, sampler.kwargs, sampler.nfe

def bench_network(path, device):
    """(network, description): a snapshot, or by default the golden test network's architecture with random weights."""
    if path is None:
        return golden_network(device)
    try:
        return load_network(path, device=device, verbose=False), path
    except Exception as e: # unreadable, corrupt or not a network: one line
        raise click.ClickException(f'Cannot load network "{path}": {type(e).__name__}: {" ".join(str(e).split())}')

class NoNetwork:
    """The network's attributes, but a call returns a stored output at once: a loop run with it costs
    all but its network evaluations."""

    def __init__(self, net, output):
        self.net, self.output = net, output

    def __getattr__(self, name):
        return getattr(self.__dict__['net'], name)

    def __call__(self, x, sigma, class_labels=None, **kwargs):
        return self.output[:len(x)]

def generate_loop(model, sampler_fn, sampler_kwargs, draw, batches, outdir):
    """generate.py's loop over batches (lists of seeds): each sampled in turn, its PNGs written by a thread meanwhile."""
    write = lambda images, classes, seeds: generation.write_pngs(images, classes, seeds, outdir, False)
    for writing in generation.write_behind(generation.generate_images(model, sampler_fn, sampler_kwargs, batches, draw), write):
        writing.result()

def timed_rounds(rows, rounds, device, warm_up=True):
    """{name: [seconds per round]} of each fn of rows {name: fn}, run in turn in every round (round 0 warms up)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    clock = time.perf_counter if device.type == 'cuda' else time.process_time
    times = {name: [] for name in rows}
    for r in range(rounds + int(warm_up)):
        for name, fn in rows.items():
            sync(); start = clock(); fn(); sync()
            if r > 0 or not warm_up:
                times[name].append(clock() - start)
    return times

def verdict(ok):
    return 'meets' if ok else 'misses'

@click.command()
@click.option('--network',       help='Network snapshot  [default: the golden test network, random weights]', metavar='PATH', type=str)
@click.option('--batch',         help='Images per batch (sampling and search)', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--steps',         help='Noise levels of the solvers (generate.py --steps; Heun: 2N-1 NFE)', metavar='INT', type=click.IntRange(min=4), default=11, show_default=True)
@click.option('--solvers', 'names', help='Samplers of part (a), comma-separated', metavar='LIST', type=str, default=','.join(SAMPLERS), show_default=True)
@click.option('--rounds',        help='Timing rounds of part (a) (medians reported)', metavar='INT', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--loop-batches',  help='Batches per timed loop of part (a)  [default: 4 on CUDA, 1 on CPU]', metavar='INT', type=click.IntRange(min=1))
@click.option('--search-seeds',  help='Warm-up latents of the search (its default is 0-255)', metavar='LIST', type=str, default='0-255', show_default=True)
@click.option('--search-steps',  help='Levels the search picks (iPNDM, order 4: at least 5)', metavar='INT', type=click.IntRange(min=5), default=11, show_default=True)
@click.option('--teacher-steps', help='Levels of the search\'s teacher (its default)', metavar='INT', type=click.IntRange(min=3), default=61, show_default=True)
@click.option('--search-rounds', help='Timing rounds of part (b); 0 leaves it out', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True)
@click.option('--threads',       help='Torch threads  [default: torch default]', metavar='INT', type=click.IntRange(min=1))
@click.option('--device',        help='Device  [default: cuda if available]', metavar='STR', type=str)
@click.option('--doc/--no-doc',  help='Rewrite the section in docs/benchmarks.md', default=True, show_default=True)
def main(network, batch, steps, names, rounds, loop_batches, search_seeds, search_steps, teacher_steps, search_rounds, threads, device, doc):
    """Time the few-step solvers against NFE x one forward, and the schedule search against sampling."""
    names = [name.strip() for name in names.split(',') if name.strip()]
    unknown = [name for name in names if name not in SAMPLERS]
    if unknown or not names:
        raise click.BadParameter(f'{", ".join(unknown) or "none given"}: choose from {",".join(SAMPLERS)}', param_hint='--solvers')
    if search_rounds and search_steps > teacher_steps:
        raise click.BadParameter(f'{search_steps} levels cannot be picked from {teacher_steps} teacher levels', param_hint='--search-steps')
    search_seeds = schedule_search.seed_list(search_seeds, '--search-seeds')
    torch.set_num_threads(threads or torch.get_num_threads())
    env = report.machine() # before measuring: its load average
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    net, desc = bench_network(network, device)
    clock_name = 'wall' if device.type == 'cuda' else 'CPU'
    draw = lambda seeds: latents_for_seeds(net, seeds, device=device)
    print(env)

    # (a) generate.py's loop per sampler against NFE x one forward on the same batch.
    seeds = list(range(batch))
    samplers = {name: generate_sampler(net, device, name, steps) for name in names}
    latents, class_labels, _ = draw(seeds)
    x, sigma = latents.to(torch.float64), torch.as_tensor(1.0, dtype=torch.float64, device=device) # as the solvers call it
    with torch.no_grad():
        no_net = NoNetwork(net, net(x, sigma, class_labels))
    loop_batches = loop_batches or (4 if device.type == 'cuda' else 1)
    print(f'{desc}: batch {batch}, {steps} levels, {rounds} rounds + warm-up, {loop_batches} batches per loop')
    with torch.no_grad(), tempfile.TemporaryDirectory() as outdir:
        # Each loop right after its floor (NFE forwards), so that both see the same load; then the loop without the network.
        rows = {}
        for name, (fn, kwargs, nfe) in samplers.items():
            rows[f'{name} floor'] = (lambda nfe: lambda: [net(x, sigma, class_labels) for _ in range(nfe)])(nfe)
            for key, model in [(name, net), (f'{name} rest', no_net)]:
                rows[key] = (lambda model, fn, kwargs: lambda: generate_loop(model, fn, kwargs, draw, [seeds] * loop_batches, outdir))(model, fn, kwargs)
            rows[f'{name} solver'] = (lambda fn, kwargs: lambda: fn(MinBatchNet(no_net), latents, class_labels, randn_like=torch.randn_like, **kwargs))(fn, kwargs)
        times = timed_rounds(rows, rounds, device)
    for name in samplers: # per batch
        for key in [name, f'{name} rest']:
            times[key] = [t / loop_batches for t in times[key]]
    med = {name: statistics.median(values) for name, values in times.items()}
    one = statistics.median(t / samplers[name][2] for name in samplers for t in times[f'{name} floor'])
    lines = ['## Few-step sampling speed (`bench/fewstep_speed.py`)', '',
             f'{desc}, batch {batch}, `--steps={steps}`; medians of {rounds} interleaved rounds of {clock_name} time; one forward '
             f'{one:.4f} s. (a) generate.py\'s loop per batch ({loop_batches} batches per loop: latents, sampler, uint8, PNGs written by a '
             f'thread while the next batch samples) against its floor, NFE forwards '
             f'of the same batch timed just before it (direct: the median of the rounds\' ratios, and their range); and the same '
             f'loop with the network replaced by a stored output, which times all the rest (solver arithmetic, latents, PNGs): '
             f'floor / (floor + rest), with floor = NFE x one forward; and the solver alone without the network (its arithmetic).', '',
             f'| sampler | NFE | loop s | floor s | floor / loop, direct (range) | rest s | floor / (floor + rest) | solver alone s | floor / (floor + solver alone) |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    ratios, directs = {}, {}
    for name, (_, _, nfe) in samplers.items():
        direct = [floor / loop for floor, loop in zip(times[f'{name} floor'], times[name])]
        ratios[name], directs[name] = nfe * one / (nfe * one + med[f'{name} rest']), statistics.median(direct)
        label = 'heun (EDM, no --solver)' if name == 'heun' else f'`--solver={name}`'
        lines.append(f'| {label} | {nfe} | {med[name]:.3f} | {med[f"{name} floor"]:.3f} | {directs[name]:.3f} '
                     f'({min(direct):.3f}-{max(direct):.3f}) | {med[f"{name} rest"]:.4f} | {ratios[name]:.3f} | '
                     f'{med[f"{name} solver"]:.4f} | {nfe * one / (nfe * one + med[f"{name} solver"]):.3f} |')
    # CPU time counts the writing thread in full, so on CPU the decomposed ratio is the verdict; on CUDA the direct one.
    judged, which = (directs, 'floor / loop, direct') if device.type == 'cuda' else (ratios, 'floor / (floor + rest)')
    worst = min(judged, key=judged.get)
    lines += ['', f'Lowest {which}: {worst} at {judged[worst]:.3f}: {verdict(judged[worst] >= 0.95)} the goal (>= 0.95 for every solver).']

    # (b) the search at its defaults against sampling its warm-up latents at the teacher's NFE.
    if search_rounds:
        teacher_fn, teacher_kwargs, teacher_nfe = generate_sampler(net, device, 'ipndm', teacher_steps)
        chunks = schedule_search.batches(search_seeds, batch)
        sigma_min, sigma_max = max(0.002, float(net.sigma_min)), min(80, float(net.sigma_max)) # as schedule_search.py clips them
        teacher_sigmas = schedules.get_sigmas('edm', teacher_steps, sigma_min, sigma_max, 7, device=device)
        report_nfe = 3 * solvers.nfe('ipndm', search_steps)
        def sample(model, outdir):
            generate_loop(model, teacher_fn, teacher_kwargs, draw, chunks, outdir)
        def gits(model): # the search without its error report: teacher, jump costs, dynamic programme
            cost, _ = schedule_search.teacher_costs(model, [draw(chunk)[:2] for chunk in chunks], teacher_sigmas, 'dev', progress=False)
            schedule_search.best_path(cost.cpu().numpy(), search_steps, 1.15)
        def search(model):
            schedule_search.search(model, [draw(chunk)[:2] for chunk in chunks], search_steps, teacher_steps,
                                   sigma_min=sigma_min, sigma_max=sigma_max, progress=False)
        with torch.no_grad(), tempfile.TemporaryDirectory() as outdir:
            print(f'search: {len(search_seeds)} warm-up latents, {search_steps} of {teacher_steps} teacher levels, {search_rounds} rounds')
            rows = dict(sample=lambda: sample(net, outdir), gits=lambda: gits(net), search=lambda: search(net),
                        **{'sample rest': lambda: sample(no_net, outdir), 'gits rest': lambda: gits(no_net), 'search rest': lambda: search(no_net)})
            times = timed_rounds(rows, search_rounds, device, warm_up=False)
        med = {name: statistics.median(values) for name, values in times.items()}
        forwards_time = lambda nfe: nfe * one * len(search_seeds) / batch # NFE forwards of every latent, at one forward per batch
        nfes = dict(sample=teacher_nfe, gits=teacher_nfe, search=teacher_nfe + report_nfe)
        model = {key: forwards_time(nfes[key]) + med[f"{key} rest"] for key in nfes}
        lines += ['', f'(b) `tools/schedule_search.py --steps={search_steps}` at its defaults (GITS `--metric=dev`, teacher iPNDM on '
                      f'{teacher_steps} EDM levels = {teacher_nfe} NFE, `--coeff=1.15`) on the {len(search_seeds)} warm-up latents of seeds '
                      f'{schedule_search.seed_text(search_seeds)}, against generate.py sampling them at the teacher\'s NFE; medians of '
                      f'{search_rounds} interleaved rounds of {clock_name} time. Direct: as timed; rest: the same with the network '
                      f'replaced by a stored output; decomposed: NFE per latent x one forward per {batch} latents + rest.', '',
                  f'| what | NFE per latent | direct s | sampling / this, direct | rest s | decomposed s | sampling / this, decomposed |',
                  '|---|---:|---:|---:|---:|---:|---:|']
        for key, label in [('sample', f'generate.py loop, `--solver=ipndm --steps={teacher_steps}`'),
                           ('gits', 'search without its error report: teacher, jump costs, dynamic programme'),
                           ('search', 'search: the above + iPNDM on EDM, log-SNR and the found levels')]:
            lines.append(f'| {label} | {nfes[key]} | {med[key]:.2f} | {med["sample"] / med[key]:.3f} | {med[f"{key} rest"]:.2f} | '
                         f'{model[key]:.2f} | {model["sample"] / model[key]:.3f} |')
        lines += ['', f'Search at {model["search"] / model["sample"]:.3f} of the sampling time (decomposed; direct {med["search"] / med["sample"]:.3f}): '
                      f'{verdict(model["search"] < model["sample"])} the goal (< 1); without its error report at {model["gits"] / model["sample"]:.3f} '
                      f'(direct {med["gits"] / med["sample"]:.3f}).']
    print('\n'.join(lines))
    if doc:
        report.update_section(f'fewstep_speed{"" if network is None else "_network"}', '\n'.join(lines), env)

if __name__ == '__main__':
    main()
