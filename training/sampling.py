"""Moved: EDM's samplers are sampling/edm.py, their noise levels sampling/schedules.py, seeds and
latents sampling/seeds.py, the step record and denoiser wrappers sampling/denoisers.py, and DG's
boosted sampler sampling/guidance.py. This module keeps the documented names importable, and
edm_sampler's Discriminator Guidance arguments working (they now call DG's own sampler)."""

import torch

from sampling.denoisers import MinBatchNet, NFECounter, Step, trace_sampler # noqa: F401
from sampling.denoisers import Step as SamplerStep # noqa: F401
from sampling.edm import ablation_default_sigmas, ablation_sampler # noqa: F401
from sampling.edm import edm_sampler as _edm_sampler
from sampling.guidance import (DG_BOOST_CHURN, DG_BOOST_PERIOD, DG_BOOST_WEIGHT_PERIOD, dg_boost_churn, dg_slope, # noqa: F401
                               guided_edm_sampler, per_sample)
from sampling.schedules import (ablation_sigma_steps, edm_time_steps, iddpm_noise_levels, noise_schedule, # noqa: F401
                                signal_scaling, vp_betas, vp_sigma)
from sampling.seeds import StackedRandomGenerator, latents_for_seeds # noqa: F401

def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, *args, guidance=None, dg_weight=2.0, dg_weight_2nd=0.0,
                dg_boosting=False, **kwargs):
    """sampling.edm.edm_sampler; with guidance, sampling.guidance.guided_edm_sampler (the old DG arguments)."""
    if guidance is None:
        return _edm_sampler(net, latents, class_labels, randn_like, *args, **kwargs)
    return guided_edm_sampler(net, latents, class_labels, randn_like, *args, guidance=guidance, dg_weight=dg_weight,
                              dg_weight_2nd=dg_weight_2nd, dg_boosting=dg_boosting, **kwargs)
