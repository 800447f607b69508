"""Synthetic chest radiographs and clinical data for training and testing the demonstration fusion model.

Numpy only: the service's tests import this module on machines without torch. Every function takes a
``numpy.random.Generator`` so a cohort is reproducible from one seed.

The images are procedural, not realistic: they carry the *signs* a radiologist looks for (a wide heart
silhouette, a blunted costophrenic angle, a pleural line with no lung markings beyond it) at random
strengths, so that some findings are plain and others are barely visible and only the clinical data
settles them. Some signs are shared: a patchy opacity may be pneumonia or atelectasis (fever and CRP tell
them apart), a borderline heart may or may not be enlarged (NT-proBNP helps); the clinical values in turn
have causes the film does not show (an infection elsewhere, kidney disease). Nothing here is fit for
clinical use.

The renderer works in normalized coordinates, so one patient rendered at 512 and at 1024 looks the same once
both are resized to the model's input, and draws the same amount from the generator at every size.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

FINDINGS: tuple[str, ...] = ("pneumonia", "cardiomegaly", "pleural_effusion", "pulmonary_edema", "pneumothorax")

# 12-bit detector: the stored values of a CR/DX image with BitsStored = 12.
MAX_PIXEL_VALUE = 4095

# Lung field geometry in normalized coordinates (x, y in [-1, 1], y downwards, image right = patient left
# as on a PA film): centre x, centre y, half-width, half-height. The left lung (image right) is a little
# smaller because the heart sits in it.
_LUNGS: tuple[tuple[float, float, float, float], ...] = ((-0.43, -0.08, 0.31, 0.66), (0.43, -0.06, 0.29, 0.64))
_DOME_Y = 0.52  # top of the diaphragm domes
_HEART_CX, _HEART_CY, _HEART_HALF_HEIGHT = 0.07, 0.33, 0.27
# Cardiothoracic ratio = heart width / inner thoracic width; lung outer edges span this width.
_THORAX_WIDTH = (_LUNGS[1][0] + _LUNGS[1][2]) - (_LUNGS[0][0] - _LUNGS[0][2])
# Share of patients, with or without pneumonia, whose film shows an opacity that is not one (atelectasis, scar).
_OPACITY_MIMIC_PROBABILITY = 0.15
# The size at which the quantum noise has its nominal level (see render_chest_radiograph).
_REFERENCE_SIZE = 512


def sample_findings(rng: np.random.Generator) -> dict[str, bool]:
    """Draw the findings of one patient with plausible prevalences and co-occurrence.

    Edema is far more likely with cardiomegaly (cardiogenic edema); effusion with edema, cardiomegaly or
    pneumonia (transudate, parapneumonic); pneumothorax is independent.

    Args:
        rng: the random generator.

    Returns:
        One boolean per name of ``FINDINGS``.
    """
    cardiomegaly = bool(rng.random() < 0.22)
    edema = bool(rng.random() < (0.32 if cardiomegaly else 0.08))
    pneumonia = bool(rng.random() < 0.22)
    effusion_p = 0.07 + 0.20 * edema + 0.10 * cardiomegaly + 0.12 * pneumonia
    effusion = bool(rng.random() < effusion_p)
    pneumothorax = bool(rng.random() < 0.11)
    return {
        "pneumonia": pneumonia,
        "cardiomegaly": cardiomegaly,
        "pleural_effusion": effusion,
        "pulmonary_edema": edema,
        "pneumothorax": pneumothorax,
    }


@functools.lru_cache(maxsize=8)
def _upsampler(size: int, coarse: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear interpolation indices and weights from ``coarse`` samples to ``size`` samples."""
    positions = np.clip((np.arange(size) + 0.5) * coarse / size - 0.5, 0, coarse - 1)
    low = np.floor(positions).astype(np.int64)
    high = np.minimum(low + 1, coarse - 1)
    return low, high, (positions - low).astype(np.float32)


@functools.lru_cache(maxsize=4)
def unit_axis(size: int) -> np.ndarray:
    """Pixel-centre coordinates in [-1, 1], so that shapes are drawn independently of the resolution."""
    return ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)


def smooth_noise(rng: np.random.Generator, size: int, coarse: int) -> np.ndarray:
    """Zero-mean, unit-variance-ish noise that varies over ``size / coarse`` pixels."""
    # Gathers rather than a matrix product: BLAS threads would fight over the two cores training uses.
    low, high, frac = _upsampler(size, coarse)
    field = rng.standard_normal((coarse, coarse), dtype=np.float32)
    rows = field[low] * (1.0 - frac[:, None]) + field[high] * frac[:, None]
    return rows[:, low] * (1.0 - frac[None, :]) + rows[:, high] * frac[None, :]


