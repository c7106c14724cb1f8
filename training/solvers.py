"""Moved: the few-step solvers are sampling/solvers.py, their noise levels sampling/schedules.py,
and DG's denoiser wrapper sampling/guidance.py. This module keeps the old names importable."""

from sampling.denoisers import Step as SolverStep # noqa: F401 (one step record for every sampler)
from sampling.guidance import GuidedDenoiser # noqa: F401
from sampling.schedules import (DISCRETIZATIONS, VP_EPSILON, check_sigmas, diff_sampler_vp, edm_sigmas, get_sigmas, # noqa: F401
                                logsnr_sigmas, read_sigmas, time_uniform_sigmas)
from sampling.solvers import * # noqa: F401,F403
from sampling.solvers import (ADAMS_BASHFORTH, DEFAULT_ORDER, SOLVERS, UNIPC_VARIANTS, VARIABLE_ORDER, check_solver, # noqa: F401
                              deis, deis_coefficients, denoise, dpm_solver_2, dpm_solver_pp, euler, ipndm, ipndm_v,
                              ipndm_v_weights, linear_multistep, lower_order, nfe, report, sample, unipc, unipc_coefficients)
