"""generate.py end to end: seed-exact PNGs across batch sizes, processes and network formats; errors."""

import copy
import json
import os
import shlex
import signal
import subprocess
import time
import sys
import numpy as np
import PIL.Image
import pytest
import torch
from sampling import schedules, solvers
from sampling.edm import ablation_sampler, edm_sampler
from sampling.seeds import latents_for_seeds
from sampling.images import to_uint8
from training.testdata import load_golden_network
from tests.helpers import CPU, finish_generate as finish, pngs, start_generate as start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ['--steps=4'] # 7 NFE: fast, and enough to go through every part of the sampler

# One thread per process (as torchrun sets it): several runs go in parallel on a small machine,
# and idle OpenMP threads spinning against each other cost more than the sampling itself.

def start_torchrun(args, nproc=2):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', 'generate.py', *args]
    return subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

def expected_images(net, seeds, **kwargs):
    """What generate.py must write: the sampler run in this process on the same seeds."""
    latents, class_labels, rnd = latents_for_seeds(net, seeds, **kwargs)
    with torch.no_grad():
        return to_uint8(edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=4))

#----------------------------------------------------------------------------

@pytest.mark.slow
def test_same_pngs_for_any_batch_process_count_and_format(nets, tmp_path):
    seeds = list(range(10))
    runs = {
        'batch1': start(['--network', nets['pkl'], '--outdir', str(tmp_path / 'batch1'), '--seeds=0-9', '--batch=1', *STEPS, *CPU]),
        'batch7': start(['--network', nets['pkl'], '--outdir', str(tmp_path / 'batch7'), '--seeds=0-4,5-9', '--batch=7',
                         '--grid', str(tmp_path / 'grids' / 'grid.png'), *STEPS, *CPU]),
        'torchrun': start_torchrun(['--network', nets['pkl'], '--outdir', str(tmp_path / 'torchrun'), '--seeds=0-9', '--batch=3', *STEPS, *CPU]),
        'safe_subdirs': start(['--network', nets['safe'], '--outdir', str(tmp_path / 'safe'), '--seeds=0-4,998-1001', '--subdirs',
                               '--batch=4', *STEPS, *CPU]),
    }
    results = {name: finish(proc) for name, proc in runs.items()}
    for name, (code, out, err) in results.items():
        assert code == 0, f'{name} failed:\n{out}\n{err}'

    # The sampler summary is printed once, also with two processes.
    for name, (code, out, err) in results.items():
        assert out.count('7 NFE per image') == 1, out
        assert 'sigma 80, 9.723, 0.47, 0.002, 0' in out

    expected = dict(zip(seeds, expected_images(nets['net'], seeds)))
    for name in ['batch1', 'batch7', 'torchrun']:
        images = pngs(tmp_path / name)
        assert sorted(images) == [f'{s:06d}.png' for s in seeds], name
        for s in seeds:
            assert np.array_equal(images[f'{s:06d}.png'], expected[s]), f'{name}: seed {s} differs'

    # Safe format gives the same images; --subdirs puts seed s in folder s - s % 1000.
    safe = pngs(tmp_path / 'safe')
    layout = {s: f'{s - s % 1000:06d}/{s:06d}.png' for s in [0, 1, 2, 3, 4, 998, 999, 1000, 1001]}
    assert sorted(safe) == sorted(layout.values())
    assert layout[1000] == '001000/001000.png' and layout[999] == '000000/000999.png'
    for s in range(5):
        assert np.array_equal(safe[layout[s]], expected[s])
    for s, image in zip([998, 999, 1000, 1001], expected_images(nets['net'], [998, 999, 1000, 1001])):
        assert np.array_equal(safe[layout[s]], image)

    # The grid tiles the images in seed order: 10 images -> 4 columns, 3 rows of 16x16.
    grid = np.array(PIL.Image.open(tmp_path / 'grids' / 'grid.png'))
    assert grid.shape == (3 * 16, 4 * 16, 3)
    assert np.array_equal(grid[16:32, 16:32], expected[5]) and np.array_equal(grid[32:48, 16:32], expected[9])
    assert not grid[32:48, 32:].any() # empty cells

