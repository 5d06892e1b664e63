"""A1111 sampler and "Schedule type" names, mapped onto diffusers schedulers.

Why: A1111 users (and their infotexts, API scripts and X/Y/Z plots) name samplers
"DPM++ 2M" + schedule "Karras", or with the pre-1.9 combined names such as
"DPM++ 2M Karras". diffusers instead has one scheduler class per algorithm with
options (``use_karras_sigmas``, ``algorithm_type``, ``timestep_spacing``…). This
module is the one table between the two.

Schedule types:

* ``Automatic`` — the sampler's A1111 default: Karras for DPM++ 2M, DPM++ SDE,
  DPM2 and DPM2 a; Exponential for DPM++ 2M SDE; otherwise the model's own
  discrete schedule (its scheduler config unchanged, so "Euler" + Automatic is
  exactly diffusers' ``EulerDiscreteScheduler.from_config(pipe.scheduler.config)``).
* ``Uniform`` — the model's own discrete schedule.
* ``Karras`` / ``Exponential`` — ``use_karras_sigmas`` / ``use_exponential_sigmas``.
* ``SGM Uniform`` — ``timestep_spacing="trailing"``.

Timestep samplers (Euler a, DDIM, PLMS, LCM, DDPM) have no sigma schedule option in
diffusers; as in A1111 for its timestep samplers, Karras/Exponential are then
ignored — :func:`effective_schedule` says what is really used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    scheduler: str  # diffusers class name
    options: dict = field(default_factory=dict)  # extra config passed to from_config
    default_schedule: str = "Uniform"  # what "Automatic" means for this sampler
    aliases: tuple[str, ...] = ()
    sigma_schedules: bool = True  # accepts use_karras_sigmas / use_exponential_sigmas
    api_options: dict = field(default_factory=dict)


SAMPLER_SPECS: tuple[SamplerSpec, ...] = (
    SamplerSpec("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
                "Karras", ("k_dpmpp_2m",)),
    SamplerSpec("DPM++ SDE", "DPMSolverSDEScheduler", {}, "Karras", ("k_dpmpp_sde",),
                api_options={"second_order": "True", "brownian_noise": "True"}),
    SamplerSpec("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, "Exponential", ("k_dpmpp_2m_sde",),
                api_options={"brownian_noise": "True"}),
    SamplerSpec("Euler a", "EulerAncestralDiscreteScheduler", {}, "Uniform", ("k_euler_a", "k_euler_ancestral"),
                sigma_schedules=False, api_options={"uses_ensd": "True"}),
    SamplerSpec("Euler", "EulerDiscreteScheduler", {}, "Uniform", ("k_euler",)),
    SamplerSpec("LMS", "LMSDiscreteScheduler", {}, "Uniform", ("k_lms",)),
    SamplerSpec("Heun", "HeunDiscreteScheduler", {}, "Uniform", ("k_heun",), api_options={"second_order": "True"}),
    SamplerSpec("DPM2", "KDPM2DiscreteScheduler", {}, "Karras", ("k_dpm_2",),
                api_options={"discard_next_to_last_sigma": "True", "second_order": "True"}),
    SamplerSpec("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, "Karras", ("k_dpm_2_a",),
                api_options={"discard_next_to_last_sigma": "True", "uses_ensd": "True", "second_order": "True"}),
    SamplerSpec("DDIM", "DDIMScheduler", {"set_alpha_to_one": False}, "Uniform", ("ddim",), sigma_schedules=False),
    SamplerSpec("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, "Uniform", ("plms",), sigma_schedules=False),
    SamplerSpec("UniPC", "UniPCMultistepScheduler", {}, "Uniform", ("unipc",)),
    SamplerSpec("LCM", "LCMScheduler", {}, "Uniform", ("k_lcm", "lcm"), sigma_schedules=False),
    SamplerSpec("DDPM", "DDPMScheduler", {}, "Uniform", ("ddpm",), sigma_schedules=False),
)

SAMPLERS: tuple[str, ...] = tuple(s.name for s in SAMPLER_SPECS)
#: A1111's labels, with the lower-case API names (``/sdapi/v1/schedulers``) beside them.
SCHEDULE_TYPES: tuple[str, ...] = ("Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform")
SCHEDULE_API_NAMES = {"Automatic": "automatic", "Uniform": "uniform", "Karras": "karras",
                      "Exponential": "exponential", "SGM Uniform": "sgm_uniform"}


def _spec(name: str) -> SamplerSpec:
    for spec in SAMPLER_SPECS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")


def _match_schedule(text: str) -> str | None:
    t = text.strip().lower().replace("_", " ")
    for label in SCHEDULE_TYPES:
        if t == label.lower():
            return label
    return None


def _match_sampler(text: str) -> str | None:
    t = text.strip().lower()
    for spec in SAMPLER_SPECS:
        if t == spec.name.lower() or t in spec.aliases:
            return spec.name
    return None


def resolve_sampler(name: str, schedule: str | None = "Automatic") -> tuple[str, str]:
    """Canonical (sampler, schedule type) for A1111 names, aliases and legacy combined names.

    ``resolve_sampler("DPM++ 2M Karras")`` → ``("DPM++ 2M", "Karras")``. A schedule given inside the
    legacy name wins over an ``Automatic`` *schedule*. Raises ValueError listing the valid names.
    """
    problems = []
    label = _match_schedule(schedule or "Automatic")
    if label is None:
        problems.append(f"unknown schedule type {schedule!r}; valid schedule types: {', '.join(SCHEDULE_TYPES)}")
    sampler = _match_sampler(name or "")
    if sampler is None and name:
        for suffix in ("Karras", "Exponential", "SGM Uniform", "Uniform"):  # pre-1.9 combined names
            if name.strip().lower().endswith(" " + suffix.lower()):
                sampler = _match_sampler(name.strip()[: -len(suffix) - 1])
                if sampler is not None and label in (None, "Automatic"):
                    label = suffix
                break
    if sampler is None:
        problems.append(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)} "
                        "(legacy names like 'DPM++ 2M Karras' also work)")
    if problems:
        raise ValueError("; ".join(problems))
    return sampler, label


def effective_schedule(sampler: str, schedule: str) -> str:
    """The schedule really used: Automatic resolved, unsupported sigma schedules dropped."""
    spec = _spec(sampler)
    label = spec.default_schedule if schedule == "Automatic" else schedule
    if label in ("Karras", "Exponential") and not spec.sigma_schedules:
        return "Uniform"
    return label


def make_scheduler(pipe_scheduler_config, sampler: str, schedule: str = "Automatic", *, seed: int | None = None):
    """A diffusers scheduler for *sampler* × *schedule*, built on the model's own scheduler config.

    *pipe_scheduler_config* is ``pipe.scheduler.config`` (betas, training steps, prediction type and
    timestep spacing come from it). Names may be aliases or legacy combined names. *seed* seeds the
    Brownian-tree noise of "DPM++ SDE", which does not take the pipeline's generator (without it
    that sampler is not reproducible).
    """
    import diffusers
    sampler, schedule = resolve_sampler(sampler, schedule)
    spec = _spec(sampler)
    label = effective_schedule(sampler, schedule)
    if label != (spec.default_schedule if schedule == "Automatic" else schedule):
        log.info("%s has no %s schedule in diffusers; using its own timesteps", sampler, schedule)
    overrides = dict(spec.options)
    if spec.sigma_schedules:
        overrides.update(use_karras_sigmas=label == "Karras", use_exponential_sigmas=label == "Exponential",
                         use_beta_sigmas=False)
    if label == "SGM Uniform":
        overrides["timestep_spacing"] = "trailing"
    if sampler == "DPM++ SDE" and seed is not None:
        overrides["noise_sampler_seed"] = int(seed)
    if sampler == "UniPC" and label in ("Karras", "Exponential"):
        overrides["timestep_spacing"] = "linspace"
    cls = getattr(diffusers, spec.scheduler)
    config = {k: v for k, v in dict(pipe_scheduler_config).items() if not k.startswith("_")}
    return cls.from_config({**config, **overrides})


def sampler_aliases() -> list[dict]:
    """``GET /sdapi/v1/samplers`` items: ``{name, aliases, options}`` as A1111 returns them."""
    out = []
    for spec in SAMPLER_SPECS:
        options = dict(spec.api_options)
        if spec.default_schedule != "Uniform":
            options["scheduler"] = SCHEDULE_API_NAMES[spec.default_schedule]
        out.append({"name": spec.name, "aliases": list(spec.aliases), "options": options})
    return out


def schedulers_api() -> list[dict]:
    """``GET /sdapi/v1/schedulers`` items: ``{name, label, aliases, default_rho, need_inner_model}``."""
    rho = {"Karras": 7.0}
    return [{"name": SCHEDULE_API_NAMES[label], "label": label, "aliases": None,
             "default_rho": rho.get(label, -1.0), "need_inner_model": False} for label in SCHEDULE_TYPES]
