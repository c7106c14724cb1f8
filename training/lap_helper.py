"""lap's assignment solver, and a helper process that runs it for the AOT pool builder.

lap holds the GIL for a whole solve, so the trainer's threads would stall beside it: the pool
builder sends the cost matrices to this file run as a script instead (training/pools.py). It
imports only numpy and lap, not torch or the training script, so the process stays small.
"""

import pickle
import sys

import lap
import numpy as np

def solve(cost):
    """Column assigned to each row of a square float64 cost matrix."""
    return lap.lapjv(cost, extend_cost=False)[1]

def serve(inp, out):
    # Until the pool builder closes the pipe: a pickled list of float32 cost matrices in, their
    # columns out.
    while True:
        try:
            costs = pickle.load(inp)
        except EOFError:
            return
        pickle.dump([solve(np.asarray(cost, np.float64)) for cost in costs], out)
        out.flush()

if __name__ == '__main__':
    serve(sys.stdin.buffer, sys.stdout.buffer)