@pytest.mark.slow
def test_forced_class_with_ablation_sampler(nets, tmp_path):
    args = ['--seeds=3-5', '--class=2', '--solver=euler', '--disc=vp', '--schedule=vp', '--scaling=vp', *STEPS, *CPU]
    code, out, err = finish(start(['--network', nets['pkl'], '--outdir', str(tmp_path), *args]))
    assert code == 0, f'{out}\n{err}'
    assert 'Sampler: ablation_sampler, 4 steps, 4 NFE per image' in out
    net = nets['net']
    latents, class_labels, rnd = latents_for_seeds(net, [3, 4, 5], class_idx=2)
    assert class_labels.argmax(1).tolist() == [2, 2, 2]
    with torch.no_grad():
        expected = to_uint8(ablation_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=4,
                                                      solver='euler', discretization='vp', schedule='vp', scaling='vp'))
    images = pngs(tmp_path)
    for s, image in zip([3, 4, 5], expected):
        assert np.array_equal(images[f'{s:06d}.png'], image)

#----------------------------------------------------------------------------
# Continuing in a folder that has some of the images: after Ctrl-C, with --force, across processes.

def read_bytes(outdir):
    """{relative path: file bytes} of every PNG under outdir."""
    return {name: (outdir / name).read_bytes() for name in pngs(outdir)}

def listed(outdir):
    """dataset.json's labels as [name, label] pairs, with each name checked to be listed once."""
    labels = json.loads((outdir / 'dataset.json').read_text())['labels']
    assert len({name for name, _ in labels}) == len(labels), labels
    return labels

def record(outdir):
    """sampling.json's entries: how the images were made."""
    return json.loads((outdir / 'sampling.json').read_text())['samplers']

def expected_labels(net, seeds, subdirs=False):
    labels = latents_for_seeds(net, seeds)[1].argmax(1).tolist()
    return sorted([f'{s - s % 1000:06d}/{s:06d}.png' if subdirs else f'{s:06d}.png', label] for s, label in zip(seeds, labels))

@pytest.mark.slow
def test_interrupted_run_continues_with_the_same_images(nets, tmp_path):
    args = ['--network', nets['pkl'], '--seeds=993-1004', '--subdirs', '--batch=2', *STEPS, *CPU]
    whole = start([*args, '--outdir', str(tmp_path / 'whole')])
    parts = tmp_path / 'parts'
    proc = start([*args, '--outdir', str(parts)])
    while proc.poll() is None and not any(n.endswith('.png') for _, _, files in os.walk(parts) for n in files):
        time.sleep(0.02) # Ctrl-C once the first PNG is written
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    done = pngs(parts)
    assert code == 130 and 0 < len(done) < 12, f'{code} {sorted(done)}\n{err}'
    assert f'Interrupted: {len(done)} of 12 images are in "{parts}" and listed in its dataset.json' in err, err
    assert [name for name, _ in listed(parts)] == sorted(done) # every PNG there, and only those

    [entry] = record(parts)
    assert entry['images'] == sorted(done) and entry['nfe'] == 7 # every PNG there is recorded, and only those

    # A write cut off by a harder kill: a temporary file, and the last PNG not yet in dataset.json nor sampling.json.
    (parts / '000000' / '000999.png.tmp-0123456789abcdef0123456789abcdef').write_bytes(b'half a PNG')
    (parts / 'dataset.json').write_text(json.dumps(dict(labels=listed(parts)[:-1])))
    (parts / 'sampling.json').write_text(json.dumps(dict(samplers=[dict(entry, images=entry['images'][:-1])])))

    command = shlex.split(err.strip().splitlines()[-1]) # the command the message gives
    assert command[:2] == ['python', 'generate.py'] and command[2:] == [*args, '--outdir', str(parts)], command
    code, out, err = finish(start(command[2:]))
    assert code == 0, f'{out}\n{err}'
    assert f'Generating {12 - len(done)} images' in out and f'{len(done)} of the 12 are there already' in out, out
    code, out, err = finish(whole)
    assert code == 0, f'{out}\n{err}'
    assert read_bytes(parts) == read_bytes(tmp_path / 'whole') # byte for byte
    assert listed(parts) == listed(tmp_path / 'whole') == expected_labels(nets['net'], list(range(993, 1005)), subdirs=True)
    assert record(parts) == record(tmp_path / 'whole')

