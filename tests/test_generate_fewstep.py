"""generate.py with the few-step solvers of sampling/solvers.py: the same images as the solver run
here, at any batch size; NFE printed; --sigmas from a list or a JSON file; --afs; bad input in one line."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
from sampling import schedules, solvers
from sampling.seeds import latents_for_seeds
from sampling.images import to_uint8
from tests.helpers import CPU, finish_generate as finish, pngs, start_generate as start

def expected(net, seeds, **kwargs):
    latents, class_labels, _ = latents_for_seeds(net, seeds)
    with torch.no_grad():
        return to_uint8(solvers.sample(net, latents, class_labels, **kwargs))

@pytest.mark.slow
def test_few_step_images_nfe_and_sigmas(nets, tmp_path):
    net, seeds = nets['net'], [0, 1, 2, 3]
    levels = schedules.get_sigmas('logsnr', 6, 0.002, 80)
    (tmp_path / 'levels.json').write_text(json.dumps(dict(sigmas=levels.tolist())))
    runs = {
        'batch1': ['--solver=ipndm', '--steps=6', '--batch=1'],
        'batch3': ['--solver=ipndm', '--steps=6', '--batch=3'],
        'json':   ['--solver=unipc', f'--sigmas={tmp_path / "levels.json"}', '--afs'],
        'list':   ['--solver=unipc', '--sigmas=' + ','.join(repr(float(s)) for s in levels), '--afs'],
    }
    procs = {name: start(['--network', nets['pkl'], '--outdir', str(tmp_path / name), '--seeds=0-3', *args, *CPU]) for name, args in runs.items()}
    results = {name: finish(proc) for name, proc in procs.items()}
    for name, (code, out, err) in results.items():
        assert code == 0, f'{name}:\n{out}\n{err}'
    assert 'ipndm, 6 levels, 5 NFE per image' in results['batch1'][1] # 6 levels: 5 intervals, one call each
    assert '4 NFE per image' in results['json'][1]                     # AFS saves the first call
    ipndm = expected(net, seeds, solver='ipndm', sigmas=schedules.get_sigmas('edm', 6, 0.002, 80, 7))
    unipc = expected(net, seeds, solver='unipc', sigmas=levels, afs=True)
    for name, want in [('batch1', ipndm), ('batch3', ipndm), ('json', unipc), ('list', unipc)]:
        images = pngs(tmp_path / name)
        for i, s in enumerate(seeds):
            assert np.array_equal(images[f'{s:06d}.png'], want[i]), f'{name}: seed {s} differs'
    assert (ipndm != unipc).mean() > 0.05 # the options reach the solver

    # sampling.json records the NFE, solver and levels of every image, the defaults filled in.
    for name, nfe, options, levels in [('batch3', 5, dict(solver='ipndm', order=4, afs=False), schedules.get_sigmas('edm', 6, 0.002, 80, 7)),
                                       ('json', 4, dict(solver='unipc', order=3, variant='bh2', afs=True), levels)]:
        [entry] = json.loads((tmp_path / name / 'sampling.json').read_text())['samplers']
        assert entry['sampler'] == 'solvers.sample' and entry['nfe'] == nfe and entry['options'] == options, entry
        assert entry['levels'] == levels.tolist() and entry['images'] == [f'{s:06d}.png' for s in seeds]

BAD = {
    'order too high':   (['--solver=ipndm', '--order=5'], 'order'),
    'order for dpm2':   (['--solver=dpm2', '--order=3'], 'fixed order'),
    'sigmas increase':  (['--solver=ipndm', '--sigmas=1,5,0.002'], 'decreas'),
    'sigmas negative':  (['--solver=ipndm', '--sigmas=80,1,-0.5'], 'positive'),
    'afs with heun':    (['--afs'], '--afs'),
    'too few levels':   (['--solver=ipndm', '--order=4', '--steps=3'], 'levels'),
    'sigmas and disc':  (['--solver=ipndm', '--sigmas=80,1,0.002', '--disc=logsnr'], '--sigmas'),
    'eta of an ODE':    (['--solver=ipndm', '--eta=0.5'], 'euler_ancestral|dpmpp_2m_sde'),
    'S_noise of an ODE': (['--solver=dpmpp', '--S_noise=0.9'], '--S_noise'),
    'eta without solver': (['--eta=1'], '--solver='),
    'churn of ancestral': (['--solver=euler_ancestral', '--S_churn=10'], '--eta'),
    'dpmpp_2m_sde order': (['--solver=dpmpp_2m_sde', '--order=1'], 'fixed order'),
}

@pytest.mark.parametrize('case', list(BAD))
def test_few_step_bad_input_is_one_line(case, nets, tmp_path):
    args, expected_text = BAD[case]
    outdir = tmp_path / 'out'
    try:
        result = CliRunner().invoke(generate.main, ['--network', nets['pkl'], '--outdir', str(outdir), '--seeds=0-1', *args, *CPU])
    finally:
        if torch.distributed.is_initialized(): # generate.main joined a one-process group in this process
            torch.distributed.destroy_process_group()
    assert isinstance(result.exception, SystemExit) and result.exit_code != 0, f'{case}: {result.exception!r}\n{result.output}'
    err = result.stderr.strip()
    assert 'Traceback' not in err, err # click's usage lines may precede the one-line error
    assert err.splitlines()[-1].startswith('Error') and expected_text in err.splitlines()[-1], err
    assert not outdir.exists()

def test_sampler_line_shows_every_level_of_a_few_step_solver():
    from sampling import generate as library
    from tests.helpers import golden_network
    net = golden_network('networks/ddpmpp_edm_uncond.npz')
    few = library.make_sampler(net, dict(solver='ipndm', num_steps=5, rho=7))
    line = library.describe(few)
    assert line.startswith('Sampler: sample, ipndm, 5 levels, 4 NFE per image; sigma 80, ')
    assert line.endswith(', 0.002') # the last level, where the solver ends
    heun = library.describe(library.make_sampler(net, dict(num_steps=4, rho=7)))
    assert heun.startswith('Sampler: edm_sampler, 4 steps, 7 NFE per image; sigma 80, ') and heun.endswith(', 0.002, 0')
