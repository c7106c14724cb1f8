"""What --aot-scope=global costs per pool: W processes (gloo on the CPU, as torchrun starts them)
build global pools of W x P random 3x32x32 images and unit noises, and report per pool the seconds
of their collectives (all_to_all of the cost rows, all_reduce of the permutation; waiting for the
slowest rank included), of the solve on the busiest rank, and of the whole build, beside the same
pools paired per rank (--aot-scope=gpu), and the bytes each rank sends and receives.

The collectives run on gloo (CPU tensors) on every backend, NCCL runs included: the cost rows are on
the host for the solver anyway. On a real network the time to move the bytes is bytes / bandwidth
(printed at 10 GB/s, e.g. a 100 Gb/s InfiniBand link); on one CPU machine the W processes share its
cores, so W = 8 on 2 cores measures contention more than communication.

    python bench/aot_scope_cost.py                           # W = 2, 4, 8; P = 512; 0 and 10 classes
    python bench/aot_scope_cost.py --world=2 --pool=256 --pools=2 --no-doc
"""

import json
import os
import subprocess
import sys
import tempfile

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One rank of the measurement, started by torchrun.
WORKER = r'''
import json, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from torch_utils import distributed as dist
from training.pools import GlobalExchange, PoolStream
pool, classes, pools, out, device = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]

class RandomImages: # the interface PoolStream reads: uint8 CHW images, one-hot labels
    image_shape = [3, 32, 32]
    def __init__(self, n, classes):
        rng = np.random.default_rng(0)
        self.images = rng.integers(0, 256, size=[n] + self.image_shape, dtype=np.uint8)
        self.classes, self.label_dim = rng.integers(0, max(classes, 1), size=n), classes
    def __len__(self):
        return len(self.images)
    def get_label(self, i):
        label = np.zeros(self.label_dim, np.float32)
        if self.label_dim:
            label[self.classes[i]] = 1
        return label
    def __getitem__(self, i):
        return self.images[i], self.get_label(i)

dist.init()
rank, world = dist.get_rank(), dist.get_world_size()
data = RandomImages(4 * world * pool, classes)
rows = {}
for scope in ['gpu', 'global']:
    exchange = GlobalExchange(rank, world, 0) if scope == 'global' else None
    stream = PoolStream(data, pool, rank=rank, num_replicas=world, exchange=exchange, device=dist.device() if device == 'auto' else device)
    stream.make_pool(0) # warm-up
    got = []
    for k in range(1, pools + 1):
        torch.distributed.barrier()
        start = time.perf_counter()
        stats = stream.make_pool(k)['stats']
        got.append(dict(stats, build_sec=time.perf_counter() - start))
    rows[scope] = {key: float(np.mean([g[key] for g in got])) for key in got[0]}
everything = [None] * world
torch.distributed.all_gather_object(everything, rows)
if rank == 0:
    json.dump(everything, open(out, 'w'))
'''

@click.command()
@click.option('--world', help='Process counts (comma list)', default='2,4,8', show_default=True)
@click.option('--pool', help='Pool per process P', type=int, default=512, show_default=True)
@click.option('--classes', help='Class counts (comma list; 0 = unconditional)', default='0,10', show_default=True)
@click.option('--pools', help='Pools timed per setting (after one warm-up)', type=int, default=3, show_default=True)
@click.option('--device', help='Where each process builds its pools: cpu, or auto (its GPU, as train.py --workers=0)', type=click.Choice(['cpu', 'auto']), default='cpu', show_default=True)
@click.option('--doc/--no-doc', help='Rewrite this bench\'s section of docs/benchmarks.md', default=True, show_default=True)
def main(world, pool, classes, pools, device, doc):
    env = report.machine()
    lines = ['## Global AOT pairing cost (`bench/aot_scope_cost.py`)', '',
             f'Per pool of P = {pool} random 3x32x32 images per process, built on {device}, mean of {pools} pools after a warm-up; gloo on one machine '
             '(the processes share its cores and GPU). gpu: each process pairs its own pool; global: one assignment over all W x P. '
             'Collectives: all_to_all of cost rows + all_reduce of the permutation on the rank that waited least for the others; '
             'solve: the busiest rank\'s; network: max bytes a rank receives at 10 GB/s.', '',
             '| W | classes | global pool | build gpu (s) | build global (s) | global / gpu | collectives (s) | solve (s) | max received (MB) | network (ms) |',
             '|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, 'worker.py')
        with open(script, 'w') as f:
            f.write(WORKER)
        for w in [int(x) for x in world.split(',')]:
            for c in [int(x) for x in classes.split(',')]:
                out = os.path.join(tmp, 'out.json')
                cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={w}', script, ROOT, str(pool), str(c), str(pools), out, device]
                subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.DEVNULL)
                ranks = json.load(open(out))
                gpu = max(r['gpu']['build_sec'] for r in ranks)
                glob = max(r['global']['build_sec'] for r in ranks)
                coll = min(r['global']['exchange_sec'] for r in ranks) # the rank that waited least for others
                solve = max(r['global']['solve_sec'] for r in ranks)
                received = max(r['global']['received_bytes'] for r in ranks)
                line = (f'| {w} | {c} | {w * pool} | {gpu:.3f} | {glob:.3f} | {glob / gpu:.1f} | {coll:.3f} | {solve:.3f} | '
                        f'{received / 1e6:.1f} | {received / 10e9 * 1e3:.1f} |')
                print(line, flush=True)
                lines.append(line)
    print('\n'.join(lines))
    if doc:
        report.update_section('aot_scope_cost', '\n'.join(lines), env)

if __name__ == '__main__':
    main()