def read_until(stream, text):
    """Read stream (text mode) up to and including the first occurrence of text."""
    seen = ''
    while not seen.endswith(text):
        char = stream.read(1)
        assert char, f'stream ended before "{text}":\n{seen}'
        seen += char
    return seen

@pytest.mark.slow
def test_second_ctrl_c_stops_at_once(nets, tmp_path):
    # One batch of 64 images takes seconds here: the first Ctrl-C waits for it, the second does not.
    proc = start(['--network', nets['pkl'], '--outdir', str(tmp_path), '--seeds=0-63', *STEPS, *CPU])
    read_until(proc.stderr, '0%|') # the progress bar starts once the handler is in place
    proc.send_signal(signal.SIGINT)
    read_until(proc.stderr, 'stopping after this batch')
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    assert code == 1 and err.rstrip().endswith('Aborted!') and 'Interrupted:' not in err, f'{code}\n{err}' # click's word for Ctrl-C
    assert not pngs(tmp_path) # nothing half-written: no temporary file either

@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_every_rank_cleanly(nets, tmp_path):
    # A terminal's Ctrl-C goes to torchrun's process group (its workers run in sessions of their own)
    # and torchrun passes it on: every worker must stop after the same batch, not die mid-way.
    args = ['--network', nets['pkl'], '--outdir', str(tmp_path), '--seeds=0-23', '--batch=2', *STEPS, *CPU]
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'generate.py', *args],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    while proc.poll() is None and not any(n.endswith('.png') for n in os.listdir(tmp_path)):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    code, out, err = finish(proc)
    done = pngs(tmp_path)
    assert code != 0 and 0 < len(done) < 24, f'{code} {sorted(done)}\n{err}'
    assert f'Interrupted: {len(done)} of 24 images are in "{tmp_path}" and listed in its dataset.json. Continue with:\n' \
           f'  torchrun --standalone --nproc_per_node=2 generate.py {shlex.join(args)}\n' in err, err
    assert [name for name, _ in listed(tmp_path)] == sorted(done)
    code, out, err = finish(start(args)) # one process continues what two began
    assert code == 0, f'{out}\n{err}'
    expected = expected_images(nets['net'], list(range(24)))
    images = pngs(tmp_path)
    assert sorted(images) == [f'{s:06d}.png' for s in range(24)]
    assert all(np.array_equal(images[f'{s:06d}.png'], expected[s]) for s in range(24))
    assert listed(tmp_path) == expected_labels(nets['net'], list(range(24)))

def test_pngs_are_written_while_the_next_batch_samples(nets, tmp_path, monkeypatch):
    # The PNGs of a batch are written by a thread while the next batch samples (on a GPU the writes
    # would otherwise leave it idle): each write waits here until the next batch has started sampling.
    import threading
    from click.testing import CliRunner
    import generate
    import sampling.generate as library # generate.py's loop: library.generate_images and write_pngs
    sampled, writes, change = [], [], threading.Condition()
    real_sample, real_write = library.sample_batch, library.write_pngs
    def sample_batch(net, sampler_fn, sampler_kwargs, draw, batch_seeds):
        with change:
            sampled.append(batch_seeds[0])
            change.notify_all()
        return real_sample(net, sampler_fn, sampler_kwargs, draw, batch_seeds)
    def write_pngs(images, classes, batch_seeds, outdir, subdirs):
        with change: # the last batch has no next one
            overlapped = batch_seeds[0] == 4 or change.wait_for(lambda: sampled[-1] > batch_seeds[0], timeout=10)
        writes.append((batch_seeds[0], overlapped, threading.current_thread() is not threading.main_thread()))
        return real_write(images, classes, batch_seeds, outdir, subdirs)
    monkeypatch.setattr(library, 'sample_batch', sample_batch)
    monkeypatch.setattr(library, 'write_pngs', write_pngs)
    result = CliRunner().invoke(generate.main, ['--network', nets['pkl'], '--outdir', str(tmp_path), '--seeds=0-5', '--batch=2', *STEPS, *CPU])
    assert result.exit_code == 0, result.output
    assert writes == [(0, True, True), (2, True, True), (4, True, True)]
    expected = expected_images(nets['net'], list(range(6)))
    images = pngs(tmp_path)
    assert sorted(images) == [f'{s:06d}.png' for s in range(6)] and all(np.array_equal(images[f'{s:06d}.png'], expected[s]) for s in range(6))
    assert listed(tmp_path) == expected_labels(nets['net'], list(range(6))) and record(tmp_path)[0]['images'] == sorted(images)

