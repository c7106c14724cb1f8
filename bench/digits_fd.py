"""Sample quality on the digits without any download: Frechet distance in the feature space of a
small classifier trained here on the digits themselves ("FD-digits"), and in pixel space.

The classifier (two conv layers, 64-d penultimate features) is trained on a fixed 80% split of the
dataset with a fixed seed, so the feature space is the same for every network and NFE in a run.
Numbers are comparable only within one run of this script (same classifier, same seeds, same
number of samples): FD of a few hundred samples is biased upwards. The floor is printed too: the FD
of that many real images (the held-out 20% plus the first of the rest) against the whole set.
Generated images are rounded to uint8 as generate.py writes them before they are measured.

    python bench/digits_fd.py --data=datasets/uci-digits-16x16.zip --network=edm.pkl --name=edm \\
        --network=aot.pkl --name=aot --seeds=0-499 --nfe=5,7,9,11,15,19,27,35 --out=out/fd
"""

import json
import os
import warnings

import click
import numpy as np
import scipy.linalg
import torch
import tqdm

from metrics.fid import calculate_fid_from_inception_stats
from sampling.edm import edm_sampler
from sampling.seeds import latents_for_seeds
from training.dataset import ImageFolderDataset
from sampling.images import to_uint8, save_image_grid
from training.network_io import load_network
from dnnlib.util import one_line
from tools.trajectory import heun_steps, parse_int_list, pyplot

#----------------------------------------------------------------------------