def _soft_ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, edge: float) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a linear ramp of relative width ``edge`` at the border."""
    r2 = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
    return np.clip((1.0 - r2) / edge, 0.0, 1.0)


def render_chest_radiograph(rng: np.random.Generator, findings: dict[str, bool], *, size: int = 512) -> np.ndarray:
    """Render a procedural PA chest radiograph showing the given findings.

    Pixels follow MONOCHROME2 (bright = dense) and fit in 12 bits. Each finding has a random conspicuity,
    from obvious to nearly invisible, so that the image alone is sometimes ambiguous.

    Args:
        rng: the random generator.
        findings: one boolean per name of ``FINDINGS`` (missing names count as absent).
        size: rows and columns of the square image.

    Returns:
        uint16 array [size, size] with values in 0..4095.
    """
    axis = unit_axis(size)
    # Patient positioning: shift and magnification differ from film to film.
    scale = rng.uniform(0.93, 1.05)
    x = ((axis - rng.uniform(-0.05, 0.05)) / scale)[None, :]
    y = ((axis - rng.uniform(-0.05, 0.05)) / scale)[:, None]

    body = _soft_ellipse(x, y, 0.0, 0.15, 0.95, 1.25, 0.08)
    density = 0.42 * body
    # Spine and mediastinum: the central column is denser than the surrounding soft tissue.
    density = density + 0.16 * np.clip(1.0 - np.abs(x) / 0.11, 0.0, 1.0) * body

    # Depth of inspiration: a shallow breath raises the domes and makes the heart look wider than it is.
    inspiration = rng.normal(0.0, 1.0)
    dome = _DOME_Y + 0.04 * inspiration + rng.uniform(-0.03, 0.03)
    lung = np.zeros((size, size), dtype=np.float32)
    lungs: list[np.ndarray] = []
    pleural_spaces: list[np.ndarray] = []
    for cx, cy, ax, ay in _LUNGS:
        pleural_space = _soft_ellipse(x, y, cx, cy, ax * rng.uniform(0.95, 1.04), ay, 0.12)
        pleural_spaces.append(pleural_space)
        # The diaphragm dome cuts each lung from below; lateral ends reach lower (costophrenic angles).
        dome_y = dome + 0.22 * ((x - cx) / ax) ** 2
        side = pleural_space * np.clip((dome_y - y) / 0.025, 0.0, 1.0)
        lungs.append(side)
        lung = lung + side

    # Heart: cardiothoracic ratio 0.38-0.53 when normal, 0.48-0.64 when enlarged. The ranges overlap, as they do
    # on real films (a borderline heart is read as enlarged or not by its context: NT-proBNP, age), and the lungs'
    # own width and the depth of inspiration vary, so the ratio on the film is not exactly the one drawn here.
    ctr = rng.uniform(0.48, 0.64) if findings.get("cardiomegaly") else rng.uniform(0.38, 0.53)
    heart_half_width = ctr * _THORAX_WIDTH / 2.0 * (1.0 - 0.035 * inspiration)
    heart = _soft_ellipse(x, y, _HEART_CX, _HEART_CY, heart_half_width, _HEART_HALF_HEIGHT, 0.15)
    heart = heart * (y > _HEART_CY - _HEART_HALF_HEIGHT * 0.9)

    markings = smooth_noise(rng, size, 40)
    hilum_distance = np.sqrt((np.abs(x) - 0.2) ** 2 + (y + 0.05) ** 2)
    # Vessels fade towards the periphery, as in a normal lung.
    vessels = np.clip(markings, 0.0, None) * np.exp(-hilum_distance / 0.35)

    air = lung.copy()
    # Exudate, transudate, pleural fluid and collapse replace the air of the lung rather than adding to it: they
    # bring it towards soft-tissue density, so that an effusion merges with the hemidiaphragm as on a real film.
    filled = np.zeros((size, size), dtype=np.float32)
    if findings.get("pneumothorax"):
        index = int(rng.integers(0, 2))
        cx, cy, ax, ay = _LUNGS[index]
        lateral = -1.0 if index == 0 else 1.0
        r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
        line = rng.uniform(0.6, 0.92)  # closer to 1: a thinner rim, a subtler pneumothorax
        # Apical and lateral: the part of the lung facing up and outwards.
        sector = np.clip((-(y - cy) / ay + 0.5 * lateral * (x - cx) / ax - rng.uniform(-0.1, 0.3)) / 0.15, 0.0, 1.0)
        rim = np.clip((r - line) / 0.02, 0.0, 1.0) * sector * lungs[index]
        vessels = vessels * (1.0 - rim)
        air = air + 0.25 * rim  # no lung tissue at all beyond the pleural line: more lucent
        pleural_line = np.exp(-(((r - line) / 0.012) ** 2)) * sector * lungs[index]
        density = density + rng.uniform(0.04, 0.14) * pleural_line
        filled = filled + rng.uniform(0.05, 0.3) * (1.0 - rim) * lungs[index]  # the collapsed lung is denser

    # Consolidation (pneumonia) and its mimics: atelectasis or an old scar give the same patchy opacity on a
    # single film. Only the clinical picture (fever, CRP, leukocytes) tells them apart, as it does in practice.
    mimic = rng.random() < _OPACITY_MIMIC_PROBABILITY
    for present in (bool(findings.get("pneumonia")), mimic):
        if not present:
            continue
        index = int(rng.integers(0, 2))
        cx, cy, ax, ay = _LUNGS[index]
        zone_y = cy + ay * rng.uniform(-0.55, 0.55)
        zone_x = cx + ax * rng.uniform(-0.45, 0.45)
        radius = rng.uniform(0.07, 0.2)
        blob = np.exp(-((x - zone_x) ** 2 + (y - zone_y) ** 2) / (2 * radius * radius))
        patches = np.clip(0.65 + 0.5 * smooth_noise(rng, size, 14), 0.0, 1.2)
        filled = filled + rng.uniform(0.06, 0.8) * blob * patches * lungs[index]

    if findings.get("pleural_effusion"):
        sides = [0, 1] if rng.random() < 0.3 else [int(rng.integers(0, 2))]
        for index in sides:
            cx, _, ax, _ = _LUNGS[index]
            lateral = -1.0 if index == 0 else 1.0
            level = dome - rng.uniform(0.0, 0.32)  # small effusions only blunt the angle
            # Meniscus: the fluid climbs the lateral chest wall, blunting the costophrenic angle.
            surface = level - 0.18 * np.clip(lateral * (x - cx) / ax + 0.3, 0.0, None) ** 2
            fluid = np.clip((y - surface) / 0.04, 0.0, 1.0) * lungs[index]
            filled = np.maximum(filled, rng.uniform(0.3, 1.0) * fluid)

    if findings.get("pulmonary_edema"):
        # Bat-wing: bilateral perihilar haze, with coarse interstitial texture.
        haze = np.exp(-(((np.abs(x) - 0.22) / 0.22) ** 2 + ((y + 0.02) / 0.32) ** 2))
        texture = 0.75 + 0.25 * np.clip(markings, -1.0, 1.0)
        filled = filled + rng.uniform(0.04, 0.45) * haze * texture * lung

    air = air * (1.0 - np.clip(filled, 0.0, 1.0))
    density = density - 0.30 * air * (1.0 - 0.8 * heart)
    density = density + 0.24 * heart + 0.06 * vessels * lung

    # Posterior ribs: faint bands that curve down laterally.
    phase = (y + 0.35 * x * x) * 11.0 + rng.uniform(0.0, 2.0 * np.pi)
    ribs = np.clip(np.cos(phase) - 0.5, 0.0, None) * np.clip(1.0 - np.abs(y + 0.1) / 0.75, 0.0, 1.0)
    density = density + 0.08 * ribs * body * (np.abs(x) > 0.1)

    # Heel effect and scatter: a smooth exposure gradient across the film.
    density = density * (1.0 + rng.uniform(-0.08, 0.08) * x + rng.uniform(-0.06, 0.06) * y)
    density = np.clip(density, 0.0, None) ** rng.uniform(0.85, 1.15)
    offset = rng.uniform(40.0, 400.0)
    gain = rng.uniform(2000.0, 4200.0)
    pixels = offset + gain * density
    # Quantum noise per unit of film area, not per pixel: smaller pixels are noisier, so a film rendered at 1024
    # and one rendered at 512 look alike once both are brought to the same size. Drawn from a generator of its
    # own, so that what the caller draws next (the clinical values) does not depend on the size either.
    noise_rng = np.random.default_rng(int(rng.integers(0, 2**63 - 1)))
    noise_sigma = rng.uniform(8.0, 40.0) * size / _REFERENCE_SIZE
    pixels = pixels + noise_rng.standard_normal((size, size), dtype=np.float32) * noise_sigma
    return np.clip(pixels, 0, MAX_PIXEL_VALUE).astype(np.uint16)


def _maybe(rng: np.random.Generator, value: float, missing_probability: float) -> float | None:
    return None if rng.random() < missing_probability else float(value)


def sample_clinical(
    rng: np.random.Generator, findings: dict[str, bool], *, age_years: float | None = None
) -> dict[str, Any]:
    """Draw demographics, vital signs and labs whose distributions depend on the findings.

    Values are in the service's canonical UCUM units. Each vital sign or lab is missing (None) on its own
    with the probability it would be missing in an emergency department record: vitals rarely, CRP often,
    NT-proBNP half of the time. Age and sex are always present.

    Args:
        rng: the random generator.
        findings: one boolean per name of ``FINDINGS`` (missing names count as absent).
        age_years: the patient's age; drawn when None.

    Returns:
        Keys ``age`` (a), ``sex`` ("male"/"female"), ``temperature`` (Cel), ``heart_rate`` (/min),
        ``respiratory_rate`` (/min), ``spo2`` (%), ``leukocytes`` (10*3/uL), ``crp`` (mg/L),
        ``nt_probnp`` (pg/mL), ``systolic_bp`` (mm[Hg]).
    """
    pneumonia = bool(findings.get("pneumonia"))
    cardiomegaly = bool(findings.get("cardiomegaly"))
    effusion = bool(findings.get("pleural_effusion"))
    edema = bool(findings.get("pulmonary_edema"))
    pneumothorax = bool(findings.get("pneumothorax"))

    if age_years is None:
        # Heart failure is a disease of the old; spontaneous pneumothorax of the young.
        mean_age = 52.0 + 12.0 * (cardiomegaly or edema) - 8.0 * pneumothorax
        age_years = float(np.clip(rng.normal(mean_age, 17.0), 18.0, 98.0))
    male_probability = 0.5 + 0.15 * pneumothorax
    sex = "male" if rng.random() < male_probability else "female"

    # Conditions the film does not show but the numbers do: an infection elsewhere (fever, CRP), chronic lung
    # disease (low SpO2, fast breathing), kidney disease (NT-proBNP). They keep the clinical data alone ambiguous.
    other_infection = rng.random() < 0.15
    chronic_lung = rng.random() < 0.12
    kidney_disease = rng.random() < 0.10

    # Not every pneumonia is febrile or inflamed (elderly, early, immunosuppressed): the response varies.
    response = rng.uniform(0.1, 1.2) if pneumonia else 0.0
    # Most pneumothoraces are small and well tolerated: the vital signs move with the size, which only the film
    # shows. A pneumothorax is a diagnosis of the image; the numbers barely hint at it.
    collapse = rng.uniform(0.0, 1.0) ** 2 if pneumothorax else 0.0
    inflammation = response + (rng.uniform(0.2, 0.8) if other_infection else 0.0)
    temperature = rng.normal(36.9, 0.4) + inflammation * rng.normal(1.2, 0.5)
    heart_rate = (
        rng.normal(80.0, 13.0) + 10.0 * inflammation + 8.0 * edema + 12.0 * collapse + 4.0 * effusion
    ) + 4.0 * (temperature - 37.0)
    respiratory_rate = (
        rng.normal(16.0, 3.0) + 3.0 * pneumonia + 4.0 * edema + 5.0 * collapse + 2.0 * effusion + 4.0 * chronic_lung
    )
    spo2_drop = 2.0 * pneumonia + 3.0 * edema + 4.0 * collapse + 1.0 * effusion + 3.0 * chronic_lung
    spo2 = min(100.0, rng.normal(97.0, 1.5) - spo2_drop * rng.uniform(0.3, 1.6))
    leukocytes = rng.lognormal(np.log(7.5), 0.3) * (1.0 + inflammation * rng.uniform(0.1, 1.0))
    crp = rng.lognormal(np.log(4.0), 0.9) * np.exp(inflammation * rng.normal(2.3, 0.7))
    crp = min(crp, 480.0)  # beyond any real patient's value; keeps the z-scored input in range
    # NT-proBNP rises with age and kidney disease even without heart failure.
    nt_probnp = rng.lognormal(np.log(60.0 + 2.5 * max(age_years - 40.0, 0.0)), 0.8)
    nt_probnp *= (rng.lognormal(np.log(4.0), 0.8) if cardiomegaly else 1.0) * (
        rng.lognormal(np.log(5.0), 0.8) if edema else 1.0
    )
    nt_probnp *= rng.lognormal(np.log(5.0), 0.6) if kidney_disease else 1.0
    nt_probnp = min(nt_probnp, 35000.0)  # the assay's reportable upper limit
    systolic_bp = rng.normal(128.0, 17.0) + 12.0 * edema - 8.0 * pneumonia + 0.25 * (age_years - 50.0)

    return {
        "age": float(age_years),
        "sex": sex,
        "temperature": _maybe(rng, round(temperature, 1), 0.10),
        "heart_rate": _maybe(rng, round(heart_rate), 0.10),
        "respiratory_rate": _maybe(rng, round(respiratory_rate), 0.12),
        "spo2": _maybe(rng, round(spo2), 0.10),
        "leukocytes": _maybe(rng, round(leukocytes, 1), 0.25),
        "crp": _maybe(rng, round(crp, 1), 0.30),
        "nt_probnp": _maybe(rng, round(nt_probnp), 0.50),
        "systolic_bp": _maybe(rng, round(systolic_bp), 0.10),
    }