@pytest.mark.slow
def test_failed_write_stops_every_rank_and_keeps_what_is_written(nets, tmp_path):
    # A write that fails on one rank (here a folder where rank 1's PNG of seed 6 goes; on a cluster a
    # full disk or quota) must stop both ranks with one line, with every written PNG listed.
    (tmp_path / '000006.png').mkdir()
    args = ['--network', nets['pkl'], '--outdir', str(tmp_path), '--seeds=0-7', '--batch=2', *STEPS, *CPU]
    code, out, err = finish(start_torchrun(args))
    [line] = [line for line in err.splitlines() if line.startswith('Error:')] # one line (torchrun adds its own report)
    assert code != 0 and line.startswith('Error: Cannot write the images: [Errno 21] Is a directory') and '000006.png' in line, err
    done = pngs(tmp_path) # and no temporary file
    assert sorted(done) == [f'{s:06d}.png' for s in range(6)] and f'6 of 8 are in "{tmp_path}"' in line, (sorted(done), line)
    assert [name for name, _ in listed(tmp_path)] == sorted(done) and record(tmp_path)[0]['images'] == sorted(done)
    (tmp_path / '000006.png').rmdir()
    code, out, err = finish(start(args))
    assert code == 0 and 'Generating 2 images' in out, f'{out}\n{err}'
    expected = expected_images(nets['net'], list(range(8)))
    images = pngs(tmp_path)
    assert sorted(images) == [f'{s:06d}.png' for s in range(8)] and all(np.array_equal(images[f'{s:06d}.png'], expected[s]) for s in range(8))
    assert listed(tmp_path) == expected_labels(nets['net'], list(range(8)))

@pytest.mark.slow
def test_existing_images_are_kept_unless_forced(nets, tmp_path):
    args = ['--network', nets['pkl'], '--outdir', str(tmp_path), '--seeds=0-3', *STEPS, *CPU]
    assert finish(start(args))[0] == 0
    expected = expected_images(nets['net'], [0, 1, 2, 3])
    PIL.Image.fromarray(np.zeros_like(expected[2])).save(tmp_path / '000002.png') # stands for an image made with other options
    os.remove(tmp_path / '000003.png')
    code, out, err = finish(start(args))
    assert code == 0 and 'Generating 1 images' in out and '3 of the 4 are there already' in out, f'{out}\n{err}'
    images = pngs(tmp_path)
    assert not images['000002.png'].any() and np.array_equal(images['000003.png'], expected[3])
    code, out, err = finish(start([*args, '--force']))
    assert code == 0 and 'Generating 4 images' in out, f'{out}\n{err}'
    images = pngs(tmp_path)
    assert all(np.array_equal(images[f'{s:06d}.png'], expected[s]) for s in range(4))
    assert listed(tmp_path) == expected_labels(nets['net'], [0, 1, 2, 3])

