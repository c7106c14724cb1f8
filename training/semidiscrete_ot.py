"""Moved: the semi-discrete OT map and OT-start sampling are sampling/ot_start.py. This module keeps
the old names importable."""

from sampling.ot_start import * # noqa: F401,F403
from sampling.ot_start import OTMap, assign, cell_masses, data_targets, describe, fit_potentials, mass_report, ode_states, ode_targets, ot_start_sampler # noqa: F401
