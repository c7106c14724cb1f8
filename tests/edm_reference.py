"""EDM's numerics on this machine: the same calls run through EDM's own code and through ours.

The golden files hold EDM's outputs as computed on one machine's kernels; on another CPU they agree
within tolerance only. What is promised bit for bit is that the same kernels give the same bits:
test_exactness.py runs `compute` here with EDM's modules (a checkout of NVlabs/edm named by the
environment variable EDM_SOURCE, put first on PYTHONPATH) and in the test process with ours.

    PYTHONPATH=$EDM_SOURCE python tests/edm_reference.py OUT.npz
"""

import json
import os
import sys

import numpy as np
import torch

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden')

def _network(networks, npz, meta, precond_key):
    data = np.load(os.path.join(GOLDEN, npz), allow_pickle=False)
    net = getattr(networks, meta[precond_key])(**meta['constructor_kwargs'])
    net.load_state_dict({k[len('state/'):]: torch.from_numpy(data[k]) for k in data.files if k.startswith('state/')}, strict=True)
    return net, data

def gradient_case(networks, name, meta):
    """The golden gradient case `name` (grads/README.json's call) with `networks`: returns the
    output and the network, its gradients filled in, and the case's data."""
    net, data = _network(networks, f'grads/{name}.npz', meta, 'precond')
    net.train()
    y, n, sigma = (torch.from_numpy(data[k]) for k in ('y', 'n', 'sigma'))
    labels, augment_labels = (torch.from_numpy(data[k]) if k in data.files else None for k in ('class_labels', 'augment_labels'))
    D = net(y + n * sigma[:, None, None, None], sigma, labels, augment_labels=augment_labels)
    w = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    (w[:, None, None, None] * (D - y) ** 2).sum().backward()
    return D.detach(), net, data

def compute(networks, samplers):
    """Arrays by name: the golden gradient cases (output and every gradient), the golden network
    cases' outputs and the golden sampler configurations' images, with `networks` (a module like
    EDM's training/networks.py) and `samplers` (one with EDM's edm_sampler and ablation_sampler)."""
    torch.set_num_threads(1)
    out = {}
    grads = json.load(open(os.path.join(GOLDEN, 'grads', 'README.json')))['networks']
    for name, meta in sorted(grads.items()):
        D, net, _ = gradient_case(networks, name, meta)
        out[f'grads/{name}/out'] = D.numpy()
        for key, p in net.named_parameters():
            if p.grad is not None:
                out[f'grads/{name}/grad/{key}'] = p.grad.numpy()

    for case in sorted(f[:-5] for f in os.listdir(os.path.join(GOLDEN, 'networks')) if f.endswith('.json')):
        meta = json.load(open(os.path.join(GOLDEN, 'networks', f'{case}.json')))
        net, data = _network(networks, f'networks/{case}.npz', meta, 'precond_class')
        labels = torch.from_numpy(data['class_labels']) if 'class_labels' in data.files else None
        with torch.no_grad():
            y = net.eval()(torch.from_numpy(data['x']), torch.from_numpy(data['sigma']), labels, force_fp32=True,
                           augment_labels=torch.from_numpy(data['augment_labels']))
        out[f'networks/{case}'] = y.numpy()

    configs = json.load(open(os.path.join(GOLDEN, 'sampler', 'README.json')))['configs']
    for name, cfg in sorted(configs.items()):
        meta = json.load(open(os.path.join(GOLDEN, cfg['network_json'])))
        net, _ = _network(networks, cfg['network'], meta, 'precond_class')
        net.eval().requires_grad_(False)
        seeds = range(4)
        latents = torch.stack([torch.randn([net.img_channels, net.img_resolution, net.img_resolution],
                                           generator=torch.Generator().manual_seed(s)) for s in seeds])
        labels = None
        if net.label_dim:
            labels = torch.eye(net.label_dim)[torch.tensor([s % net.label_dim for s in seeds])]
        gen = torch.Generator().manual_seed(0)
        randn_like = lambda x: torch.randn(x.shape, dtype=x.dtype, generator=gen)
        with torch.no_grad():
            images = getattr(samplers, cfg['sampler'])(net, latents, labels, randn_like=randn_like, **cfg['kwargs'])
        out[f'sampler/{name}'] = images.numpy()
    return out

if __name__ == '__main__':
    source = os.environ.get('EDM_SOURCE', '')
    import generate as edm_generate # EDM's generate.py holds its samplers
    from training import networks as edm_networks
    for module in (edm_generate, edm_networks):
        if not os.path.abspath(module.__file__).startswith(os.path.abspath(source) + os.sep):
            sys.exit(f'{module.__name__} came from {module.__file__}, not from EDM_SOURCE={source!r}')
    np.savez(sys.argv[1], **compute(edm_networks, edm_generate))