@pytest.mark.slow
def test_two_processes_continue_a_folder_and_merge_the_labels(nets, tmp_path):
    common = ['--network', nets['pkl'], '--outdir', str(tmp_path), '--batch=2', *STEPS, *CPU]
    assert finish(start([*common, '--seeds=0-4']))[0] == 0
    before = read_bytes(tmp_path)
    code, out, err = finish(start_torchrun([*common, '--seeds=0-12']))
    assert code == 0, f'{out}\n{err}'
    assert 'Generating 8 images' in out
    images = pngs(tmp_path)
    assert sorted(images) == [f'{s:06d}.png' for s in range(13)]
    assert all(read_bytes(tmp_path)[name] == data for name, data in before.items()) # kept, not made again
    expected = expected_images(nets['net'], list(range(13)))
    assert all(np.array_equal(images[f'{s:06d}.png'], expected[s]) for s in range(13))
    assert listed(tmp_path) == expected_labels(nets['net'], list(range(13))) # both ranks' images and the earlier run's

def error_line(err):
    lines = [line for line in err.splitlines() if line.startswith('Error')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]

def warning_lines(err):
    return [line for line in err.splitlines() if line.startswith('Warning')]

@pytest.mark.slow
def test_sampler_settings_recorded_per_image(nets, tmp_path):
    """sampling.json says which settings made each image, also when a forced run with other settings
    stops part way; a run that keeps images of other settings beside its own says so in one line."""
    common = ['--network', nets['uncond'], '--outdir', str(tmp_path), *CPU]
    heun, ipndm = [*STEPS], ['--solver=ipndm', '--steps=20'] # 19 NFE: the forced run below lasts long enough to be stopped part way
    assert finish(start([*common, '--seeds=0-11', *heun]))[0] == 0
    # The same settings with a default spelled out continue the folder as one sample set.
    code, out, err = finish(start([*common, '--seeds=0-13', *heun, '--rho=7']))
    assert code == 0 and 'Generating 2 images' in out and not warning_lines(err), err
    assert [(e['sampler'], e['nfe'], e['images']) for e in record(tmp_path)] == [('sampling.edm_sampler', 7, [f'{s:06d}.png' for s in range(14)])]

    # A forced run with other settings, stopped after its first batches: each image recorded as made.
    proc = start([*common, '--seeds=0-13', *ipndm, '--force', '--batch=1'])
    while proc.poll() is None and 'solvers.sample' not in (tmp_path / 'sampling.json').read_text():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    code, out, err = finish(proc)
    entries = {e['sampler']: e['images'] for e in record(tmp_path)}
    assert code == 130 and 0 < len(entries['solvers.sample']) < 14 and not warning_lines(err), f'{code} {entries}\n{err}'
    assert sorted(entries['solvers.sample'] + entries['sampling.edm_sampler']) == [f'{s:06d}.png' for s in range(14)]
    net = load_golden_network('networks/ddpmpp_edm_uncond.npz', 'networks/ddpmpp_edm_uncond.json')
    latents = latents_for_seeds(net, list(range(14)))[0]
    with torch.no_grad():
        made = {'sampling.edm_sampler': expected_images(net, list(range(14))),
                'solvers.sample': to_uint8(solvers.sample(net, latents, solver='ipndm', sigmas=schedules.edm_sigmas(20)))}
    images = pngs(tmp_path)
    assert all(np.array_equal(images[name], made[sampler][int(name[:6])]) for sampler, names in entries.items() for name in names)

    # Its continue command (which drops --force) keeps Heun's images beside iPNDM's: it says so, and the record stays true.
    command, before = shlex.split(err.strip().splitlines()[-1]), record(tmp_path)
    code, out, err = finish(start(command[2:]))
    [warning] = warning_lines(err)
    heun_left = len(entries['sampling.edm_sampler'])
    assert code == 0 and 'Generating 0 images' in out, err
    assert warning.startswith(f'Warning: {heun_left} images in "{tmp_path}" (e.g. {entries["sampling.edm_sampler"][0]}) were made with other sampler settings '
                              '(sampler "sampling.edm_sampler" -> "solvers.sample"; nfe 7 -> 19; options.num_steps 4 -> null); '
                              'they are kept and sampling.json records how each image was made (--force makes them again, '), warning
    assert record(tmp_path) == before

