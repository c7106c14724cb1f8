"""train.py with a learning-rate warm-up that fits a short run.

EDM's training loop ramps the learning rate up over 10,000 kimg and train.py has no option for it,
so a CPU study of a few tens of kimg would train at ~0.1% of --lr. This runs train.py unchanged,
with one extra option in front: --lr-rampup=KIMG (default 2).

    python bench/study_train.py --lr-rampup=2 --outdir=... --data=... [any train.py option]
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train
from training import training_loop

def main():
    args, rampup = [], 2.0
    for arg in sys.argv[1:]:
        if arg.startswith('--lr-rampup='):
            rampup = float(arg.split('=', 1)[1])
        else:
            args.append(arg)
    # train.py calls training_loop.training_loop(**c): give that call our warm-up.
    training_loop.training_loop = functools.partial(training_loop.training_loop, lr_rampup_kimg=rampup)
    train.main(args)

if __name__ == '__main__':
    main()
