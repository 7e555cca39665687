"""A seeded, multi-animal simulator of motor-cortex spiking during reaching (plainly synthetic).

Why it exists: POYO's claims (Azabou et al. 2023) are about *multi-session pretraining* and
*few-shot transfer* to a new session or a new animal. Measuring those needs a corpus in which
(i) sessions of one animal share structure (the same neurons, partly re-recorded; the same latent
dynamics), (ii) animals share the behavioural structure and the *kind* of neural code but not the
neurons, and (iii) every session differs in ways a model must identify from a few trials (which
units, their baselines and gains). This module generates such corpora from a seed, in memory, as
:class:`~poyo_hf.data.schema.SessionRecording` objects; converters write them to disk.

Everything is labelled synthetic: ``lab = species = "synthetic"``, subject ids
``synthetic_animal_XX``, ``source = "poyo_hf synthetic simulator v1, seed N"``.

Generative model (numbers are the :class:`SimulatorConfig` defaults)
====================================================================

Notation: animal ``a``, session ``s``, pool neuron ``n``, time ``t`` (seconds, session clock).

**Behaviour** (2-D hand position ``p(t)`` in cm, velocity ``v(t)`` in cm/s). A session is a
sequence of trials, each preceded by an inter-trial gap (hand resting, ``U(0.2, 0.6)`` s). Every
movement is a minimum-jerk segment from ``p0`` to ``p1`` of duration ``T`` with a small
bell-shaped sideways curvature::

    tau = (t - t0) / T,   sigma(tau) = 10 tau^3 - 15 tau^4 + 6 tau^5,   h(tau) = 64 tau^3 (1-tau)^3
    p(t) = p0 + (p1 - p0) sigma(tau) + c |p1 - p0| n_perp h(tau),        c ~ N(0, 0.08^2)

The duration is set from a drawn peak speed ``v_pk ~ U(20, 60)`` cm/s: ``T = max(1.875 D / v_pk,
0.15 s)`` (1.875 D / T is the peak speed of a minimum-jerk profile), so reach peak speeds lie in
[20, 60] cm/s.

* ``center_out`` (8 targets at ``D = 8`` cm): hold at centre ``U(0.3, 0.7)`` s [epoch ``hold``]
  -> reach to one of 8 targets [``reach``] -> hold at the target ``U(0.2, 0.5)`` s [``hold``]
  -> return to the centre [``return``]. The trial is hold + reach + hold + return.
* ``random_target`` (sequences): a short hold ``U(0.2, 0.4)`` s, then 4 reaches to targets
  uniform in the square workspace ``[-10, 10]^2`` cm (at least 4 cm from the previous one), each
  followed by a ``U(0.1, 0.3)`` s hold; the whole trial is epoch ``random``.
* Inter-trial gaps are epoch ``hold``, so the epochs tile the whole session.
* With probability 0.05 per trial a tracking glitch of ``U(0.1, 0.3)`` s falls inside the trial:
  the recorded velocity there gets ``N(0, 25^2)`` cm/s noise and the stretch is epoch ``invalid``
  (loss weight 0, never scored). Elsewhere the recorded velocity carries ``N(0, 0.5^2)`` cm/s
  sensor noise and the position ``N(0, 0.02^2)`` cm. Behaviour is sampled at 100 Hz.

**Kinematic features** (dimensionless, evaluated ``lead_s = 0.1`` s in the *future*, so neural
activity leads behaviour by 100 ms)::

    k(t) = [vx, vy, |v|] / 20 cm/s  ++  [ax, ay] / 300 cm/s^2                     (5 features)

**Animal latent state** ``x_a(t)`` in R^8 (``latent_dim``)::

    x_a(t) = Q_a[:, :5] k(t + lead) + z_a(t)
    Q_a    = orth( sqrt(1 - alpha) G_0 + sqrt(alpha) G_a ),   G ~ N(0, 1)^{8 x 8},  alpha = 0.5

``G_0`` is shared by all animals of a corpus (seed-level), ``G_a`` is the animal's own, so the
latent geometry is partly shared across animals (``animal_specificity = alpha``). ``z_a`` is the
animal's slow latent noise: 4 independent rotational AR(1) planes (complex AR(1) on the
``rate_dt_s = 10`` ms grid)::

    zeta_j(t + dt) = rho_j e^{i 2 pi f_j dt} zeta_j(t) + sd * sqrt(1 - rho_j^2) * eps,
    rho_j = exp(-dt / tau_j),  tau_j ~ U(0.2, 1.0) s,  f_j ~ U(0.5, 2.5) Hz,  sd = 0.25

(stationary s.d. 0.25 per dimension; ``(Re, Im)`` of plane ``j`` are dims ``2j, 2j+1``). Because
``z`` lives in the same space as the kinematic drive, it is shared variability a decoder cannot
remove entirely.

**Neuron pool** of the animal (``pool_size = 1000``). Neuron ``n`` has a baseline rate
``b_n = clip(LogNormal(log 8 Hz, 0.9), 1, 60)`` Hz and latent read-out weights::

    w_n = Q_a[:, :5] u_n + Q_a[:, 5:] eta_n,        eta_n ~ N(0, 0.3^2 I_3)

so its kinematic tuning is exactly ``u_n`` (``w_n . Q_a k = u_n . k``), and ``eta_n`` loads it on
the latent directions that carry only noise. Tuning types (``tuning_mix``), modulation depth
``m_n ~ U(0.2, 0.6)`` per unit of the features:

* 55 % cosine velocity tuning: ``u = m [cos phi, sin phi, 0, 0, 0] + N(0, 0.05^2)``; preferred
  directions are half uniform and half bimodal around an animal-specific axis ``theta_a``
  (``theta_a`` or ``theta_a + pi``, von Mises kappa 2), as reported for M1 populations;
* 15 % speed tuning: ``u = +-m [0, 0, 1, 0, 0]`` (80 % positive);
* 15 % mixed: ``u = m * (random unit vector in R^5)`` (velocity, speed and acceleration);
* 15 % untuned: ``u = 0`` (only the latent noise modulates them).

**Session** ``s`` of animal ``a`` records ``N_s ~ U{30..300}`` (``units_range``) neurons drawn
without replacement from the pool (so sessions of one animal share ~N^2/1000 neurons: same array,
drifting units; unit ids are still new, ``f"{session_id}/unit_{k:04d}"``, in random order, since
POYO cannot know which units are the same). Per-session variation::

    g_{s,n} ~ LogNormal(0, 0.15)                    gain on w_n          (session_gain_sd)
    b_{s,n} = clip(b_n * LogNormal(0, 0.25), 1, 60) baseline drift      (session_baseline_sd)
    d_{s,n} ~ N(0, 0.2)                             slow within-session drift (within_session_drift_sd)

**Rates and spikes.** At the knots ``t_j = j * rate_dt_s`` (10 ms), linearly interpolated in
between (a continuous intensity)::

    log lam_{s,n}(t) = log b_{s,n} + g_{s,n} w_n . x_a(t) - c_{s,n} + d_{s,n} (t / T_s - 1/2)
    lam = min(lam, 150 Hz)                                                    (max_rate_hz)

where ``c_{s,n} = log mean_t exp(g_{s,n} w_n . x_a(t) + d_{s,n} (t / T_s - 1/2))`` (mean over the
session's knots), so ``b_{s,n}`` is the unit's mean rate before saturation and refractoriness.
Spikes are an exact inhomogeneous Poisson process for this piecewise-linear intensity, drawn by
time rescaling (vectorised, no per-spike loop): the number of spikes of unit n is
``Poisson(Lambda_n(T))`` with ``Lambda_n`` the integrated intensity, their rescaled times are
uniform on ``[0, Lambda_n(T))``, and they are mapped back through ``Lambda_n^{-1}`` (a quadratic
inside each bin, solved in closed form), giving continuous, sub-millisecond times with no grid
artefacts. An absolute refractory period of 2 ms (``refractory_s``) is then enforced by deleting
every spike that follows the previous spike of the same unit by less than 2 ms; this thins a
unit's rate by a factor of about ``exp(-lam * 2 ms)`` (2 % at 10 Hz, 11 % at 60 Hz) and
guarantees every ISI is at least 2 ms.

**Trials and splits.** A trial runs from the start of its first hold to the end of the return
(center-out) or of the hold after its last reach (random-target). Each trial together with the
inter-trial gap before it is one *chunk*; chunks are assigned whole to train / valid / test
(70 / 10 / 20 % of the trials, ``split_fractions``), either shuffled (``interleaved``, default)
or in time order (``blocked``). The split intervals tile ``[0, T_s)`` and are disjoint.

**Corpus parts.** ``heldout_animals`` (animals never seen in pretraining) and
``heldout_sessions_per_animal`` (the last k sessions of every other animal) define the parts
``pretrain`` / ``heldout_sessions`` / ``heldout_animals`` of :func:`corpus_plan` and
:func:`simulate_corpus`, for few-shot curves on a new session and on a new animal.

**Presets.** ``small()``: 2 animals x 2 sessions, 30-60 units, 20 trials (tests, ~0.1 s).
``quickstart()``: 4 x 6 sessions, 40-200 units, 100 trials, animal 3 and each animal's last
session held out (~1.4 h of data, ~3 s). ``benchmark()``: 4 x 30 sessions (POYO-mp's shape:
three animals to pretrain on, one held out), 30-300 units, 80-160 trials, center-out and
random-target sessions alternating, the last 2 sessions of each pretraining animal held out.

**What to expect** (measured with the ``tests/test_synthetic.py`` helpers on 2 animals x 2
sessions of 100-150 units and 100 center-out trials, seeds 0-7): a ridge decoder on sqrt spike
counts in two 100 ms windows (0-100 and 100-200 ms before each sample) reaches R^2 0.61-0.82 on
the test split's reach epochs (0.64-0.82 on benchmark sessions of both tasks), leaving headroom
for nonlinear decoders such as POYO; a single-window decoder's R^2 peaks at a neural lead of
91-104 ms (parabolic peak interpolation); a decoder moved to another session of the same animal
keeps 85-100 % of the in-session R^2 on the same shared units once units are matched by neuron
identity, and fails (R^2 < 0) with any other matching, in particular across animals. Median unit
rate ~8 Hz, mean ~11 Hz. Speed: ~0.25 us of CPU per spike, single-threaded numpy (no BLAS in the
hot path); 100 benchmark-sized sessions (9.5 h of data, 70 M spikes) take 15-20 s on a busy
2-core machine.

**Seeding.** Shared structure comes from ``SeedSequence(seed, spawn_key=(0,))``, animal ``a``
from ``spawn_key=(1, a)``, session ``(a, s)`` from ``spawn_key=(2, a, s)`` (behaviour, split
assignment, units and spikes from four children of it), so a session is identical whether
simulated alone or in a corpus, and its behaviour does not change when only neural settings
change.

Public API: :class:`SimulatorConfig` (presets ``small()``, ``quickstart()``, ``benchmark()``),
:func:`simulate_session`, :func:`simulate_corpus`, :func:`corpus_plan`, :func:`corpus_summary`,
:class:`SessionTruth` (the hidden ground truth of a session, for tests and analyses).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any, Literal, overload

import numpy as np

from .schema import SPLITS, SessionRecording

__all__ = [
    "SIMULATOR_VERSION",
    "TASK_NAMES",
    "SessionTruth",
    "SimulatorConfig",
    "animal_name",
    "corpus_plan",
    "corpus_summary",
    "session_name",
    "simulate_corpus",
    "simulate_session",
]

SIMULATOR_VERSION = "1"
#: Task value in :class:`SimulatorConfig` -> the ``task`` metadata written to recordings.
TASK_NAMES: dict[str, str] = {
    "center_out": "center_out_reaching",
    "random_target": "random_target_reaching",
}
TUNING_TYPES: tuple[str, ...] = ("velocity", "speed", "mixed", "untuned")
CorpusPart = Literal[
    "all", "pretrain", "heldout", "heldout_sessions", "heldout_animals"
]

_N_FEATURES = 5  # vx, vy, speed, ax, ay
_VEL_SCALE = 20.0  # cm/s
_ACC_SCALE = 300.0  # cm/s^2
_MIN_MOVE_S = 0.15  # shortest movement (caps peak speed of short random-target reaches)
_UNIT_CHUNK = (
    64  # units per block in the spike generator (bounds memory; fixed for determinism)
)
# epoch label codes used internally
_HOLD, _REACH, _RETURN, _RANDOM, _INVALID = 0, 1, 2, 3, 4
_LABELS = ("hold", "reach", "return", "random", "invalid")


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class SimulatorConfig:
    """Every knob of the simulator (see the module docstring for the equations).

    Times are in seconds, rates in Hz, distances in cm, speeds in cm/s. Ranges are ``(low, high)``
    and drawn uniformly unless the module docstring says otherwise.
    """

    seed: int = 0
    n_animals: int = 4
    sessions_per_animal: int = 4
    #: number of recorded units per session, drawn uniformly (inclusive)
    units_range: tuple[int, int] = (30, 300)
    #: neurons per animal from which each session records a random subset
    pool_size: int = 1000
    #: trials per session, drawn uniformly (inclusive); sets the session duration
    trials_range: tuple[int, int] = (100, 100)
    #: session s of an animal runs tasks[s % len(tasks)]
    tasks: tuple[str, ...] = ("center_out",)
    behavior_rate_hz: float = 100.0
    #: grid of the piecewise-constant firing intensity and of the latent dynamics
    rate_dt_s: float = 0.01
    #: neural activity at t encodes kinematics at t + lead_s
    lead_s: float = 0.1
    baseline_rate_range: tuple[float, float] = (1.0, 60.0)
    baseline_median_hz: float = 8.0
    baseline_log_sd: float = 0.9
    max_rate_hz: float = 150.0
    refractory_s: float = 0.002
    latent_dim: int = 8
    latent_noise_sd: float = 0.25
    latent_timescale_range_s: tuple[float, float] = (0.2, 1.0)
    latent_rotation_hz_range: tuple[float, float] = (0.5, 2.5)
    #: 0: every animal has the same latent geometry; 1: independent geometries
    animal_specificity: float = 0.5
    #: fractions of (velocity, speed, mixed, untuned) tuned neurons in a pool
    tuning_mix: tuple[float, float, float, float] = (0.55, 0.15, 0.15, 0.15)
    modulation_range: tuple[float, float] = (0.2, 0.6)
    noise_loading_sd: float = 0.3
    session_gain_sd: float = 0.15
    session_baseline_sd: float = 0.25
    within_session_drift_sd: float = 0.2
    n_targets: int = 8
    reach_distance_cm: float = 8.0
    peak_speed_range: tuple[float, float] = (20.0, 60.0)
    hold_range_s: tuple[float, float] = (0.3, 0.7)
    target_hold_range_s: tuple[float, float] = (0.2, 0.5)
    intertrial_gap_range_s: tuple[float, float] = (0.2, 0.6)
    random_target_reaches: int = 4
    workspace_half_width_cm: float = 10.0
    curvature_sd: float = 0.08
    invalid_trial_prob: float = 0.05
    velocity_noise_sd: float = 0.5
    position_noise_sd: float = 0.02
    #: fractions of trials in (train, valid, test)
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    split_mode: str = "interleaved"
    #: animals whose sessions are excluded from the "pretrain" part of the corpus
    heldout_animals: tuple[int, ...] = ()
    #: the last k sessions of every other animal are held out of "pretrain" too
    heldout_sessions_per_animal: int = 0
    brain_region: str = "M1"

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        # lists (e.g. from JSON) become tuples, so configs stay hashable and compare equal
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))

        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"SimulatorConfig.{name}={getattr(self, name)!r}: {msg}")

        def is_int(x: Any) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:
            return isinstance(
                x, (int, float, np.integer, np.floating)
            ) and not isinstance(x, bool)

        def pair(
            name: str, lo_min: float, integer: bool = False, strict: bool = False
        ) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (tuple, list)) and len(v) == 2
            ok = ok and all((is_int(x) if integer else is_num(x)) for x in v)
            if not ok:
                kind = "integers" if integer else "numbers"
                raise bad(name, f"must be a (low, high) pair of {kind}.")
            lo, hi = v
            if lo > hi:
                raise bad(name, "low must be <= high.")
            if lo < lo_min or (strict and lo <= lo_min):
                raise bad(name, f"low must be {'>' if strict else '>='} {lo_min}.")

        for name in (
            "seed",
            "n_animals",
            "sessions_per_animal",
            "pool_size",
            "latent_dim",
            "n_targets",
            "random_target_reaches",
            "heldout_sessions_per_animal",
        ):
            if not is_int(getattr(self, name)):
                raise bad(name, "must be an integer.")
        if self.seed < 0:
            raise bad("seed", "must be >= 0.")
        if self.n_animals < 1:
            raise bad("n_animals", "must be >= 1.")
        if self.sessions_per_animal < 1:
            raise bad("sessions_per_animal", "must be >= 1.")
        pair("units_range", 1, integer=True)
        if self.pool_size < self.units_range[1]:
            raise bad(
                "pool_size", f"must be >= units_range high ({self.units_range[1]})."
            )
        pair("trials_range", 5, integer=True)
        if not isinstance(self.tasks, (tuple, list)) or not self.tasks:
            raise bad("tasks", f"must be a non-empty tuple of {sorted(TASK_NAMES)}.")
        for t in self.tasks:
            if t not in TASK_NAMES:
                raise bad("tasks", f"unknown task {t!r}; use {sorted(TASK_NAMES)}.")
        for name in (
            "behavior_rate_hz",
            "rate_dt_s",
            "max_rate_hz",
            "baseline_median_hz",
            "reach_distance_cm",
            "workspace_half_width_cm",
        ):
            v = getattr(self, name)
            if not is_num(v) or not v > 0 or not math.isfinite(v):
                raise bad(name, "must be a finite number > 0.")
        if self.rate_dt_s > 0.02:
            raise bad(
                "rate_dt_s", "must be <= 0.02 s (rates change on ~50 ms time scales)."
            )
        for name in (
            "lead_s",
            "refractory_s",
            "baseline_log_sd",
            "latent_noise_sd",
            "noise_loading_sd",
            "session_gain_sd",
            "session_baseline_sd",
            "within_session_drift_sd",
            "curvature_sd",
            "velocity_noise_sd",
            "position_noise_sd",
        ):
            v = getattr(self, name)
            if not is_num(v) or v < 0 or not math.isfinite(v):
                raise bad(name, "must be a finite number >= 0.")
        if self.lead_s > 1.0:
            raise bad("lead_s", "must be <= 1 s.")
        if self.refractory_s >= 0.02:
            raise bad("refractory_s", "must be < 0.02 s.")
        pair("baseline_rate_range", 0.0, strict=True)
        if self.baseline_rate_range[1] > self.max_rate_hz:
            raise bad(
                "baseline_rate_range",
                f"high must be <= max_rate_hz ({self.max_rate_hz}).",
            )
        if self.refractory_s * self.max_rate_hz >= 1:
            raise bad("refractory_s", "refractory_s * max_rate_hz must be < 1.")
        if self.latent_dim < _N_FEATURES:
            raise bad(
                "latent_dim",
                f"must be >= {_N_FEATURES} (the number of kinematic features).",
            )
        pair("latent_timescale_range_s", 0.0, strict=True)
        pair("latent_rotation_hz_range", 0.0)
        if not is_num(self.animal_specificity) or not 0 <= self.animal_specificity <= 1:
            raise bad("animal_specificity", "must lie in [0, 1].")
        mix = self.tuning_mix
        if (
            not isinstance(mix, (tuple, list))
            or len(mix) != 4
            or not all(is_num(x) and x >= 0 for x in mix)
            or sum(mix) <= 0
        ):
            raise bad(
                "tuning_mix",
                "must be 4 non-negative numbers (velocity, speed, mixed, "
                "untuned) with a positive sum.",
            )
        pair("modulation_range", 0.0)
        if self.n_targets < 2:
            raise bad("n_targets", "must be >= 2.")
        pair("peak_speed_range", 0.0, strict=True)
        pair("hold_range_s", 0.0)
        pair("target_hold_range_s", 0.0)
        pair("intertrial_gap_range_s", 0.0)
        if self.intertrial_gap_range_s[0] <= 0:
            raise bad(
                "intertrial_gap_range_s", "low must be > 0 (trials must not touch)."
            )
        if self.random_target_reaches < 1:
            raise bad("random_target_reaches", "must be >= 1.")
        if self.workspace_half_width_cm < 3.0:
            raise bad(
                "workspace_half_width_cm",
                "must be >= 3 cm (targets are >= 4 cm apart).",
            )
        if not is_num(self.invalid_trial_prob) or not 0 <= self.invalid_trial_prob <= 1:
            raise bad("invalid_trial_prob", "must lie in [0, 1].")
        fr = self.split_fractions
        if (
            not isinstance(fr, (tuple, list))
            or len(fr) != 3
            or not all(is_num(x) and x >= 0 for x in fr)
            or abs(sum(fr) - 1) > 1e-6
            or fr[0] <= 0
        ):
            raise bad(
                "split_fractions",
                "must be 3 non-negative numbers (train, valid, test) "
                "summing to 1, with train > 0.",
            )
        if self.split_mode not in ("interleaved", "blocked"):
            raise bad("split_mode", "must be 'interleaved' or 'blocked'.")
        if not isinstance(self.heldout_animals, (tuple, list)) or not all(
            is_int(a) and 0 <= a < self.n_animals for a in self.heldout_animals
        ):
            raise bad(
                "heldout_animals",
                f"must be a tuple of animal indices in [0, {self.n_animals}).",
            )
        if len(set(self.heldout_animals)) >= self.n_animals:
            raise bad(
                "heldout_animals", "must leave at least one animal for pretraining."
            )
        if not 0 <= self.heldout_sessions_per_animal < self.sessions_per_animal:
            raise bad(
                "heldout_sessions_per_animal",
                f"must lie in [0, sessions_per_animal={self.sessions_per_animal}).",
            )
        if not isinstance(self.brain_region, str) or not self.brain_region:
            raise bad("brain_region", "must be a non-empty string.")

    # ------------------------------------------------------------------ presets
    @classmethod
    def small(cls, **overrides: Any) -> SimulatorConfig:
        """2 animals x 2 sessions, 30-60 units, 20 trials (~45 s) each; well under a second."""
        kw: dict[str, Any] = {
            "n_animals": 2,
            "sessions_per_animal": 2,
            "units_range": (30, 60),
            "trials_range": (20, 20),
            "pool_size": 200,
        }
        return cls(**{**kw, **overrides})

    @classmethod
    def quickstart(cls, **overrides: Any) -> SimulatorConfig:
        """4 animals x 6 sessions, 40-200 units, 100 trials; animal 3 and the last session of
        every other animal held out (few-shot on a new session and on a new animal)."""
        kw: dict[str, Any] = {
            "n_animals": 4,
            "sessions_per_animal": 6,
            "units_range": (40, 200),
            "trials_range": (100, 100),
            "heldout_animals": (3,),
            "heldout_sessions_per_animal": 1,
        }
        return cls(**{**kw, **overrides})

    @classmethod
    def benchmark(cls, **overrides: Any) -> SimulatorConfig:
        """4 animals x 30 sessions (the shape of POYO-mp: 3 animals pretrain, 1 held out),
        30-300 units, 80-160 trials (~3-5 min) per session, both tasks alternating; the last 2
        sessions of each pretraining animal are held out as new sessions."""
        kw: dict[str, Any] = {
            "n_animals": 4,
            "sessions_per_animal": 30,
            "units_range": (30, 300),
            "trials_range": (80, 160),
            "tasks": ("center_out", "random_target"),
            "heldout_animals": (3,),
            "heldout_sessions_per_animal": 2,
        }
        return cls(**{**kw, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SimulatorConfig:
        """``"small"``, ``"quickstart"`` or ``"benchmark"`` (with field overrides)."""
        presets = {
            "small": cls.small,
            "quickstart": cls.quickstart,
            "benchmark": cls.benchmark,
        }
        if name not in presets:
            raise ValueError(
                f"unknown simulator preset {name!r}; use one of {sorted(presets)}."
            )
        return presets[name](**overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists); ``from_dict`` inverts it."""
        return {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimulatorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown SimulatorConfig field(s) {unknown}; known: {sorted(known)}."
            )
        kwargs: dict[str, Any] = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()
        }
        return cls(**kwargs)

    @property
    def n_sessions(self) -> int:
        return self.n_animals * self.sessions_per_animal