def test_unreadable_record_in_outdir_is_one_line(bad_input_env):
    from click.testing import CliRunner
    import generate
    outdir = bad_input_env['tmp'] / 'out'
    outdir.mkdir()
    (outdir / 'sampling.json').write_text('{"samplers": [{"nfe": 7}]}')
    result = CliRunner().invoke(generate.main, ['--network', bad_input_env['pkl'], '--outdir', str(outdir), '--seeds=0-1', *STEPS, *CPU])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert f"{outdir / 'sampling.json'} is not generate.py's record of how its images were made" in error_line(result.stderr)
    assert os.listdir(outdir) == ['sampling.json']

@pytest.mark.slow
def test_unreadable_labels_in_outdir_stop_every_rank(nets, tmp_path):
    # Rank 0 reads the folder; the other rank must not wait for it forever.
    (tmp_path / 'dataset.json').write_text('{"labels": [["000000.png", 3]')
    code, out, err = finish(start_torchrun(['--network', nets['pkl'], '--outdir', str(tmp_path), '--seeds=0-3', *STEPS, *CPU]))
    errors = [line for line in err.splitlines() if line.startswith('Error:')]
    assert code != 0 and len(errors) == 1 and f'{tmp_path / "dataset.json"} is not a dataset.json of class labels' in errors[0], err
    assert os.listdir(tmp_path) == ['dataset.json'] and (tmp_path / 'dataset.json').read_text() == '{"labels": [["000000.png", 3]'

BAD_INPUTS = {
    # name: (arguments, text the error line must contain)
    'missing network': (['--network={tmp}/nope.pkl'], 'nope.pkl'),
    'corrupt network': (['--network={tmp}/garbage.pkl'], 'garbage.pkl'),
    'malformed seeds': (['--network={pkl}', '--seeds=0-x'], '--seeds'),
    'reversed range':  (['--network={pkl}', '--seeds=7-5'], 'empty'),
    'repeated seed':   (['--network={pkl}', '--seeds=0-3,2'], 'more than once'),
    'huge range':      (['--network={pkl}', '--seeds=0-99999999999'], 'more than the 10,000,000 one run takes'),
    'seed over 2^32':  (['--network={pkl}', '--seeds=4294967296'], 'above 4294967295'),
    'class uncond':    (['--network={uncond}', '--class=1'], 'unconditional'),
    'class range':     (['--network={pkl}', '--class=10'], 'out of range'),
    'unknown solver':  (['--network={pkl}', '--solver=rk4'], '--solver'),
    'unknown disc':    (['--network={pkl}', '--disc=cosine'], '--disc'),
    'one step':        (['--network={pkl}', '--steps=1'], '--steps'),
    'sigma order':     (['--network={pkl}', '--sigma_min=5', '--sigma_max=1'], '--sigma_min'),
    'sigma range':     (['--network={uncond}', '--sigma_min=100', '--sigma_max=200', '--disc=vp'], 'not finite'),
    'bad device':      (['--network={pkl}', '--device=tpu7'], '--device'),
}
SUBPROCESS_CASES = ['missing network', 'class uncond'] # the rest run in this process, which is faster

@pytest.fixture
def bad_input_env(nets, tmp_path):
    (tmp_path / 'garbage.pkl').write_bytes(b'this is not a pickle')
    yield dict(tmp=tmp_path, pkl=nets['pkl'], uncond=nets['uncond'])
    if torch.distributed.is_initialized(): # generate.main joined a one-process group in this process
        torch.distributed.destroy_process_group()

