"""fid.py: Frechet distance against EDM's golden values, precision/recall on known answers, and the
ref/calc commands end to end with a small stand-in detector (the real one cannot be downloaded here)."""

import os
import re
import sys
import json
import zipfile
import pickle
import importlib.util
import subprocess
import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from metrics import fid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'golden', 'fid')

#----------------------------------------------------------------------------
# Math against the reference.

@pytest.mark.parametrize('case, rtol', [('pair_64d', 1e-9), ('pair_256d_near_singular', 1e-6)])
def test_fid_matches_reference(case, rtol):
    d = np.load(os.path.join(GOLDEN, f'{case}.npz'))
    value = fid.calculate_fid_from_inception_stats(d['mu_1'], d['sigma_1'], d['mu_2'], d['sigma_2'])
    assert isinstance(value, float)
    np.testing.assert_allclose(value, float(d['fid']), rtol=rtol)
    meta = json.load(open(os.path.join(GOLDEN, 'README.json')))['cases'][case]
    self_fid = fid.calculate_fid_from_inception_stats(d['mu_1'], d['sigma_1'], d['mu_1'], d['sigma_1'])
    assert abs(self_fid) <= max(10 * abs(meta['fid_reference_of_set1_against_itself']), 1e-9)

@pytest.mark.parametrize('case', ['pair_64d', 'pair_256d_near_singular'])
def test_stats_from_batched_sums_match_numpy(case):
    # The pipeline sums features batch by batch (and over ranks); the result must be np.mean / np.cov.
    d = np.load(os.path.join(GOLDEN, f'{case}.npz'))
    for k in '12':
        features = torch.as_tensor(d[f'features_{k}'])
        total = sum(b.sum(0) for b in features.split(64))
        total_outer = sum(b.T @ b for b in features.split(64))
        mu, sigma = fid.stats_from_sums(features.shape[0], total, total_outer)
        np.testing.assert_allclose(mu, d[f'mu_{k}'], rtol=1e-12)
        # Elementwise, near-zero covariances differ by summation order; relative to the matrix scale they agree to 1e-12.
        np.testing.assert_allclose(sigma, d[f'sigma_{k}'], rtol=1e-12, atol=1e-12 * np.abs(d[f'sigma_{k}']).max())
        np.testing.assert_allclose(d[f'sigma_{k}'], np.cov(d[f'features_{k}'], rowvar=False), rtol=1e-12)

#----------------------------------------------------------------------------
# Precision and recall.

def brute_force_precision_recall(real, gen, k):
    # Independent check: the full distance matrices, sorted.
    dist = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    real_radii = np.sort(dist(real, real), axis=1)[:, k]
    gen_radii = np.sort(dist(gen, gen), axis=1)[:, k]
    d = dist(gen, real)
    precision = (d <= real_radii[None, :]).any(axis=1).mean()
    recall = (d <= gen_radii[:, None]).any(axis=0).mean()
    return precision, recall

def test_precision_recall_known_answers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn([200, 16], generator=g)
    b = torch.randn([200, 16], generator=g)
    assert fid.compute_precision_recall(a, a.clone()) == (1.0, 1.0)
    assert fid.compute_precision_recall(a, b + 100) == (0.0, 0.0)
    # Real = clusters A and B; generated = copies of A and a far cluster C: half of each side is covered.
    real = torch.cat([a, b + 50])
    gen = torch.cat([a, b - 50])
    assert fid.compute_precision_recall(real, gen) == (0.5, 0.5)

def test_precision_recall_blocked_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    real = torch.randn([150, 8], generator=g, dtype=torch.float64)
    gen = torch.randn([120, 8], generator=g, dtype=torch.float64) * 1.3 + 0.4
    expected = brute_force_precision_recall(real.numpy(), gen.numpy(), k=3)
    assert 0.1 < expected[0] < 0.95 and 0.1 < expected[1] < 0.95 # a case with something to get wrong
    for max_block in [1, 1000, 1 << 26]: # one row per block, a few rows, everything at once
        np.testing.assert_allclose(fid.compute_precision_recall(real, gen, k=3, max_block=max_block), expected)

