"""The resumable image folder of generate.py: one PNG per seed, dataset.json (the class of each
image, EDM's dataset format) and sampling.json (how each image was made).

PNGs appear complete or not at all (written under a temporary name and renamed), and dataset.json
and sampling.json are rewritten atomically once each batch's PNGs are written, so at any moment a
run can stop and a later run into the same folder continues where it stopped: ImageFolder.open()
finds the seeds still to do, add() lists a batch's PNGs, save() rewrites the two files."""

import json
import os
import re

import numpy as np
import torch

import dnnlib
from dnnlib.util import one_line
from sampling.generate import png_name

TEMP_FILE = re.compile(r'.+\.(png|json)\.tmp-[0-9a-f]{32}') # dnnlib.util's temporary names (atomic_write, write_atomic)

def scan_outdir(outdir):
    """Relative paths of the files in outdir, after removing the temporary files of an interrupted write."""
    found = set()
    for dirpath, _dirs, files in os.walk(outdir):
        for name in files:
            if TEMP_FILE.fullmatch(name):
                os.remove(os.path.join(dirpath, name))
            else:
                found.add(os.path.relpath(os.path.join(dirpath, name), outdir).replace(os.sep, '/'))
    return found

def read_labels(outdir):
    """{file: class} of outdir/dataset.json ({} if there is none); ValueError if it is not one."""
    path = os.path.join(outdir, 'dataset.json')
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return dict((name, int(label)) for name, label in json.load(f).get('labels') or [])
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f'{path} is not a dataset.json of class labels ({one_line(e)}); '
                         'delete it and generate.py writes it again for the PNGs there')

def write_labels(outdir, labels):
    """outdir/dataset.json in EDM's dataset format, so that the images form a labelled dataset
    (e.g. fakes for train_discriminator.py --cond=1)."""
    dnnlib.util.write_atomic(os.path.join(outdir, 'dataset.json'), json.dumps(dict(labels=sorted([name, label] for name, label in labels.items()))).encode())

# sampling.json records how each image was made: {"samplers": [{"sampler": ..., "nfe": ..., "levels": [...],
# "options": {...}, "guidance": ..., "ot_map": ..., "images": [names]}, ...]}, rewritten atomically with
# dataset.json. A folder continued with other settings keeps its images (labels merge over such runs,
# as before): the record says which settings made which image, and the run warns.
RECORD = 'sampling.json'

def jsonable(value):
    """value in JSON's types (tensors as lists, inf as a string), so that settings read back compare equal."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(key): jsonable(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value

def file_setting(path):
    """A file option as recorded: absolute for a local path, so that the folder's runs compare alike from any directory."""
    return None if path is None else path if '://' in path else os.path.abspath(path)

def read_record(outdir):
    """(settings of each sampler, {file: index into them}) of outdir/sampling.json (empty if none); ValueError if it is not one."""
    path = os.path.join(outdir, RECORD)
    if not os.path.isfile(path):
        return [], {}
    try:
        with open(path) as f:
            entries = json.load(f)['samplers']
        settings = [{key: value for key, value in entry.items() if key != 'images'} for entry in entries]
        return settings, {name: i for i, entry in enumerate(entries) for name in entry['images']}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f'{path} is not generate.py\'s record of how its images were made ({one_line(e)}); '
                         'delete it to continue, and the PNGs there are taken to be of this run\'s settings')

def write_record(outdir, settings, made):
    entries = [dict(s, images=sorted(name for name, index in made.items() if index == i)) for i, s in enumerate(settings)]
    dnnlib.util.write_atomic(os.path.join(outdir, RECORD), json.dumps(dict(samplers=[entry for entry in entries if entry['images']]), indent=1).encode())

def differences(old, new, prefix=''):
    """'key old -> new' for each setting that differs (nested dicts by dotted key; lists shortened)."""
    def short(value):
        if not isinstance(value, list):
            return json.dumps(value)
        items = [f'{x:.4g}' if isinstance(x, float) else json.dumps(x) for x in value]
        return '[' + ', '.join(items if len(items) <= 8 else items[:4] + ['...'] + items[-2:]) + ']'
    found = []
    for key in [*old, *[k for k in new if k not in old]]:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f'{prefix}{key}.')
        elif a != b:
            found.append(f'{prefix}{key} {short(a)} -> {short(b)}' if short(a) != short(b) else f'{prefix}{key} differ in the 5th digit or beyond')
    return found

def other_settings(settings, current, made, kept):
    """(names, sorted, of the images kept (names in kept and listed in made) that were made with other
    settings than settings[current]; 'key old -> new' for the first one's settings)."""
    other = sorted(name for name in kept if name in made and settings[made[name]] != settings[current])
    return other, (differences(settings[made[other[0]]], settings[current]) if other else [])

class ImageFolder:
    """outdir as a set of seeds' PNGs, with their labels and record, kept by rank 0.

    open(seeds, record, force) decides which seeds remain (todo), brings dataset.json up to date with
    the PNGs there (an interruption can leave the last batch unlisted) and sampling.json with the
    record of this run's settings; add(written) lists a batch's {name: class}; save() writes both files."""

    def __init__(self, outdir, subdirs=False, labelled=False):
        self.outdir, self.subdirs, self.labelled = outdir, subdirs, labelled
        self.present, self.labels, self.made, self.settings, self.current = set(), {}, {}, [], 0
        self.mixed, self.mixed_differences = [], [] # kept images made with other settings, and how the first one's differ

    def open(self, seeds, record, force=False, classes_of=None, batch_size=64):
        """The seeds still to do (all with force). classes_of(seeds) -> their classes, for PNGs that
        dataset.json misses (labelled folders). OSError or ValueError for a folder that cannot be continued."""
        outdir, subdirs = self.outdir, self.subdirs
        files = scan_outdir(outdir)
        names = {png_name(seed, subdirs) for seed in seeds}
        self.present = present = names & files
        todo = seeds if force else [seed for seed in seeds if png_name(seed, subdirs) not in present]
        # Images of this run's seeds that sampling.json misses were written by a run killed before it
        # recorded them (or by a generate.py before the record): taken to be of this run's settings.
        settings, made = read_record(outdir)
        made = {name: index for name, index in made.items() if name in files}
        current = settings.index(record) if record in settings else len(settings)
        settings = settings[:current] + [record]
        made.update((name, current) for name in present - made.keys())
        self.mixed, self.mixed_differences = other_settings(settings, current, made, files - {png_name(seed, subdirs) for seed in todo})
        self.settings, self.current, self.made = settings, current, made
        if made:
            write_record(outdir, settings, made)
        if self.labelled:
            labels = {name: label for name, label in read_labels(outdir).items() if name in files}
            unlisted = [seed for seed in seeds if png_name(seed, subdirs) in present - labels.keys()]
            for chunk in (unlisted[i : i + batch_size] for i in range(0, len(unlisted), batch_size)):
                labels.update((png_name(seed, subdirs), label) for seed, label in zip(chunk, classes_of(chunk)))
            if labels or 'dataset.json' in files:
                write_labels(outdir, labels)
            self.labels = labels
        return todo

    def add(self, written):
        """List a batch's PNGs ({name: class}) as made with this run's settings."""
        self.present.update(written)
        self.labels.update(written)
        self.made.update(dict.fromkeys(written, self.current))

    def save(self):
        if self.labelled:
            write_labels(self.outdir, self.labels)
        write_record(self.outdir, self.settings, self.made)

#----------------------------------------------------------------------------
