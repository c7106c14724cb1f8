"""Convert a network pickle (EDM/EDM-AOT snapshot) to the safe .safetensors format.

    python tools/convert_network.py --src=network-snapshot-200000.pkl --dest=edm-cifar10.safetensors

The result loads without running code from the file (generate.py --network=X.safetensors, or
training.network_io.load_network). Converting still unpickles the source once: do it only for
pickles you trust.
"""

import os

import click
import torch

from training import network_io

#----------------------------------------------------------------------------

@click.command()
@click.option('--src',  help='Network pickle to convert (path or URL)', metavar='PKL|URL', type=str, required=True)
@click.option('--dest', help='Output file', metavar='FILE.safetensors', type=str, required=True)
def main(src, dest):
    """Convert a network pickle to the safe format (safetensors weights + JSON constructor kwargs)."""
    if not dest.endswith('.safetensors'):
        raise click.BadParameter('must end with .safetensors', param_hint='--dest')
    if os.path.dirname(dest) and not os.path.isdir(os.path.dirname(dest)):
        raise click.BadParameter(f'directory {os.path.dirname(dest)} does not exist', param_hint='--dest')
    try:
        net = network_io.load_network(src)
        network_io.save_safe(net, dest)
        # Read it back the safe way and compare every tensor, so a bad file is never left behind silently.
        check = network_io.load_safe(dest)
    except (IOError, ValueError) as err:
        raise click.ClickException(str(err))
    ref, new = net.state_dict(), check.state_dict()
    if ref.keys() != new.keys() or not all(torch.equal(ref[k].cpu(), new[k]) for k in ref):
        os.remove(dest)
        raise click.ClickException(f'Verification failed: the weights read back from {dest} differ; nothing written')
    header = network_io.read_safe_header(dest)
    print(f'Wrote {dest}: {header["class_name"]}, {len(new)} tensors, {sum(t.numel() for t in new.values())} values; verified.')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
