"""Train the discriminator of Discriminator Guidance (DG, Kim et al. 2023), optionally on AOT-paired
noise (DG-AOT): real images (label 1) against a diffusion network's samples (label 0), both
perturbed by DG's VP SDE at importance-sampled times. The result loads in generate.py --dg."""

import json
import os
import sys
import time

import click
import numpy as np
import scipy.stats
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training import aot, guidance
from training.dataset import ImageFolderDataset
from training.network_io import save_safe

#----------------------------------------------------------------------------

def fail(msg):
    raise click.ClickException(msg)

def load_images(path, cond, what):
    """uint8 images [N, C, H, W] and class indices [N] (or None) of an EDM dataset folder or zip."""
    try:
        ds = ImageFolderDataset(path, use_labels=cond)
    except Exception as err:
        fail(f'Cannot read {what} {path}: {" ".join(str(err).split())}')
    if cond and not ds.has_labels:
        hint = ' (generate.py writes it for conditional networks)' if what == '--fakes' else ''
        fail(f'--cond=1 needs class labels, but {what} {path} has no dataset.json{hint}')
    images = torch.as_tensor(np.stack([ds[i][0] for i in range(len(ds))]))
    labels = torch.as_tensor(np.stack([ds[i][1] for i in range(len(ds))])).argmax(dim=1) if cond else None
    return images, labels, (ds.label_dim if cond else 0)

def split(n, holdout, gen):
    perm = torch.randperm(n, generator=gen)
    k = min(max(int(round(n * holdout)), 1), n - 1) if holdout > 0 else 0
    return perm[k:], perm[:k]

def perturb(images, noise, t):
    """VP state at time t: mean(t) * x0 + std(t) * noise, images uint8 -> [-1, 1]."""
    mean, std = guidance.vp_mean_std(t)
    x0 = images.to(torch.float32) / 127.5 - 1
    return mean[:, None, None, None] * x0 + std[:, None, None, None] * noise