# --------------------------------------------------------------------------- names and plan
def animal_name(animal: int) -> str:
    return f"synthetic_animal_{animal:02d}"


def session_name(config: SimulatorConfig, animal: int, session_index: int) -> str:
    """Globally unique session id (the seed is part of it, so corpora never collide)."""
    return f"synthetic_seed{config.seed}/animal{animal:02d}_session{session_index:03d}"


def _part_of(config: SimulatorConfig, animal: int, session_index: int) -> str:
    if animal in config.heldout_animals:
        return "heldout_animals"
    if session_index >= config.sessions_per_animal - config.heldout_sessions_per_animal:
        return "heldout_sessions"
    return "pretrain"


def corpus_plan(
    config: SimulatorConfig, part: CorpusPart = "all"
) -> list[dict[str, Any]]:
    """The sessions of a corpus without simulating them: one dict per session with
    ``animal``, ``session_index``, ``session_id``, ``subject_id``, ``task`` and ``part``
    (``pretrain`` / ``heldout_sessions`` / ``heldout_animals``).

    ``part`` filters: ``"all"``, ``"pretrain"``, ``"heldout"`` (both held-out kinds),
    ``"heldout_sessions"`` (new sessions of pretraining animals), ``"heldout_animals"``.
    """
    if part not in (
        "all",
        "pretrain",
        "heldout",
        "heldout_sessions",
        "heldout_animals",
    ):
        raise ValueError(
            f"part={part!r}: use 'all', 'pretrain', 'heldout', 'heldout_sessions' "
            "or 'heldout_animals'."
        )
    plan = []
    for a in range(config.n_animals):
        for s in range(config.sessions_per_animal):
            p = _part_of(config, a, s)
            if part == "all" or p == part or (part == "heldout" and p != "pretrain"):
                plan.append(
                    {
                        "animal": a,
                        "session_index": s,
                        "session_id": session_name(config, a, s),
                        "subject_id": animal_name(a),
                        "task": TASK_NAMES[config.tasks[s % len(config.tasks)]],
                        "part": p,
                    }
                )
    return plan