@pytest.mark.slow
@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_fails_cleanly(case, bad_input_env):
    from click.testing import CliRunner
    import generate
    args, expected = BAD_INPUTS[case]
    outdir = bad_input_env['tmp'] / 'out'
    args = [a.format(**bad_input_env) for a in args] + ['--outdir', str(outdir)]
    args += [] if any(a.startswith('--seeds') for a in args) else ['--seeds=0-1']
    args += [] if any(a.startswith('--steps') for a in args) else STEPS
    if case in SUBPROCESS_CASES:
        code, out, err = finish(start(args))
    else:
        result = CliRunner().invoke(generate.main, args)
        assert isinstance(result.exception, SystemExit), f'{case}: {result.exception!r}'
        code, err = result.exit_code, result.stderr
    lines = err.strip().splitlines()
    assert code != 0, f'{case}: exit code 0'
    assert 'Traceback' not in err, f'{case}: traceback instead of a message:\n{err}'
    assert lines and lines[-1].startswith('Error:') and expected in lines[-1], f'{case}: {err}'
    assert not outdir.exists(), f'{case}: output directory created'

@pytest.mark.slow
def test_rho_and_steps_reach_the_sampler(nets, tmp_path):
    # The paper's settings (EDM-AOT: --rho 90 --steps 14 unconditional, --rho 72 --steps 15 conditional).
    settings = [(90, 14), (72, 15)]
    runs = {(rho, steps): start(['--network', nets['pkl'], '--outdir', str(tmp_path / f'rho{rho}'), '--seeds=0-3',
                                 f'--rho={rho}', f'--steps={steps}', *CPU]) for rho, steps in settings}
    net = nets['net']
    for (rho, steps), proc in runs.items():
        code, out, err = finish(proc)
        assert code == 0, f'{out}\n{err}'
        assert f'{steps} steps, {2 * steps - 1} NFE per image' in out
        latents, class_labels, rnd = latents_for_seeds(net, [0, 1, 2, 3])
        with torch.no_grad():
            expected = to_uint8(edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=steps, rho=rho))
            rho7 = to_uint8(edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=steps))
        images = pngs(tmp_path / f'rho{rho}')
        assert sorted(images) == [f'{s:06d}.png' for s in range(4)]
        for s in range(4):
            assert np.array_equal(images[f'{s:06d}.png'], expected[s]), f'rho {rho}: seed {s} differs'
            # rho matters here: the same steps with EDM's rho 7 give other pixels.
            assert (expected[s] != rho7[s]).mean() > 0.05, f'rho {rho}: seed {s} same as rho 7'

@pytest.mark.slow
def test_cuda_images_match_the_sampler_on_cuda(nets, tmp_path):
    # On CUDA, generate.py draws each seed's latents with a CUDA generator, as EDM's generate.py does.
    if not torch.cuda.is_available():
        pytest.skip('needs a CUDA device: compares generate.py on CUDA with the sampler run here on CUDA')
    code, out, err = finish(start(['--network', nets['pkl'], '--outdir', str(tmp_path), '--seeds=0-3', '--device=cuda', *STEPS]))
    assert code == 0, f'{out}\n{err}'
    net = copy.deepcopy(nets['net']).cuda()
    latents, class_labels, rnd = latents_for_seeds(net, [0, 1, 2, 3], device='cuda')
    with torch.no_grad():
        expected = to_uint8(edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like, num_steps=4))
    images = pngs(tmp_path)
    got = np.stack([images[f'{s:06d}.png'] for s in range(4)]).astype(int)
    assert np.abs(got - expected).max() <= 1 # same kernels; allow a rounding boundary
    assert np.abs(got - expected_images(nets['net'], [0, 1, 2, 3])).mean() > 5 # CPU generators: other images

def test_sigma_min_above_the_samplers_sigma_max_names_the_usable_range(bad_input_env):
    # EDMPrecond's own range is [0, inf]; the message must give the sigma_max the sampler really uses (EDM's 80).
    from click.testing import CliRunner
    import generate
    result = CliRunner().invoke(generate.main, ['--network', bad_input_env['pkl'], '--outdir', str(bad_input_env['tmp'] / 'out'),
        '--seeds=0-1', '--sigma_min=100', *STEPS])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith('Error:') and '--sigma_min must be below sigma_max = 80 ' in line and '[0, inf]' not in line, line