#----------------------------------------------------------------------------
# End to end with a stand-in detector.

# Written to its own module so that the pickle embeds only this source (the standard detector is a
# pickle of the same kind: a persistent class whose source travels in the file).
STANDIN_SRC = """
import torch
from torch_utils import persistence

@persistence.persistent_class
class StandInDetector(torch.nn.Module):
    # Fixed random conv + pooling to 64-d: uint8 NCHW of any size in, features out. Not Inception.
    def __init__(self, seed=0):
        super().__init__()
        self.register_buffer('weight', torch.randn([32, 3, 3, 3], generator=torch.Generator().manual_seed(seed)) / 3)

    def forward(self, x, return_features=False):
        assert x.dtype == torch.uint8 and return_features
        y = torch.nn.functional.conv2d(x.to(torch.float32) / 127.5 - 1, self.weight, padding=1).relu()
        return torch.cat([y.mean(dim=[2, 3]), y.amax(dim=[2, 3])], dim=1)
"""

def write_standin_detectors(folder, seeds):
    spec = importlib.util.spec_from_file_location('fid_standin_detector', os.path.join(folder, 'fid_standin_detector.py'))
    with open(spec.origin, 'w') as f:
        f.write(STANDIN_SRC)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    paths = []
    for seed in seeds:
        paths.append(os.path.join(folder, f'standin-{seed}.pkl'))
        with open(paths[-1], 'wb') as f:
            pickle.dump(module.StandInDetector(seed=seed), f)
    return paths

def write_images(folder, num, seed, brightness=0, size=16):
    os.makedirs(folder, exist_ok=True)
    rnd = np.random.RandomState(seed)
    for i in range(num):
        base = rnd.randint(0, 200, size=[1, 1, 3])
        img = np.clip(base + rnd.randint(0, 56, size=[size, size, 3]) + brightness, 0, 255).astype(np.uint8)
        PIL.Image.fromarray(img).save(os.path.join(folder, f'{i:06d}.png'))

def decode_folder(folder):
    """Images of a folder decoded by PIL alone, in file name order, as uint8 NCHW RGB (gray repeated)."""
    names = sorted(os.path.relpath(os.path.join(root, n), folder).replace(os.sep, '/') for root, _, files in os.walk(folder) for n in files if n.endswith('.png'))
    return torch.as_tensor(np.stack([np.array(PIL.Image.open(os.path.join(folder, n)).convert('RGB')).transpose(2, 0, 1) for n in names]))

def load_detector(path):
    with open(path, 'rb') as f:
        return pickle.load(f)