# --------------------------------------------------------------------------- trajectories
@dataclass
class _Plan:
    """Piecewise trajectory of one session: contiguous segments tiling [0, t_end)."""

    seg_start: np.ndarray  # (G,)
    seg_end: np.ndarray  # (G,)
    p0: np.ndarray  # (G, 2) cm
    p1: np.ndarray  # (G, 2) cm
    curv: np.ndarray  # (G,) sideways deviation / distance
    label: np.ndarray  # (G,) epoch label code
    trial_start: np.ndarray  # (n,)
    trial_end: np.ndarray  # (n,)
    chunk_start: np.ndarray  # (n,) start of the gap before trial i
    t_end: float


def _uniform(
    rng: np.random.Generator, lohi: tuple[float, float], size: Any
) -> np.ndarray:
    return rng.uniform(lohi[0], lohi[1], size)


def _move_duration(
    cfg: SimulatorConfig, dist: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    v_peak = _uniform(rng, cfg.peak_speed_range, dist.shape)
    return np.maximum(1.875 * dist / v_peak, _MIN_MOVE_S)


def _assemble(
    durs: np.ndarray,
    p0: np.ndarray,
    p1: np.ndarray,
    curv: np.ndarray,
    label: np.ndarray,
    final_gap: float,
    final_pos: np.ndarray,
    trial_cols: tuple[int, int],
) -> _Plan:
    """durs/label/curv: (n, K) per-trial segment tables (column 0 = the gap before the trial);
    p0/p1: (n, K, 2). Appends the final gap and flattens to a _Plan."""
    n, k = durs.shape
    d = np.concatenate([durs.reshape(-1), [final_gap]])
    ends = np.cumsum(d)
    # each start is exactly the previous end (ends - d would leave round-off gaps)
    starts = np.concatenate([[0.0], ends[:-1]])
    p0f = np.concatenate([p0.reshape(-1, 2), final_pos[None]])
    p1f = np.concatenate([p1.reshape(-1, 2), final_pos[None]])
    st = starts[:-1].reshape(n, k)
    en = ends[:-1].reshape(n, k)
    return _Plan(
        seg_start=starts,
        seg_end=ends,
        p0=p0f,
        p1=p1f,
        curv=np.concatenate([curv.reshape(-1), [0.0]]),
        label=np.concatenate([label.reshape(-1), [_HOLD]]).astype(np.int8),
        trial_start=st[:, trial_cols[0]].copy(),
        trial_end=en[:, trial_cols[1]].copy(),
        chunk_start=st[:, 0].copy(),
        t_end=float(ends[-1]),
    )


def _plan_center_out(cfg: SimulatorConfig, n: int, rng: np.random.Generator) -> _Plan:
    # columns: gap, hold at centre, reach, hold at target, return
    ang = 2 * np.pi * rng.integers(0, cfg.n_targets, n) / cfg.n_targets
    target = cfg.reach_distance_cm * np.stack([np.cos(ang), np.sin(ang)], 1)  # (n, 2)
    dist = np.full((n, 2), cfg.reach_distance_cm)
    move = _move_duration(cfg, dist, rng)  # (n, 2): reach, return
    durs = np.stack(
        [
            _uniform(rng, cfg.intertrial_gap_range_s, n),
            _uniform(rng, cfg.hold_range_s, n),
            move[:, 0],
            _uniform(rng, cfg.target_hold_range_s, n),
            move[:, 1],
        ],
        1,
    )
    zero = np.zeros((n, 2))
    p0 = np.stack([zero, zero, zero, target, target], 1)
    p1 = np.stack([zero, zero, target, target, zero], 1)
    curv = np.zeros((n, 5))
    curv[:, [2, 4]] = rng.normal(0, cfg.curvature_sd, (n, 2))
    label = np.tile(np.array([_HOLD, _HOLD, _REACH, _HOLD, _RETURN]), (n, 1))
    final_gap = float(_uniform(rng, cfg.intertrial_gap_range_s, None))
    return _assemble(durs, p0, p1, curv, label, final_gap, np.zeros(2), (1, 4))


def _plan_random_target(
    cfg: SimulatorConfig, n: int, rng: np.random.Generator
) -> _Plan:
    r, w = cfg.random_target_reaches, cfg.workspace_half_width_cm
    m = n * r
    # targets uniform in the workspace, redrawn until consecutive ones are >= 4 cm apart
    tg = rng.uniform(-w, w, (m, 2))
    for _ in range(1000):
        prev = np.concatenate([np.zeros((1, 2)), tg[:-1]])
        close = np.linalg.norm(tg - prev, axis=1) < 4.0
        if not close.any():
            break
        tg[close] = rng.uniform(-w, w, (int(close.sum()), 2))
    start = np.concatenate([np.zeros((1, 2)), tg[:-1]])  # (m, 2)
    move = _move_duration(cfg, np.linalg.norm(tg - start, axis=1), rng).reshape(n, r)
    holds = rng.uniform(0.1, 0.3, (n, r))
    # columns: gap, initial hold, (reach, hold) x r
    k = 2 + 2 * r
    durs = np.empty((n, k))
    durs[:, 0] = _uniform(rng, cfg.intertrial_gap_range_s, n)
    durs[:, 1] = rng.uniform(0.2, 0.4, n)
    durs[:, 2::2] = move
    durs[:, 3::2] = holds
    s3 = start.reshape(n, r, 2)
    t3 = tg.reshape(n, r, 2)
    p0 = np.empty((n, k, 2))
    p1 = np.empty((n, k, 2))
    p0[:, 0] = p1[:, 0] = p0[:, 1] = p1[:, 1] = s3[
        :, 0
    ]  # rest where the last trial ended
    p0[:, 2::2], p1[:, 2::2] = s3, t3
    p0[:, 3::2] = p1[:, 3::2] = t3
    curv = np.zeros((n, k))
    curv[:, 2::2] = rng.normal(0, cfg.curvature_sd, (n, r))
    label = np.full((n, k), _RANDOM)
    label[:, 0] = _HOLD
    final_gap = float(_uniform(rng, cfg.intertrial_gap_range_s, None))
    return _assemble(durs, p0, p1, curv, label, final_gap, tg[-1], (1, k - 1))


def _kinematics(
    plan: _Plan, t: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Position (cm), velocity (cm/s), acceleration (cm/s^2) at times t, each (len(t), 2).
    Times past the session end hold the final position."""
    g = np.clip(
        np.searchsorted(plan.seg_start, t, side="right") - 1, 0, plan.seg_start.size - 1
    )
    dur = (plan.seg_end - plan.seg_start)[g]
    tau = np.clip((t - plan.seg_start[g]) / dur, 0.0, 1.0)
    delta = plan.p1[g] - plan.p0[g]  # (T, 2)
    dist = np.linalg.norm(delta, axis=1)
    perp = np.stack([-delta[:, 1], delta[:, 0]], 1) * plan.curv[g, None]  # c |d| n_perp
    t2, t3 = tau * tau, tau * tau * tau
    om = 1.0 - tau
    sig = t3 * (10 - 15 * tau + 6 * t2)
    dsig = 30 * t2 * om * om
    ddsig = 60 * tau * om * (1 - 2 * tau)
    h = 64 * t3 * om**3
    dh = 192 * t2 * om * om * (1 - 2 * tau)
    ddh = 384 * tau * om * ((1 - 2 * tau) ** 2 - tau * om)
    moving = (dist > 0)[:, None]
    pos = plan.p0[g] + delta * sig[:, None] + perp * h[:, None]
    vel = np.where(
        moving, (delta * dsig[:, None] + perp * dh[:, None]) / dur[:, None], 0.0
    )
    acc = np.where(
        moving, (delta * ddsig[:, None] + perp * ddh[:, None]) / dur[:, None] ** 2, 0.0
    )
    return pos, vel, acc


def _epochs(
    plan: _Plan, inv_s: np.ndarray, inv_e: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Epoch intervals tiling [0, t_end): segment labels, overridden by invalid windows, with
    runs of equal labels merged."""
    b = np.unique(np.concatenate([plan.seg_start, [plan.t_end], inv_s, inv_e]))
    mid = 0.5 * (b[:-1] + b[1:])
    lab = plan.label[np.searchsorted(plan.seg_start, mid, side="right") - 1].copy()
    if inv_s.size:
        j = np.searchsorted(inv_s, mid, side="right") - 1
        inside = (j >= 0) & (mid < inv_e[np.maximum(j, 0)])
        lab[inside] = _INVALID
    change = np.flatnonzero(np.diff(lab) != 0) + 1
    first = np.concatenate([[0], change])
    last = np.concatenate([change, [lab.size]])
    starts, ends, labs = b[first], b[last], lab[first]
    return {
        _LABELS[c]: (starts[labs == c], ends[labs == c])
        for c in np.unique(labs).tolist()
    }


def _splits(
    cfg: SimulatorConfig, plan: _Plan, rng: np.random.Generator
) -> tuple[dict, np.ndarray]:
    """Whole chunks (gap + trial) to train/valid/test; merged intervals tiling [0, t_end)."""
    n = plan.trial_start.size
    n_valid = round(cfg.split_fractions[1] * n)
    n_test = round(cfg.split_fractions[2] * n)
    n_train = n - n_valid - n_test
    code = np.repeat(np.arange(3), [n_train, n_valid, n_test])
    if cfg.split_mode == "interleaved":
        code = rng.permutation(code)
    c_start = plan.chunk_start
    c_end = np.concatenate([plan.chunk_start[1:], [plan.t_end]])
    change = np.flatnonzero(np.diff(code) != 0) + 1
    first = np.concatenate([[0], change])
    last = np.concatenate([change, [n]]) - 1
    splits = {}
    for i, name in enumerate(SPLITS):
        sel = code[first] == i
        splits[name] = (c_start[first[sel]], c_end[last[sel]])
    return splits, code


# --------------------------------------------------------------------------- animals
@dataclass
class _Animal:
    q: np.ndarray  # (d, d) orthonormal latent basis; columns [:5] carry kinematics
    tau: np.ndarray  # (P,) latent plane time constants (s)
    freq: np.ndarray  # (P,) rotation frequencies (Hz)
    baseline: np.ndarray  # (pool,) Hz
    w: np.ndarray  # (pool, d) latent read-out weights
    u: np.ndarray  # (pool, 5) kinematic tuning
    tuning: np.ndarray  # (pool,) index into TUNING_TYPES
    pd_axis: float


def _rng(cfg: SimulatorConfig, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=key))


def _orth(m: np.ndarray) -> np.ndarray:
    q, r = np.linalg.qr(m)
    return q * np.sign(np.diag(r))[None, :]  # unique QR: positive diagonal of R


@lru_cache(maxsize=32)
def _make_animal(cfg: SimulatorConfig, animal: int) -> _Animal:
    """The animal's latent geometry, noise dynamics and neuron pool (cached: configs are
    frozen and hashable; callers must not modify the arrays)."""
    d = cfg.latent_dim
    g0 = _rng(cfg, 0).standard_normal((d, d))
    rng = _rng(cfg, 1, animal)
    ga = rng.standard_normal((d, d))
    alpha = cfg.animal_specificity
    q = _orth(math.sqrt(1 - alpha) * g0 + math.sqrt(alpha) * ga)
    n_planes = (d + 1) // 2
    tau = _uniform(rng, cfg.latent_timescale_range_s, n_planes)
    freq = _uniform(rng, cfg.latent_rotation_hz_range, n_planes)
    pool = cfg.pool_size
    lo, hi = cfg.baseline_rate_range
    base = np.clip(
        cfg.baseline_median_hz
        * np.exp(cfg.baseline_log_sd * rng.standard_normal(pool)),
        lo,
        hi,
    )
    mix = np.asarray(cfg.tuning_mix, float)
    tuning = rng.choice(4, size=pool, p=mix / mix.sum())
    m = _uniform(rng, cfg.modulation_range, pool)
    pd_axis = float(rng.uniform(0, 2 * np.pi))
    bimodal = rng.random(pool) < 0.5
    phi = np.where(
        bimodal,
        pd_axis + np.pi * (rng.random(pool) < 0.5) + rng.vonmises(0.0, 2.0, pool),
        rng.uniform(0, 2 * np.pi, pool),
    )
    u = np.zeros((pool, _N_FEATURES))
    vel = np.stack([np.cos(phi), np.sin(phi)], 1) * m[:, None]
    u_vel = np.concatenate([vel, np.zeros((pool, 3))], 1) + 0.05 * rng.standard_normal(
        (pool, _N_FEATURES)
    )
    sign = np.where(rng.random(pool) < 0.8, 1.0, -1.0)
    u_speed = np.zeros((pool, _N_FEATURES))
    u_speed[:, 2] = sign * m
    rnd = rng.standard_normal((pool, _N_FEATURES))
    u_mixed = rnd / np.linalg.norm(rnd, axis=1, keepdims=True) * m[:, None]
    for k, table in enumerate((u_vel, u_speed, u_mixed)):
        u[tuning == k] = table[tuning == k]
    eta = cfg.noise_loading_sd * rng.standard_normal((pool, d - _N_FEATURES))
    w = u @ q[:, :_N_FEATURES].T + eta @ q[:, _N_FEATURES:].T  # (pool, d)
    return _Animal(
        q=q, tau=tau, freq=freq, baseline=base, w=w, u=u, tuning=tuning, pd_axis=pd_axis
    )


def _latent_noise(
    cfg: SimulatorConfig, animal: _Animal, n: int, rng: np.random.Generator
) -> np.ndarray:
    """(d, n) latent noise z: independent complex AR(1) planes, stationary from the start.
    Computed as a causal FFT convolution of the innovations with the impulse response
    (rho e^{i w dt})^k truncated at 12 time constants (error < e^-12), after a burn-in of the same
    length, so no Python loop over time steps is needed."""
    dt, d = cfg.rate_dt_s, cfg.latent_dim
    z = np.zeros((d, n))
    if cfg.latent_noise_sd == 0:
        return z
    n_planes = animal.tau.size
    lags = math.ceil(12 * animal.tau.max() / dt)
    total = n + lags
    eps = rng.standard_normal((n_planes, 2, total))
    nfft = 1 << math.ceil(math.log2(total + lags))
    for j in range(n_planes):
        rho = math.exp(-dt / animal.tau[j])
        a = rho * np.exp(1j * 2 * np.pi * animal.freq[j] * dt)
        h = a ** np.arange(lags)
        x = (
            cfg.latent_noise_sd
            * math.sqrt(1 - rho * rho)
            * (eps[j, 0] + 1j * eps[j, 1])
        )
        y = np.fft.ifft(np.fft.fft(x, nfft) * np.fft.fft(h, nfft))[lags:total]
        z[2 * j] = y.real
        if 2 * j + 1 < d:
            z[2 * j + 1] = y.imag
    return z


# --------------------------------------------------------------------------- sessions
@dataclass
class SessionTruth:
    """Hidden ground truth of one simulated session (never written to datasets).

    Attributes:
        animal, session_index: which session.
        pool_index: (N,) pool neuron behind each unit (units of one animal with the same
            pool index are the same neuron).
        tuning: (N,) tuning type names (``velocity``/``speed``/``mixed``/``untuned``).
        kinematic_tuning: (N, 5) tuning u_n on [vx, vy, speed, ax, ay] (scaled, before gain).
        baseline_hz: (N,) this session's baseline b_{s,n} (target mean rate).
        gain: (N,) this session's gain g_{s,n}.
        expected_rate_hz: (N,) mean of the simulated intensity (after saturation, before the
            refractory deletion).
        trial_split: (n_trials,) split name of every trial.
    """

    animal: int
    session_index: int
    pool_index: np.ndarray
    tuning: np.ndarray
    kinematic_tuning: np.ndarray
    baseline_hz: np.ndarray
    gain: np.ndarray
    expected_rate_hz: np.ndarray
    trial_split: np.ndarray = field(repr=False)


def _spikes(
    cfg: SimulatorConfig,
    log_base: np.ndarray,
    w: np.ndarray,
    drift: np.ndarray,
    x: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inhomogeneous Poisson spikes by time rescaling, then the refractory deletion.

    The intensity is piecewise linear between knots ``t_j = j * dt`` (continuous in time).

    log_base, drift: (N,); w: (N, d); x: (d, G + 1) latent at the knots.
    Returns spike times (S,) sorted, unit index (S,) int32, and the mean intensity (N,) in Hz.
    """
    dt = cfg.rate_dt_s
    n_units, n_bins = w.shape[0], x.shape[1] - 1
    ramp = np.linspace(-0.5, 0.5, n_bins + 1)  # (G+1,) within-session drift profile
    # the drift is one more latent row, so the normaliser below includes it
    xa = np.concatenate([x, ramp[None, :]]).astype(np.float32)  # (d+1, G+1)
    wa = np.concatenate([w, drift[:, None]], 1).astype(np.float32)  # (N, d+1)
    times: list[np.ndarray] = []
    units: list[np.ndarray] = []
    mean_rate = np.empty(n_units)
    for c0 in range(0, n_units, _UNIT_CHUNK):
        c1 = min(c0 + _UNIT_CHUNK, n_units)
        # (C, G+1) log-rate up to a constant. A broadcast sum, not BLAS: as fast for this thin
        # product, bit-reproducible, and immune to BLAS thread oversubscription on busy machines
        lam = wa[c0:c1, 0:1] * xa[0]
        for j in range(1, xa.shape[0]):
            lam += wa[c0:c1, j : j + 1] * xa[j]
        np.exp(lam, out=lam)
        scale = np.exp(log_base[c0:c1]) / lam.mean(axis=1)  # mean rate = b
        lam *= scale.astype(np.float32)[:, None]
        np.minimum(lam, np.float32(cfg.max_rate_hz), out=lam)  # saturation
        mean_rate[c0:c1] = lam.mean(axis=1)
        mass = (
            lam[:, :-1] + lam[:, 1:]
        )  # (C, G) float32; bin mass = dt * (l_j + l_j+1) / 2
        cum = mass.astype(
            np.float64
        )  # float64: sub-ms precision over hours of integrated rate
        cum *= 0.5 * dt
        np.cumsum(
            cum, axis=1, out=cum
        )  # (C, G) integrated intensity at the bins' right edges
        tot = cum[:, -1]
        counts = rng.poisson(tot)
        uni = rng.random(int(counts.sum()))
        pos = 0
        for i in range(c1 - c0):
            n_i = int(counts[i])
            if n_i == 0:
                continue
            q = (
                np.sort(uni[pos : pos + n_i]) * tot[i]
            )  # rescaled times, uniform on [0, tot)
            pos += n_i
            k = np.minimum(np.searchsorted(cum[i], q, side="right"), n_bins - 1)
            a = (
                lam[i, k].astype(np.float64) * dt
            )  # intensity * dt at the bin's left knot
            s = lam[i, k + 1] * dt - a  # its change across the bin
            r = np.maximum(q - (cum[i, k] - a - 0.5 * s), 0.0)  # mass left inside bin k
            # solve a f + s f^2 / 2 = r for f in [0, 1] (stable form, no cancellation at s ~ 0)
            frac = 2 * r / (a + np.sqrt(np.maximum(a * a + 2 * s * r, 0.0)))
            t = (k + np.clip(frac, 0.0, 1.0 - 1e-9)) * dt
            # absolute refractory period: delete spikes closer than refractory_s to the previous
            # (raw) spike of the unit; every kept ISI is then >= refractory_s.
            keep = np.ones(n_i, bool)
            keep[1:] = np.diff(t) >= cfg.refractory_s
            t = t[keep]
            times.append(t)
            units.append(np.full(t.size, c0 + i, np.int32))
    t_all = np.concatenate(times) if times else np.zeros(0)
    u_all = np.concatenate(units) if units else np.zeros(0, np.int32)
    order = np.argsort(t_all)
    return t_all[order], u_all[order], mean_rate


@overload
def simulate_session(
    config: SimulatorConfig,
    animal: int,
    session_index: int,
    *,
    return_truth: Literal[False] = ...,
) -> SessionRecording: ...


@overload
def simulate_session(
    config: SimulatorConfig,
    animal: int,
    session_index: int,
    *,
    return_truth: Literal[True],
) -> tuple[SessionRecording, SessionTruth]: ...


def simulate_session(
    config: SimulatorConfig,
    animal: int,
    session_index: int,
    *,
    return_truth: bool = False,
) -> SessionRecording | tuple[SessionRecording, SessionTruth]:
    """Simulate one session of one animal.

    Args:
        config: the simulator settings (identical configs give identical sessions).
        animal: animal index in ``[0, config.n_animals)``.
        session_index: session index in ``[0, config.sessions_per_animal)``.
        return_truth: also return the hidden :class:`SessionTruth`.

    Returns:
        A validated :class:`SessionRecording` (hand velocity in cm/s at
        ``config.behavior_rate_hz``; position in cm), or ``(recording, truth)``.
    """
    if not isinstance(config, SimulatorConfig):
        raise TypeError(
            f"config must be a SimulatorConfig, got {type(config).__name__}."
        )
    for name, v in (("animal", animal), ("session_index", session_index)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise TypeError(f"{name} must be an integer, got {v!r}.")
    if not 0 <= animal < config.n_animals:
        raise ValueError(
            f"animal={animal} must lie in [0, n_animals={config.n_animals})."
        )
    if not 0 <= session_index < config.sessions_per_animal:
        raise ValueError(
            f"session_index={session_index} must lie in "
            f"[0, sessions_per_animal={config.sessions_per_animal})."
        )
    cfg = config
    an = _make_animal(cfg, animal)
    ss = np.random.SeedSequence(cfg.seed, spawn_key=(2, animal, session_index))
    # independent streams: changing one part of the model leaves the others' draws unchanged
    rng_beh, rng_split, rng_units, rng_spk = (
        np.random.default_rng(s) for s in ss.spawn(4)
    )
    task = cfg.tasks[session_index % len(cfg.tasks)]
    sid = session_name(cfg, animal, session_index)

    # ---- behaviour
    n_trials = int(rng_beh.integers(cfg.trials_range[0], cfg.trials_range[1] + 1))
    plan = (_plan_center_out if task == "center_out" else _plan_random_target)(
        cfg, n_trials, rng_beh
    )
    glitch = rng_beh.random(n_trials) < cfg.invalid_trial_prob
    g_len = rng_beh.uniform(0.1, 0.3, n_trials)
    g_pos = rng_beh.random(n_trials)
    tr_len = plan.trial_end - plan.trial_start
    g_len = np.minimum(g_len, 0.5 * tr_len)
    inv_s = (plan.trial_start + g_pos * (tr_len - g_len))[glitch]
    inv_e = inv_s + g_len[glitch]
    n_beh = math.floor(plan.t_end * cfg.behavior_rate_hz - 1e-9) + 1
    t_beh = np.arange(n_beh) / cfg.behavior_rate_hz  # all < t_end
    pos, vel, _ = _kinematics(plan, t_beh)
    vel = vel + cfg.velocity_noise_sd * rng_beh.standard_normal(vel.shape)
    pos = pos + cfg.position_noise_sd * rng_beh.standard_normal(pos.shape)
    if inv_s.size:
        j = np.searchsorted(inv_s, t_beh, side="right") - 1
        bad = (j >= 0) & (t_beh < inv_e[np.maximum(j, 0)])
        vel[bad] += 25.0 * rng_beh.standard_normal((int(bad.sum()), 2))
    epochs = _epochs(plan, inv_s, inv_e)
    splits, split_code = _splits(cfg, plan, rng_split)

    # ---- units of this session
    n_units = int(rng_units.integers(cfg.units_range[0], cfg.units_range[1] + 1))
    pool_idx = rng_units.choice(cfg.pool_size, size=n_units, replace=False)
    lo, hi = cfg.baseline_rate_range
    base = np.clip(
        an.baseline[pool_idx]
        * np.exp(cfg.session_baseline_sd * rng_units.standard_normal(n_units)),
        lo,
        hi,
    )
    gain = np.exp(cfg.session_gain_sd * rng_units.standard_normal(n_units))
    drift = cfg.within_session_drift_sd * rng_units.standard_normal(n_units)
    w = gain[:, None] * an.w[pool_idx]  # (N, d)

    # ---- latent and spikes on the rate grid
    # knots j * dt covering [0, t_end]
    n_grid = math.ceil(plan.t_end / cfg.rate_dt_s) + 1
    t_grid = np.arange(n_grid) * cfg.rate_dt_s
    _, v_f, a_f = _kinematics(plan, t_grid + cfg.lead_s)
    feats = np.concatenate(
        [
            v_f / _VEL_SCALE,
            np.linalg.norm(v_f, axis=1, keepdims=True) / _VEL_SCALE,
            a_f / _ACC_SCALE,
        ],
        1,
    )  # (G, 5)
    x = _latent_noise(cfg, an, n_grid, rng_spk)  # (d, G)
    # x += Q[:, :5] @ feats.T, as a broadcast sum without BLAS threads (see _spikes)
    for k in range(_N_FEATURES):
        x += an.q[:, k, None] * feats[None, :, k]
    spike_t, spike_u, mean_rate = _spikes(cfg, np.log(base), w, drift, x, rng_spk)
    keep = spike_t < plan.t_end
    spike_t, spike_u = spike_t[keep], spike_u[keep]

    rec = SessionRecording(
        session_id=sid,
        unit_ids=np.array([f"{sid}/unit_{k:04d}" for k in range(n_units)]),
        spike_times=spike_t,
        spike_unit_index=spike_u,
        behavior_timestamps=t_beh,
        behavior_values=vel.astype(np.float32),
        behavior_name="hand_vel",
        position_values=pos.astype(np.float32),
        epochs=epochs,
        trials=(plan.trial_start, plan.trial_end),
        splits=splits,
        subject_id=animal_name(animal),
        task=TASK_NAMES[task],
        brain_region=cfg.brain_region,
        lab="synthetic",
        species="synthetic",
        source=f"poyo_hf synthetic simulator v{SIMULATOR_VERSION}, seed {cfg.seed}",
    ).validate()
    if not return_truth:
        return rec
    truth = SessionTruth(
        animal=animal,
        session_index=session_index,
        pool_index=pool_idx,
        tuning=np.asarray(TUNING_TYPES)[an.tuning[pool_idx]],
        kinematic_tuning=an.u[pool_idx],
        baseline_hz=base,
        gain=gain,
        expected_rate_hz=mean_rate,
        trial_split=np.asarray(SPLITS)[split_code],
    )
    return rec, truth


def simulate_corpus(
    config: SimulatorConfig, part: CorpusPart = "all"
) -> list[SessionRecording]:
    """Simulate every session of ``config`` (animal-major order), or one ``part`` of the corpus
    (see :func:`corpus_plan`). Deterministic per seed; each session equals
    ``simulate_session(config, animal, session_index)``."""
    return [
        simulate_session(config, p["animal"], p["session_index"])
        for p in corpus_plan(config, part)
    ]


def _span(rec: SessionRecording) -> float:
    """Length of the recording: first split start to last split end (``rec.duration`` is the
    longest single split's span, which is shorter when splits interleave)."""
    starts = [np.min(s) for s, _ in rec.splits.values() if np.size(s)]
    ends = [np.max(e) for _, e in rec.splits.values() if np.size(e)]
    return float(max(ends) - min(starts)) if starts else 0.0


def corpus_summary(recordings: list[SessionRecording]) -> dict[str, Any]:
    """Counts and rates of a list of recordings (works for any recordings, not only synthetic):
    sessions, subjects, tasks, units (total and per session), spikes, duration (s and h), mean
    firing rate (spikes / unit-seconds), median unit rate, behaviour samples, seconds per split."""
    n_units = np.array([r.unit_ids.size for r in recordings], dtype=np.int64)
    n_spikes = np.array([r.spike_times.size for r in recordings], dtype=np.int64)
    dur = np.array([_span(r) for r in recordings], dtype=float)
    unit_rates = (
        np.concatenate(
            [
                np.bincount(r.spike_unit_index, minlength=r.unit_ids.size)
                / max(_span(r), 1e-12)
                for r in recordings
            ]
        )
        if recordings
        else np.zeros(0)
    )
    split_s = {name: 0.0 for name in SPLITS}
    for r in recordings:
        for name, (s, e) in r.splits.items():
            split_s[name] += float(np.sum(np.asarray(e) - np.asarray(s)))
    tasks: dict[str, int] = {}
    for r in recordings:
        tasks[r.task] = tasks.get(r.task, 0) + 1
    unit_seconds = float(np.sum(n_units * dur))
    return {
        "n_sessions": len(recordings),
        "n_subjects": len({r.subject_id for r in recordings}),
        "tasks": tasks,
        "n_units": int(n_units.sum()),
        "units_per_session": {
            "min": int(n_units.min()) if n_units.size else 0,
            "median": float(np.median(n_units)) if n_units.size else 0.0,
            "max": int(n_units.max()) if n_units.size else 0,
        },
        "n_spikes": int(n_spikes.sum()),
        "duration_s": float(dur.sum()),
        "duration_h": float(dur.sum() / 3600),
        "mean_rate_hz": float(n_spikes.sum() / unit_seconds)
        if unit_seconds > 0
        else 0.0,
        "median_unit_rate_hz": float(np.median(unit_rates)) if unit_rates.size else 0.0,
        "n_behavior_samples": int(sum(r.behavior_timestamps.size for r in recordings)),
        "split_duration_s": split_s,
    }