def make_pool(real, fake, pool, gen, aot_pool, nearest_of=0):
    """One pool: pool/2 real and pool/2 fake images (indices drawn at random), unit noise per image
    and VP times; with AOT the noise is paired with the images by training.aot.assign, separately for
    real and fake and per class; with nearest_of=K each image keeps the nearest of K noises of its
    own (training.aot.nearest). Returns (images, labels or None, targets, noise, t), shuffled."""
    parts = []
    for (images, labels), target in [(real, 1.0), (fake, 0.0)]:
        idx = torch.randint(len(images), [pool // 2], generator=gen)
        x, y = images[idx], (None if labels is None else labels[idx])
        if nearest_of:
            z = aot.nearest(x.float() / 127.5 - 1, torch.randn([len(x), nearest_of, *x.shape[1:]], generator=gen))[0]
        else:
            z = torch.randn(x.shape, generator=gen)
        if aot_pool:
            z = z[aot.assign(x.float() / 127.5 - 1, z, y)[0]]
        parts.append((x, y, torch.full([len(idx)], target), z))
    order = torch.randperm(pool // 2 * 2, generator=gen)
    cat = lambda k: None if parts[0][k] is None else torch.cat([p[k] for p in parts])[order]
    return cat(0), cat(1), cat(2), cat(3), guidance.importance_sampled_times(len(order), generator=gen)

def auc(real_scores, fake_scores):
    """Area under the ROC curve: the chance that a real image scores above a fake one (ties count
    half; Mann-Whitney). Unlike the accuracy at d = 0.5 it ignores a bias of the output, which the
    guidance gradient does not see either."""
    ranks = scipy.stats.rankdata(np.concatenate([real_scores, fake_scores]))
    n_real, n_fake = len(real_scores), len(fake_scores)
    return float((ranks[:n_real].sum() - n_real * (n_real + 1) / 2) / (n_real * n_fake))

@torch.no_grad()
def heldout_metrics(disc, real, fake, device, batch=256, seed=1):
    """Held-out balanced accuracy of d > 0.5 (the mean of the accuracies on real and on fake images,
    so 0.5 is chance whatever their numbers) and AUC, at DG's times with fixed noise, overall and for
    VP times t < 0.2, 0.2-0.5 and >= 0.5. Returns (accuracy, auc), each {bin: value}."""
    gen = torch.Generator().manual_seed(seed)
    scores, times, targets = [], [], []
    for (images, labels), target in [(real, 1), (fake, 0)]:
        for i in range(0, len(images), batch):
            x = images[i:i + batch]
            t = guidance.importance_sampled_times(len(x), generator=gen)
            xt = perturb(x, torch.randn(x.shape, generator=gen), t)
            scores.append(disc(xt.to(device), t.to(device), None if labels is None else labels[i:i + batch].to(device)).cpu().double())
            times.append(t)
            targets.append(torch.full([len(x)], target))
    scores, times, targets = torch.cat(scores), torch.cat(times), torch.cat(targets)
    correct = ((scores > 0.5).long() == targets).double()
    accuracy, area = {}, {}
    bins = {'all': times >= 0, 't<0.2': times < 0.2, '0.2<=t<0.5': (times >= 0.2) & (times < 0.5), 't>=0.5': times >= 0.5}
    for k, m in bins.items():
        r, f = m & (targets == 1), m & (targets == 0)
        if r.any() and f.any():
            accuracy[k] = 0.5 * (correct[r].mean() + correct[f].mean()).item()
            area[k] = auc(scores[r].numpy(), scores[f].numpy())
    return accuracy, area

def best_auc(stats_path):
    """(held-out AUC, kimg) of the best snapshot logged so far in stats.jsonl, (-1, None) if none."""
    best = (-1.0, None)
    if os.path.isfile(stats_path):
        for line in open(stats_path):
            entry = json.loads(line)
            if entry.get('heldout_auc') and entry['heldout_auc']['all'] > best[0]:
                best = (entry['heldout_auc']['all'], entry['kimg'])
    return best

def renumber_optimizer_state(opt_state, saved_names, names):
    """Optimizer state saved for the parameters saved_names, for the parameters names (a subset, in
    the same order). Runs begun before the small encoder lost its unused output pool also gave that
    pool to Adam; it never had a gradient, hence no state, and is dropped on resume."""
    keep = [saved_names.index(name) for name in names]
    state = {i: opt_state['state'][j] for i, j in enumerate(keep) if j in opt_state['state']}
    return dict(state=state, param_groups=[dict(opt_state['param_groups'][0], params=list(range(len(names))))])

#----------------------------------------------------------------------------

@click.command()
@click.option('--data',       help='Real images: EDM dataset zip or folder', metavar='ZIP|DIR', type=str, required=True)
@click.option('--fakes',      help="The network's samples: generate.py's folder of PNGs (+ dataset.json if conditional)", metavar='DIR', type=str, required=True)
@click.option('--outdir',     help='Where to write discriminator-*.safetensors, logs and the training state', metavar='DIR', type=str, required=True)
@click.option('--cond',       help='Class-conditional discriminator head', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--aot',        help='DG-AOT pool: images paired with their perturbation noise at once, 0 = independent noise (DG)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--nearest-of', help='Each image keeps the nearest of K noises instead (K >= 2), 0 = off', metavar='K', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--classifier', help="DG's ADM classifier as feature extractor (32x32_classifier.pt)  [default: a small encoder trained here]", metavar='PATH|URL', type=str)
@click.option('--width',      help='Channels of the small encoder and head (without --classifier)', metavar='INT', type=click.IntRange(min=32), default=32, show_default=True)
@click.option('--kimg',       help='Training duration in thousands of images', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=5000, show_default=True)
@click.option('--batch',      help='Total batch size (half real, half fake)', metavar='INT', type=click.IntRange(min=2), default=128, show_default=True)
@click.option('--lr',         help='Learning rate (Adam, weight decay 1e-7 as DG)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=3e-4, show_default=True)
@click.option('--holdout',    help='Fraction of real and of fake images held out for the accuracy', metavar='FLOAT', type=click.FloatRange(min=0, max=0.5), default=0.1, show_default=True)
@click.option('--snap',       help='Snapshot and held-out accuracy every KIMG', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=500, show_default=True)
@click.option('--seed',       help='Random seed', metavar='INT', type=int, default=0, show_default=True)
def main(data, fakes, outdir, cond, aot, nearest_of, classifier, width, kimg, batch, lr, holdout, snap, seed):
    """Train a DG discriminator (DG-AOT with --aot P). Re-running with the same --outdir resumes.

    \b
    # DG-AOT on the digits, CPU (fakes from generate.py of the network to be guided)
    python train_discriminator.py --data=datasets/uci-digits-16x16.zip --fakes=fakes --outdir=dg-aot --aot=256 --kimg=100

    \b
    # CIFAR-10 with DG's ADM feature extractor, 4 GPUs
    torchrun --standalone --nproc_per_node=4 train_discriminator.py --data=datasets/cifar10-32x32.zip \\
        --fakes=fakes --outdir=dg-aot --aot=512 --classifier=32x32_classifier.pt
    """
    dist.init()
    device, rank, world = dist.device(), dist.get_rank(), dist.get_world_size()
    if batch % (2 * world):
        fail(f'--batch {batch} must be a multiple of 2 x {world} processes (half real, half fake on each)')
    if nearest_of == 1 or (nearest_of and aot):
        fail(f'--nearest-of={nearest_of}: use K >= 2 (1 is independent noise), and not with --aot (two couplings of noise to images)')
    batch_gpu = batch // world
    pool = aot if aot else batch_gpu
    if pool % batch_gpu or pool % 2:
        fail(f'--aot {aot} must be a multiple of the per-process batch {batch_gpu}: the pool is consumed in whole batches')
    os.makedirs(outdir, exist_ok=True)
    if rank == 0:
        logger = dnnlib.util.Logger(os.path.join(outdir, 'log.txt'), file_mode='a')
        sys.stderr = logger.stderr # the log gets stdout; errors and the progress bar stay on stderr

    # Data: real and fake images with a held-out part of each.
    gen = torch.Generator().manual_seed(seed)
    real_x, real_y, real_dim = load_images(data, cond, '--data')
    fake_x, fake_y, fake_dim = load_images(fakes, cond, '--fakes')
    if real_x.shape[1:] != fake_x.shape[1:]:
        fail(f'--fakes images are {list(fake_x.shape[1:])} (CHW), but --data images are {list(real_x.shape[1:])}')
    if cond and real_dim != fake_dim:
        fail(f'--data has {real_dim} classes but --fakes {fake_dim}')
    sets = {}
    for name, x, y in [('real', real_x, real_y), ('fake', fake_x, fake_y)]:
        train_idx, held_idx = split(len(x), holdout, gen)
        pick = lambda idx: (x[idx], None if y is None else y[idx])
        sets[name], sets[name + '_held'] = pick(train_idx), pick(held_idx)
    channels, res = real_x.shape[1], real_x.shape[2]

    # Discriminator: DG's frozen ADM classifier + head, or a small encoder trained with the head.
    torch.manual_seed(seed) # initial weights
    try:
        disc = guidance.Discriminator(res, channels, label_dim=real_dim, extractor='adm' if classifier else 'small', width=width)
    except ValueError as err: # DG's classifier does not fit the data
        fail(f'--classifier {classifier}: {err}; train without --classifier for other data')
    if classifier:
        path = dnnlib.util.open_url(classifier, return_filename=True, verbose=(rank == 0))
        disc.classifier.load_state_dict(torch.load(path, map_location='cpu', weights_only=True), strict=True)
        extractor = f"DG's ADM classifier {classifier} (frozen)"
    else:
        extractor = (f'none given (--classifier): a small noise-conditional encoder ({sum(p.numel() for p in disc.classifier.parameters())} '
                     f'parameters, {disc.classifier.feature_channels}x{disc.classifier.feature_resolution}x{disc.classifier.feature_resolution} features) '
                     'trained here together with the head; nothing is downloaded')
    disc.to(device).train()
    params = [p for p in disc.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-7)
    ddp = torch.nn.parallel.DistributedDataParallel(disc, device_ids=[device] if device.type == 'cuda' else None) if world > 1 else disc

    # Resume from the state in outdir, if any.
    state_path = os.path.join(outdir, 'training-state.pt')
    step, gen = 0, torch.Generator().manual_seed(seed * world + rank + 1)
    if os.path.isfile(state_path):
        state = torch.load(state_path, map_location='cpu', weights_only=True)
        disc.load_state_dict(state['disc'])
        if disc.trains_extractor and any(k.startswith('classifier.out.') for k in state['disc']):
            state['opt'] = renumber_optimizer_state(state['opt'], list(state['disc']), [n for n, _ in disc.named_parameters()])
        opt.load_state_dict(state['opt'])
        step = state['step']
        gen.set_state(state['gen'][rank])
        dist.print0(f'Resuming from {state_path} at {step * batch / 1000:g} kimg')
    dist.print0(f'Feature extractor: {extractor}')
    dist.print0(f'Real {len(sets["real"][0])} + held-out {len(sets["real_held"][0])}, fake {len(sets["fake"][0])} + held-out '
                f'{len(sets["fake_held"][0])} images, {res}x{res}x{channels}, {"conditional on " + str(real_dim) + " classes" if cond else "unconditional"}; '
                f'{"DG-AOT pool " + str(aot) if aot else f"nearest of {nearest_of} noises" if nearest_of else "independent noise (DG)"}; batch {batch}, lr {lr:g}, {kimg:g} kimg')

    total_steps = int(np.ceil(kimg * 1000 / batch))
    steps_per_pool = pool // batch_gpu
    snap_steps = max(int(round(snap * 1000 / batch / steps_per_pool)), 1) * steps_per_pool
    loss_fn = torch.nn.BCELoss()
    best = best_auc(os.path.join(outdir, 'stats.jsonl')) # (AUC, kimg) of discriminator-best.safetensors
    sums = torch.zeros(3)
    bar = tqdm.tqdm(total=total_steps, initial=step, unit='step', disable=(rank != 0), dynamic_ncols=True)
    while step < total_steps:
        x, y, target, z, t = make_pool(sets['real'], sets['fake'], pool, gen, aot, nearest_of)
        for k in range(steps_per_pool):
            s = slice(k * batch_gpu, (k + 1) * batch_gpu)
            xt = perturb(x[s], z[s], t[s]).to(device)
            d = ddp(xt, t[s].to(device), None if y is None else y[s].to(device))
            loss = loss_fn(d, target[s].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += torch.tensor([loss.item(), ((d.detach().cpu() > 0.5).float() == target[s]).float().mean().item(), 1])
            step += 1
            bar.update(1)
        bar.set_postfix(loss=f'{sums[0] / sums[2]:.4f}', acc=f'{sums[1] / sums[2]:.3f}')
        if step % snap_steps == 0 or step >= total_steps:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, gen.get_state())
            if rank == 0:
                disc.eval()
                acc, area = heldout_metrics(disc, sets['real_held'], sets['fake_held'], device) if holdout else ({}, {})
                disc.train()
                kimg_done = step * batch / 1000
                entry = dict(kimg=kimg_done, loss=(sums[0] / sums[2]).item(), train_accuracy=(sums[1] / sums[2]).item(),
                             heldout_accuracy=acc, heldout_auc=area, time=time.time())
                tqdm.tqdm.write(f'kimg {kimg_done:g}: loss {entry["loss"]:.4f}, train accuracy {entry["train_accuracy"]:.3f}, held-out accuracy '
                                + ', '.join(f'{k} {v:.3f}' for k, v in acc.items()) + ', AUC ' + ', '.join(f'{k} {v:.3f}' for k, v in area.items()))
                with open(os.path.join(outdir, 'stats.jsonl'), 'a') as f:
                    f.write(json.dumps(entry) + '\n')
                for path in [os.path.join(outdir, f'discriminator-{int(round(kimg_done)):06d}.safetensors'), os.path.join(outdir, 'discriminator.safetensors')]:
                    save_safe(disc, path)
                if area and area['all'] > best[0]: # early stopping on held-out AUC: past its peak the discriminator memorises
                    best = (area['all'], kimg_done)
                    save_safe(disc, os.path.join(outdir, 'discriminator-best.safetensors'))
                with dnnlib.util.atomic_write(state_path) as temp:
                    torch.save(dict(disc=disc.state_dict(), opt=opt.state_dict(), step=step, gen=gathered), temp)
            sums.zero_()
            dist.barrier()
    bar.close()
    dist.print0(f'Done. generate.py --dg={os.path.join(outdir, "discriminator.safetensors")}')
    if best[1] is not None:
        dist.print0(f'Best held-out AUC {best[0]:.3f} at kimg {best[1]:g}: generate.py --dg={os.path.join(outdir, "discriminator-best.safetensors")}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
