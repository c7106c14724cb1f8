"""Moved: generate.py's reusable parts are sampling/generate.py (samplers by options,
generate_images, PNG writing) and sampling/seeds.py (parse_seeds). This module keeps the old names
importable."""

from sampling.generate import (FEW_STEP, choose_sampler, few_step_kwargs, png_name, sample_batch, # noqa: F401
                               write_behind, write_pngs)
from sampling.seeds import MAX_SEEDS, SEED_LIMIT, parse_seeds # noqa: F401

def sample_then_write(batches, sample, write):
    """write_behind over sample(batch) for each batch: the future of write(*sample(batch), batch), one batch late."""
    yield from write_behind(((batch, *sample(batch)) for batch in batches), write)