def independent_fid(features_1, features_2):
    # tr sqrtm(S1 S2) = sum of sqrt of the eigenvalues of sqrt(S1) S2 sqrt(S1) (symmetric): no scipy.linalg.sqrtm.
    f1, f2 = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = scipy.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_sqrt = np.sqrt(np.clip(scipy.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    return float(np.square(f1.mean(0) - f2.mean(0)).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)

@pytest.fixture(scope='module')
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('fid')
    e = dict(tmp=str(tmp), a=str(tmp / 'a'), b=str(tmp / 'b'))
    e['det'], e['det2'] = write_standin_detectors(e['tmp'], seeds=[0, 1])
    write_images(e['a'], 80, seed=0)
    write_images(e['b'], 80, seed=1, brightness=40)
    e['ref'] = str(tmp / 'ref-a.npz')
    r = run('ref', f'--data={e["a"]}', f'--dest={e["ref"]}', f'--detector={e["det"]}', '--save-features', '--workers=0', tmp=e['tmp'])
    assert r.returncode == 0, r.stderr
    assert 'NOT comparable' in r.stdout
    return e

def start(*args, tmp, torchrun=False):
    # A cache of our own, so that no real detector file can be picked up. Under torchrun, "--" keeps
    # torchrun from taking --num for its own --numa-binding.
    env = dict(os.environ, DNNLIB_CACHE_DIR=os.path.join(tmp, 'cache'))
    prefix = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--'] if torchrun else [sys.executable]
    return subprocess.Popen(prefix + [os.path.join(ROOT, 'fid.py'), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp, env=env)

def finish(proc):
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

def run(*args, tmp, torchrun=False):
    return finish(start(*args, tmp=tmp, torchrun=torchrun))

def calc(e, images, *args, torchrun=False):
    workers = [] if any(a.startswith('--workers') for a in args) else ['--workers=0']
    return run('calc', f'--images={images}', *args, *workers, tmp=e['tmp'], torchrun=torchrun)

def fid_line(r):
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    return float(line.split()[0]), line

@pytest.mark.slow
def test_pipeline_features_equal_detector_on_decoded_images(tmp_path, env):
    # Whatever the pipeline does between file and detector (decoding, channel order, orientation,
    # size, batching, the gray-to-RGB repeat) must give the detector's features of the images as PIL
    # reads them. Non-square images catch a swap of width and height.
    det = load_detector(env['det'])
    rgb, gray = tmp_path / 'rgb', tmp_path / 'gray'
    rnd = np.random.RandomState(5)
    os.makedirs(rgb)
    os.makedirs(gray)
    for i in range(7):
        PIL.Image.fromarray(rnd.randint(0, 256, [12, 20, 3], dtype=np.uint8)).save(rgb / f'{i:02d}.png')
        PIL.Image.fromarray(rnd.randint(0, 256, [10, 10], dtype=np.uint8)).save(gray / f'{i:02d}.png')
    for folder in [rgb, gray]:
        _mu, _sigma, features = fid.calculate_inception_stats(str(folder), max_batch_size=3, num_workers=0,
            device=torch.device('cpu'), detector_net=det, return_features=True)
        with torch.no_grad():
            expected = det(decode_folder(str(folder)), return_features=True)
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)

@pytest.mark.slow
def test_ref_features_from_the_command_equal_detector_on_decoded_images(env):
    ref = np.load(env['ref'])
    with torch.no_grad():
        expected = load_detector(env['det'])(decode_folder(env['a']), return_features=True).numpy()
    np.testing.assert_allclose(ref['features'], expected, rtol=1e-5, atol=1e-6)

@pytest.mark.slow
def test_ref_file_keeps_edm_format_and_labels_detector(env):
    ref = np.load(env['ref'], allow_pickle=False)
    assert ref['mu'].shape == (64,) and ref['sigma'].shape == (64, 64) and ref['mu'].dtype == np.float64
    assert ref['features'].shape == (80, 64)
    np.testing.assert_allclose(ref['mu'], ref['features'].astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(ref['sigma'], np.cov(ref['features'].astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    assert str(ref['detector']).startswith('sha256:') and not bool(ref['comparable'])

@pytest.mark.slow
def test_calc_against_own_ref_is_zero_and_labelled(env):
    stats = os.path.join(env['tmp'], 'a.fid-stats.npz')
    r = calc(env, env['a'], f'--ref={env["ref"]}', '--num=80', f'--detector={env["det"]}', '--pr')
    value, line = fid_line(r)
    assert abs(value) < 1e-6
    assert 'NOT comparable to published FID' in line
    assert re.search(r'^precision 1 ', r.stdout, re.M) and re.search(r'^recall 1 ', r.stdout, re.M)
    assert os.path.isfile(stats) and not bool(np.load(stats)['comparable'])

    # Unchanged images: statistics are reused; a changed file: recomputed.
    r = calc(env, env['a'], f'--ref={env["ref"]}', '--num=80', f'--detector={env["det"]}')
    assert 'Reusing statistics' in r.stdout and fid_line(r)[0] == value
    os.utime(os.path.join(env['a'], '000003.png'))
    r = calc(env, env['a'], f'--ref={env["ref"]}', '--num=80', f'--detector={env["det"]}')
    assert 'Reusing statistics' not in r.stdout and 'Calculating statistics' in r.stdout and abs(fid_line(r)[0]) < 1e-6

@pytest.mark.slow
def test_calc_other_set_and_two_process_torchrun(env):
    single = calc(env, env['b'], f'--ref={env["ref"]}', '--num=80', f'--detector={env["det"]}', '--pr',
        '--save-stats=' + os.path.join(env['tmp'], 'b1.npz'))
    value, line = fid_line(single)
    assert value > 1 and 'NOT comparable' in line
    # The printed FID equals one computed here from the detector's features of the decoded images.
    with torch.no_grad():
        net = load_detector(env['det'])
        expected = independent_fid(net(decode_folder(env['a']), return_features=True), net(decode_folder(env['b']), return_features=True))
    assert value == pytest.approx(expected, rel=2e-5)
    multi = calc(env, env['b'], f'--ref={env["ref"]}', '--num=80', f'--detector={env["det"]}', '--pr',
        '--save-stats=' + os.path.join(env['tmp'], 'b2.npz'), torchrun=True)
    assert fid_line(multi)[0] == pytest.approx(value, rel=1e-6)
    assert re.findall(r'^(precision|recall) (\S+)', multi.stdout, re.M) == re.findall(r'^(precision|recall) (\S+)', single.stdout, re.M)
    s1, s2 = np.load(os.path.join(env['tmp'], 'b1.npz')), np.load(os.path.join(env['tmp'], 'b2.npz'))
    np.testing.assert_allclose(s2['mu'], s1['mu'], rtol=1e-9)
    np.testing.assert_allclose(s2['sigma'], s1['sigma'], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(s2['features'], s1['features']) # gathered back in dataset order

@pytest.mark.slow
def test_golden_cifar_zip_against_own_ref(env):
    zip_path = os.path.join(ROOT, 'tests', 'golden', 'dataset', 'cifar10-32x32.zip')
    ref_path = os.path.join(env['tmp'], 'cifar-ref.npz')
    r = run('ref', f'--data={zip_path}', f'--dest={ref_path}', f'--detector={env["det"]}', '--workers=0', tmp=env['tmp'])
    assert r.returncode == 0, r.stderr
    with zipfile.ZipFile(zip_path) as z:
        num = len([name for name in z.namelist() if name.endswith('.png')])
    r = calc(env, zip_path, f'--ref={ref_path}', f'--num={num}', f'--detector={env["det"]}',
        '--save-stats=' + os.path.join(env['tmp'], 'cifar-stats.npz'))
    value, line = fid_line(r)
    assert abs(value) < 1e-4 and 'NOT comparable' in line

#----------------------------------------------------------------------------
# The built-in stand-in detector: no download, labelled wherever its numbers appear.

@pytest.mark.slow
def test_standin_detector_without_download(env):
    ref_path = os.path.join(env['tmp'], 'ref-standin.npz')
    r = run('ref', f'--data={env["a"]}', f'--dest={ref_path}', '--detector=standin', tmp=env['tmp']) # default --workers
    assert r.returncode == 0, r.stderr
    assert 'Warning' not in r.stderr, r.stderr # e.g. torch's warning about more workers than cores
    assert re.search(r'NOT comparable to published FID: stand-in detector standin-[0-9a-f]{16} is not the standard', r.stdout)
    ref = np.load(ref_path)
    assert str(ref['detector']) == fid.open_detector('standin').id and not bool(ref['comparable'])
    assert not os.path.exists(os.path.join(env['tmp'], 'cache')) # nothing was downloaded
    # Its features are those of the stand-in applied to the decoded images; FID as computed independently.
    standin = fid.StandInDetector()
    with torch.no_grad():
        a, b = standin(decode_folder(env['a']), return_features=True), standin(decode_folder(env['b']), return_features=True)
    np.testing.assert_allclose(ref['mu'], a.double().mean(0).numpy(), rtol=1e-5, atol=1e-7)
    # Without --detector, the reference names its detector at once (no download tried).
    r = run('calc', f'--images={env["b"]}', f'--ref={ref_path}', '--num=80', tmp=env['tmp'])
    assert r.returncode != 0 and 'pass --detector=standin' in r.stderr and 'Downloading' not in r.stdout + r.stderr, r.stderr
    r = calc(env, env['b'], f'--ref={ref_path}', '--num=80', '--detector=standin', '--save-stats=' + os.path.join(env['tmp'], 'b-standin.npz'))
    value, line = fid_line(r)
    assert 'NOT comparable to published FID: stand-in detector' in line
    assert value == pytest.approx(independent_fid(a, b), rel=2e-5) and value > 0

    # Next to the number, a point of comparison: the FD between two random halves of the reference set
    # (seeded permutation), or of the images when the reference file has none.
    def halves(features):
        order = np.random.RandomState(0).permutation(len(features))
        return independent_fid(features[order[:40]], features[order[40:]])
    found = re.search(r"; for comparison, the reference set's two random halves score (\S+)\)$", line)
    assert found and float(found.group(1)) == pytest.approx(halves(a), rel=1e-4), line
    old_ref = os.path.join(env['tmp'], 'ref-standin-old.npz')
    np.savez(old_ref, **{k: v for k, v in np.load(ref_path).items() if k != 'halves_fd'}) # made before the comparison existed
    r = calc(env, env['b'], f'--ref={old_ref}', '--num=80', '--detector=standin', '--save-stats=' + os.path.join(env['tmp'], 'b-standin.npz'))
    found = re.search(r"; for comparison, these images' two random halves score (\S+)\)$", fid_line(r)[1])
    assert 'Reusing statistics' in r.stdout and found and float(found.group(1)) == pytest.approx(halves(b), rel=1e-4), r.stdout

@pytest.mark.slow
def test_ref_kid_keeps_edm_format_and_calc_kid_matches_features(env):
    # ref --kid: EDM's mu/sigma plus kid_features (all 80: fewer than the cap); calc --kid prints the KID
    # of the detector's features of the decoded images, and the FID stays the last line.
    ref_path = os.path.join(env['tmp'], 'ref-a-kid.npz')
    r = run('ref', f'--data={env["a"]}', f'--dest={ref_path}', f'--detector={env["det"]}', '--kid', '--workers=0', tmp=env['tmp'])
    assert r.returncode == 0, r.stderr
    ref = np.load(ref_path, allow_pickle=False)
    assert 'features' not in ref and ref['kid_features'].shape == (80, 64) and ref['kid_features'].dtype == np.float32
    with torch.no_grad():
        net = load_detector(env['det'])
        a, b = net(decode_folder(env['a']), return_features=True).numpy(), net(decode_folder(env['b']), return_features=True).numpy()
    np.testing.assert_allclose(ref['kid_features'], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref['mu'], a.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    r = calc(env, env['b'], f'--ref={ref_path}', '--num=80', f'--detector={env["det"]}', '--kid',
        '--save-stats=' + os.path.join(env['tmp'], 'b-kid.npz'))
    fid_line(r)
    found = re.search(r'^KID (\S+) std (\S+) \(100 subsets of 80\)  \(NOT comparable', r.stdout, re.M)
    assert found, r.stdout
    expected = fid.calculate_kid(b, a)
    assert float(found.group(1)) == pytest.approx(expected[0], rel=1e-4) and float(found.group(2)) == pytest.approx(expected[1], rel=1e-3, abs=1e-9)
    assert float(found.group(1)) > 0
    # A reference with all features (--save-features) serves too. Against its own 80 images (each subset
    # all of them) the unbiased estimate is slightly negative (-2/m times the diagonal's excess), near 0.
    r = calc(env, env['a'], f'--ref={env["ref"]}', '--num=80', f'--detector={env["det"]}', '--kid',
        '--save-stats=' + os.path.join(env['tmp'], 'a-kid.npz'))
    own = float(re.search(r'^KID (\S+) std', r.stdout, re.M).group(1))
    assert own == pytest.approx(fid.calculate_kid(a, a)[0], rel=1e-4)
    assert abs(own) < 0.1 * float(found.group(1)), (own, found.group(1))

#----------------------------------------------------------------------------
# Errors: non-zero exit and a one-line message naming the problem.

# The error cases run one after another in a single process (start-up is most of their cost), each
# through click's normal entry point: exit code and stderr as a user sees them.

ERROR_RUNNER = '''
import sys, io, json, contextlib, traceback
import fid
results = {}
for name, args in json.loads(sys.stdin.read()).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            fid.main(args, prog_name='fid.py')
            code = 0
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            code, _ = 'uncaught', traceback.print_exc()
    results[name] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
'''

@pytest.fixture(scope='module')
def errors(env):
    tmp, det = env['tmp'], f'--detector={env["det"]}'
    mixed = os.path.join(tmp, 'mixed')
    write_images(mixed, 6, seed=2)
    write_images(os.path.join(mixed, 'sub'), 1, seed=3, size=8)
    rgba = os.path.join(tmp, 'rgba')
    os.makedirs(rgba)
    for i in range(3):
        PIL.Image.fromarray(np.full([8, 8, 4], 60 * i, dtype=np.uint8)).save(os.path.join(rgba, f'{i}.png'))
    np.savez(os.path.join(tmp, 'bad.npz'), foo=np.zeros(3))
    ref = dict(np.load(env['ref']))
    del ref['features']
    np.savez(os.path.join(tmp, 'ref-nofeat.npz'), **ref)
    np.savez(os.path.join(tmp, 'ref-edm.npz'), mu=ref['mu'], sigma=ref['sigma']) # EDM's format: the standard detector's
    calc_cases = {
        'too_few':      [env['a'], f'--ref={env["ref"]}', '--num=100', det],
        'mixed':        [mixed, f'--ref={env["ref"]}', '--num=7', det, '--workers=1'], # error raised in a loader worker
        'rgba':         [rgba, f'--ref={env["ref"]}', '--num=3', det],
        'no_mu_sigma':  [env['a'], f'--ref={os.path.join(tmp, "bad.npz")}', '--num=80', det],
        'url':          [env['a'], '--ref=http://127.0.0.1:9/ref.npz', '--num=80', det],
        'default_det':  [env['a'], f'--ref={os.path.join(tmp, "ref-edm.npz")}', '--num=80'],
        'mismatch':     [env['a'], f'--ref={env["ref"]}', '--num=80', f'--detector={env["det2"]}'],
        'pr_features':  [env['a'], f'--ref={os.path.join(tmp, "ref-nofeat.npz")}', '--num=80', det, '--pr'],
        'kid_edm':      [os.path.join(tmp, 'missing'), f'--ref={os.path.join(tmp, "ref-edm.npz")}', '--num=80', '--kid'], # before images, download
        'standin_ref':  [env['a'], f'--ref={env["ref"]}', '--num=80', '--detector=standin'],
        'images_first': [os.path.join(tmp, 'missing'), f'--ref={os.path.join(tmp, "ref-edm.npz")}', '--num=80'],
    }
    cases = {name: ['calc', f'--images={args[0]}', *args[1:], *([] if '--workers=1' in args else ['--workers=0'])] for name, args in calc_cases.items()}
    cases.update({
        'ref_data_first': ['ref', f'--data={os.path.join(tmp, "missing")}', f'--dest={os.path.join(tmp, "new.npz")}'], # standard detector
        'ref_dest_exists': ['ref', f'--data={env["a"]}', f'--dest={env["ref"]}', '--detector=standin'],
    })
    env = dict(os.environ, DNNLIB_CACHE_DIR=os.path.join(tmp, 'cache'))
    r = subprocess.run([sys.executable, '-c', ERROR_RUNNER, ROOT], input=json.dumps(cases), capture_output=True, text=True, cwd=tmp, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return {name: subprocess.CompletedProcess(cases[name], *result) for name, result in json.loads(r.stdout.strip().splitlines()[-1]).items()}

def assert_error(r, *patterns):
    assert r.returncode not in [0, 'uncaught'], r.stderr
    errors = [line for line in r.stderr.strip().splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and 'Traceback' not in r.stderr, r.stderr
    for pattern in patterns:
        assert re.search(pattern, errors[0]), errors[0]

@pytest.mark.slow
def test_error_too_few_images(errors):
    assert_error(errors['too_few'], r'found 80 images, need --num=100')

@pytest.mark.slow
def test_error_mixed_sizes(errors):
    assert_error(errors['mixed'], r'sub/000000\.png is 8x8x3, 6 other images are 16x16x3')

@pytest.mark.slow
def test_error_four_channels(errors):
    assert_error(errors['rgba'], r'images have 4 channels')

@pytest.mark.slow
def test_error_ref_without_mu_sigma(errors):
    assert_error(errors['no_mu_sigma'], r'no mu/sigma', r'fid.py ref')

@pytest.mark.slow
def test_error_unreachable_ref_url_names_cache_path(errors, env):
    assert_error(errors['url'], r'http://127.0.0.1:9/ref.npz', r'place it at ' + re.escape(os.path.join(env['tmp'], 'cache', 'downloads')))

@pytest.mark.slow
def test_standard_detector_is_the_default_and_stand_in_needs_the_flag(errors):
    # Without --detector the standard Inception is fetched (unreachable here): the stand-in is never
    # used by accident, but the message names it.
    assert_error(errors['default_det'], re.escape(fid.DETECTOR_URL), r'place it at .*inception-2015-12-05\.pkl',
        r'--detector=standin gives a quick FID that is NOT comparable')

@pytest.mark.slow
def test_error_standin_against_other_detectors_ref(errors):
    assert_error(errors['standin_ref'], r'computed with detector sha256:\w+, this run uses standin-\w+')

@pytest.mark.slow
def test_missing_images_reported_before_download(errors):
    # No --detector: the standard one would be downloaded (and fail here); the missing data comes first.
    for name in ['images_first', 'ref_data_first']:
        assert_error(errors[name], r'missing: no such directory or zip file')
        assert 'download' not in errors[name].stderr.lower(), errors[name].stderr

@pytest.mark.slow
def test_error_ref_dest_exists(errors, env):
    assert_error(errors['ref_dest_exists'], r'--dest .*ref-a\.npz already exists; delete it or choose another name')
    assert 'features' in np.load(env['ref']) # untouched

@pytest.mark.slow
def test_error_detector_mismatch_with_ref(errors):
    assert_error(errors['mismatch'], r'computed with detector sha256:', r'same --detector')

@pytest.mark.slow
def test_error_pr_needs_ref_features(errors):
    assert_error(errors['pr_features'], r'no features for --pr', r'--save-features')

@pytest.mark.slow
def test_error_kid_needs_ref_features_before_any_work(errors):
    # EDM's reference (mu, sigma only), images that do not exist, the standard detector: the missing
    # features are named first, before the images are looked at or the detector downloaded.
    r = errors['kid_edm']
    assert_error(r, r'ref-edm\.npz: no features for --kid \(it holds only mu/sigma', r'"fid\.py ref --kid"')
    assert 'Loading images' not in r.stdout and 'download' not in r.stderr.lower(), (r.stdout, r.stderr)

#----------------------------------------------------------------------------

def test_program_turns_library_errors_into_flag_messages():
    # In-process (the fast tier's one test of fid.py itself): the library's errors name no flags;
    # the program's messages do.
    import click
    import fid as program
    def fails(err):
        @program.flag_errors
        def command():
            raise err
        with pytest.raises(click.ClickException) as info:
            command()
        return info.value.message
    assert fails(fid.TooFewImages('out', 10, 50)) == 'out: found 10 images, need --num=50; generate more or lower --num'
    assert fails(fid.FIDError('the detector is damaged')) == 'the detector is damaged'
    with pytest.raises(ValueError): # anything else is not the user's to fix: no message of its own
        fails(ValueError('bug'))

def test_calc_names_the_detector_of_a_standin_reference_before_any_download():
    import click
    import fid as program
    standin = dict(detector='standin-0123456789abcdef', detector_url='standin')
    with pytest.raises(click.ClickException, match=r'ref\.npz was computed with detector standin-0123456789abcdef, .*pass --detector=standin'):
        program.refuse_other_detector(standin, 'ref.npz', None)
    other = dict(detector='mine-42', detector_url='nets/mine.pkl')
    with pytest.raises(click.ClickException, match='pass --detector=nets/mine.pkl'):
        program.refuse_other_detector(other, 'ref.npz', None)
    program.refuse_other_detector(standin, 'ref.npz', 'standin') # named: checked against the detector once open
    program.refuse_other_detector(dict(detector=fid.DETECTOR_NAME), 'ref.npz', None)