class DigitClassifier(torch.nn.Module):
    def __init__(self, channels, resolution, classes):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(64 * (resolution // 4) ** 2, 64), torch.nn.ReLU())
        self.head = torch.nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.features(x))

def load_digits(path):
    ds = ImageFolderDataset(path, use_labels=True)
    if not ds.has_labels:
        raise click.ClickException(f'{path} has no labels (dataset.json); the classifier needs them')
    images = torch.as_tensor(np.stack([ds[i][0] for i in range(len(ds))])).float() / 127.5 - 1
    labels = torch.as_tensor(np.stack([ds[i][1] for i in range(len(ds))])).argmax(dim=1)
    return images, labels

def train_classifier(images, labels, epochs=30, seed=0):
    """Returns the classifier and its accuracy on the held-out 20%."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(images), generator=gen)
    split = int(0.8 * len(images))
    train, held = perm[:split], perm[split:]
    net = DigitClassifier(images.shape[1], images.shape[2], int(labels.max()) + 1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in tqdm.trange(epochs, desc='classifier', unit='epoch'):
        for idx in train[torch.randperm(split, generator=gen)].split(64):
            # Small random shifts, so that features do not hinge on exact pixel positions.
            x = torch.roll(images[idx], shifts=[int(s) for s in torch.randint(-1, 2, [2], generator=gen)], dims=[2, 3])
            loss = torch.nn.functional.cross_entropy(net(x), labels[idx])
            opt.zero_grad(); loss.backward(); opt.step()
    net.eval().requires_grad_(False)
    accuracy = (net(images[held]).argmax(dim=1) == labels[held]).float().mean().item()
    return net, accuracy, perm

def quantize(x):
    """Images as generate.py writes them (uint8), back in [-1, 1]: what FD-digits measures."""
    return torch.as_tensor(to_uint8(x)).permute(0, 3, 1, 2).float() / 127.5 - 1

def stats(x):
    x = x.double().numpy()
    return x.mean(axis=0), np.cov(x, rowvar=False)

def frechet(a, b):
    return calculate_fid_from_inception_stats(*stats(a), *stats(b))

#----------------------------------------------------------------------------

@click.command()
@click.option('--data',        help='Labelled digits dataset (zip or folder)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--network', 'networks', help='Network snapshot (.pkl or .safetensors); repeat to compare', metavar='PATH', multiple=True, required=True)
@click.option('--name', 'names', help='Label of each --network', metavar='STR', multiple=True)
@click.option('--seeds',       help='Random seeds (latents as generate.py)', metavar='LIST', default='0-499', show_default=True)
@click.option('--nfe',         help='Heun NFE budgets (odd)', metavar='LIST', default='5,7,9,11,15,19,27,35', show_default=True)
@click.option('--rho',         help='Time step exponent', metavar='FLOAT', type=float, default=7, show_default=True)
@click.option('--batch',       help='Images per sampler call', metavar='INT', type=click.IntRange(min=1), default=250, show_default=True)
@click.option('--out',         help='Output prefix: PREFIX.json, PREFIX.png, PREFIX-samples-NAME.png', metavar='PATH', type=str, required=True)
@torch.no_grad() # scoped to main(), not process-wide: callers that import main() keep autograd
def main(data, networks, names, seeds, nfe, rho, batch, out):
    """FD of generated digits in a digit classifier's feature space and in pixel space, per NFE."""
    seeds, nfes = parse_int_list(seeds, 'seed'), sorted(set(parse_int_list(nfe, 'NFE')))
    try:
        steps = [heun_steps(n) for n in nfes]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--nfe')
    names = list(names) or [os.path.splitext(os.path.basename(p))[0] for p in networks]
    if len(names) != len(networks) or len(set(names)) != len(names):
        raise click.BadParameter('give one distinct --name per --network', param_hint='--name')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # Pixel covariances are singular (border pixels are always black); the distance is still defined.
    warnings.filterwarnings('ignore', category=scipy.linalg.LinAlgWarning)

    images, labels = load_digits(data)
    with torch.enable_grad():
        classifier, accuracy, perm = train_classifier(images, labels)
    print(f'Classifier: held-out accuracy {accuracy:.3f}')
    real_feat = classifier.features(images)
    real_pix = images.flatten(1)
    floor_idx = perm.flip(0)[:len(seeds)] # held-out images first
    result = dict(settings=dict(data=data, seeds=len(seeds), nfe=nfes, rho=rho, classifier_accuracy=accuracy),
                  floor=dict(fd_digits=frechet(classifier.features(images[floor_idx]), real_feat),
                             fd_pixels=frechet(real_pix[floor_idx], real_pix)), networks={})
    print(f'Floor ({len(seeds)} real images vs all): FD-digits {result["floor"]["fd_digits"]:.3f}, FD-pixels {result["floor"]["fd_pixels"]:.3f}')

    for name, path in zip(names, networks):
        try:
            net = load_network(path)
        except Exception as e:
            raise click.ClickException(f'Cannot load network "{path}": {one_line(e)}')
        rows, grid = [], []
        for n, s in zip(nfes, steps):
            samples = []
            for chunk in tqdm.tqdm([seeds[i:i + batch] for i in range(0, len(seeds), batch)], desc=f'{name} NFE {n}', unit='batch'):
                latents, class_labels, _ = latents_for_seeds(net, chunk)
                x = edm_sampler(net, latents, class_labels, num_steps=s, rho=rho)
                samples.append(quantize(x))
            samples = torch.cat(samples)
            rows.append(dict(nfe=n, steps=s, fd_digits=frechet(classifier.features(samples), real_feat), fd_pixels=frechet(samples.flatten(1), real_pix),
                             class_hist=np.bincount(classifier(samples).argmax(dim=1).numpy(), minlength=int(labels.max()) + 1).tolist()))
            grid.append(to_uint8(samples[:16]))
            print(f'{name} NFE {n:3d}: FD-digits {rows[-1]["fd_digits"]:.3f}  FD-pixels {rows[-1]["fd_pixels"]:.3f}')
        result['networks'][name] = dict(path=path, runs=rows)
        # One row of 16 samples per NFE: the same seeds across rows and networks.
        save_image_grid(np.concatenate(grid), f'{out}-samples-{name}.png', cols=16)

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for ax, key, title in zip(axes, ('fd_digits', 'fd_pixels'), ('FD in digit-classifier features', 'FD in pixel space')):
        for name, res in result['networks'].items():
            ax.plot([r['nfe'] for r in res['runs']], [r[key] for r in res['runs']], 'o-', label=name)
        ax.axhline(result['floor'][key], color='gray', ls='--', label=f'{len(seeds)} real images')
        ax.set_xlabel('NFE (Heun)'); ax.set_ylabel('Frechet distance'); ax.set_yscale('log'); ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which='both'); ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + '.png.tmp', format='png'); os.replace(out + '.png.tmp', out + '.png')
    with open(out + '.json.tmp', 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(out + '.json.tmp', out + '.json')
    print(f'Wrote {out}.json, {out}.png and the sample rows {out}-samples-*.png')

if __name__ == '__main__':
    main()
