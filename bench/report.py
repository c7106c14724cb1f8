"""Shared by the benchmarks: the machine they ran on and their sections of docs/benchmarks.md."""

import os
import platform
import shlex
import subprocess
import sys
import time

import torch

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'benchmarks.md')
HEADER = """# Benchmarks

Made by the scripts in `bench/`; each script measures its numbers side by side in one run and
rewrites its own section below (between its markers), with the command that made it. Numbers from a
shared CPU machine are noisy: compare the ratios within a section, not absolute figures across sections.
"""

def machine():
    """One line describing where the numbers come from; call it before measuring (load average)."""
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU only, {os.cpu_count()} cores'
    return f'{platform.node() or "host"}: {device}, torch {torch.__version__}, torch threads {torch.get_num_threads()}, load average {load:.1f}'

def provenance():
    """What made the numbers, for a results file: the checkout's commit (and whether it had changes),
    torch, its thread count (and OMP_NUM_THREADS), the CPU and the command."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *args: subprocess.run(['git', '-C', root, *args], capture_output=True, text=True).stdout.strip()
    try:
        commit, dirty = git('rev-parse', 'HEAD') or None, bool(git('status', '--porcelain', '--untracked-files=no'))
    except OSError: # no git
        commit, dirty = None, None
    cpu = platform.processor()
    if os.path.isfile('/proc/cpuinfo'):
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    return dict(commit=commit, dirty=dirty, torch=torch.__version__, threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get('OMP_NUM_THREADS'), cpu=cpu or None, cores=os.cpu_count(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
                date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), command=command())

def provenance_line(p):
    """provenance() in one line of markdown."""
    commit = f'{p["commit"][:12]}{" (with uncommitted changes)" if p["dirty"] else ""}' if p.get('commit') else 'unknown commit'
    return (f'commit {commit}, torch {p["torch"]}, {p["threads"]} torch threads (OMP_NUM_THREADS={p["omp_num_threads"]}), '
            f'{p["cpu"]} ({p["cores"]} cores), {p["device"]}, {p["date"]}: `{p["command"]}`')

def command():
    return 'python ' + ' '.join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])

def update_section(name, body, env, doc=DOC):
    """Replace the section of bench `name` in docs/benchmarks.md (append it if new), atomically."""
    begin, end = f'<!-- bench:{name} -->', f'<!-- /bench:{name} -->'
    text = open(doc).read() if os.path.isfile(doc) else HEADER
    stamp = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    section = f'{begin}\n{body.rstrip()}\n\nMeasured {stamp} on {env} at start.\n\n```\n{command()}\n```\n{end}'
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + '\n\n' + section + '\n'
    tmp = doc + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, doc)
    print(f'Updated section "{name}" of {doc}')
