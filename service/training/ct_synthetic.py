"""Synthetic non-contrast head CT slices and clinical data for the demonstration model ``ct-head-ich``.

Numpy only: the service's tests import this module on machines without torch. Every function takes a
``numpy.random.Generator`` so that a cohort is reproducible from one seed.

A slice is one axial image at the level of the lateral ventricles, in Hounsfield units (HU): air outside the
head, scalp, a skull ring with dense inner and outer tables around the diploe, grey matter in a cortical ribbon
with sulci and in the deep nuclei, white matter, cerebrospinal fluid (CSF) in the ventricles and over the
convexity, and the falx in the midline. An acute hemorrhage is drawn as it appears on CT: hyperdense blood,
either an intraparenchymal hematoma (a rounded blob with a hypodense rim of edema) or an extra-axial collection
along the inner table of the skull (a subdural crescent or an epidural lens), from a few millimetres to large
enough to push the midline over. Nothing here is fit for clinical use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.training.synthetic import smooth_noise, unit_axis

# Stored values of a CT object with BitsStored 12 and RescaleIntercept -1024 span -1024..3071 HU.
MIN_HU = -1024
MAX_HU = 3071


HEMORRHAGE_PREVALENCE = 0.35
HEMORRHAGE_TYPES: tuple[str, ...] = ("intraparenchymal", "subdural", "epidural")
_HEMORRHAGE_TYPE_PROBABILITIES = (0.5, 0.3, 0.2)


def _blend(image: np.ndarray, weight: np.ndarray, value: float | np.ndarray) -> np.ndarray:
    """Partial volume: ``weight`` of the pixel is the new tissue, the rest stays as it was."""
    return image + weight * (value - image)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, au: float, av: float, angle: float) -> np.ndarray:
    """Squared normalized radius of a rotated ellipse: < 1 inside."""
    du, dv = u - cu, v - cv
    # Python floats, not numpy float64 scalars, so that the float32 grids stay float32.
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return ((c * du + s * dv) / au) ** 2 + ((-s * du + c * dv) / av) ** 2


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2.0 * np.pi) - np.pi


def _hemorrhage_parameters(rng: np.random.Generator) -> dict[str, Any]:
    """Type, place, size and density of one acute bleed, from barely visible to obvious."""
    kind = str(rng.choice(HEMORRHAGE_TYPES, p=_HEMORRHAGE_TYPE_PROBABILITIES))
    if kind == "intraparenchymal":
        # Somewhere in the hemispheres, not in the cortical ribbon's outer edge; radius about 4-33 pixels at 512.
        radius_position, angle_position = 0.62 * np.sqrt(rng.random()), rng.uniform(-np.pi, np.pi)
        return {
            "kind": kind,
            "center": (
                float(radius_position * np.cos(angle_position)),
                float(radius_position * np.sin(angle_position)),
            ),
            "radius": float(np.exp(rng.uniform(np.log(0.03), np.log(0.2)))),
            "lobulation": (rng.uniform(0.0, 0.2), rng.uniform(0.0, 0.12), rng.uniform(0, 2 * np.pi)),
            "density": rng.uniform(55.0, 85.0),
            "edema_drop": rng.uniform(5.0, 14.0),
            "edema_extent": rng.uniform(1.5, 2.3),
        }
    if kind == "subdural":
        # A crescent over the convexity: long arc, thin, concave towards the brain.
        return {
            "kind": kind,
            "center_angle": rng.uniform(-np.pi, np.pi),
            "half_span": rng.uniform(0.35, 1.0),
            "thickness": float(np.exp(rng.uniform(np.log(0.01), np.log(0.07)))),
            "density": rng.uniform(52.0, 80.0),
        }
    # Epidural: a short biconvex lens, bounded by the sutures.
    return {
        "kind": kind,
        "center_angle": rng.uniform(-np.pi, np.pi),
        "half_span": rng.uniform(0.18, 0.45),
        "thickness": float(np.exp(rng.uniform(np.log(0.02), np.log(0.08)))),
        "density": rng.uniform(60.0, 88.0),
    }


def _box(center_x: float, center_y: float, half_extent: float, size: int) -> tuple[slice, slice]:
    """Rows and columns of the pixels within ``half_extent`` (normalized units) of a point, plus a margin."""
    half = int(np.ceil(half_extent * size / 2.0)) + 3

    def span(center: float) -> slice:
        middle = int(round((center + 1.0) * size / 2.0 - 0.5))
        return slice(min(max(middle - half, 0), size), min(max(middle + half + 1, 0), size))

    return span(center_y), span(center_x)


def render_head_ct_slice(rng: np.random.Generator, *, hemorrhage: bool, size: int = 512) -> np.ndarray:
    """Render one axial non-contrast head CT slice at the level of the lateral ventricles.

    The anatomy, the hemorrhage and the noise each come from their own generator seeded from ``rng``, so the
    same ``rng`` state with and without ``hemorrhage`` gives the same head, the same noise and differs only by
    the bleed (and the mass effect it causes).

    Args:
        rng: the random generator.
        hemorrhage: draw an acute intracranial hemorrhage (intraparenchymal, subdural or epidural).
        size: rows and columns of the square image.

    Returns:
        int16 array [size, size] in Hounsfield units, within -1024..3071 (what 12 stored bits with
        RescaleIntercept -1024 can hold).
    """
    anatomy_seed, lesion_seed, noise_seed = (int(s) for s in rng.integers(0, 2**63 - 1, size=3))
    anatomy = np.random.default_rng(anatomy_seed)
    lesion = _hemorrhage_parameters(np.random.default_rng(lesion_seed)) if hemorrhage else None
    noise_rng = np.random.default_rng(noise_seed)
    pixel = 2.0 / size  # one pixel in normalized units: the width of partial-volume edges

    # Head position: a little off centre, rotated, and of varying size. (u, v) are the head's own axes.
    axis = unit_axis(size)
    angle = anatomy.uniform(-0.2, 0.2)
    scale = anatomy.uniform(0.85, 1.0)
    offset_x, offset_y = anatomy.uniform(-0.04, 0.04), anatomy.uniform(-0.04, 0.04)
    x, y = axis[None, :] - np.float32(offset_x), axis[:, None] - np.float32(offset_y)
    cos_a, sin_a = float(np.cos(angle)), float(np.sin(angle))
    u = cos_a * x + sin_a * y  # patient right to left
    v = -sin_a * x + cos_a * y  # anterior (negative) to posterior
    half_width, half_length = 0.70 * scale * anatomy.uniform(0.94, 1.04), 0.86 * scale
    brain_width, brain_length = half_width - 0.035, half_length - 0.035

    def to_image(pu: float, pv: float) -> tuple[float, float]:
        """A point in brain coordinates -> normalized image coordinates (x, y)."""
        hu_, hv_ = pu * brain_width, pv * brain_length
        return cos_a * hu_ - sin_a * hv_ + offset_x, sin_a * hu_ + cos_a * hv_ + offset_y

    # Radial depth below the outer surface of the skull, along the ray from the head's centre:
    # the surface is at r / rho where rho is the elliptical radius (1 on the surface).
    r = np.sqrt(u * u + v * v)
    rho = np.sqrt((u / half_width) ** 2 + (v / half_length) ** 2)
    depth = np.divide(r, rho, out=np.full_like(r, half_width), where=rho > 0) - r
    # Thicker frontal and occipital bone than temporal squama.
    sin_phi = np.abs(v) / np.maximum(r, 1e-6)
    skull_thickness = anatomy.uniform(0.026, 0.038) * (1.0 + 0.25 * sin_phi)
    scalp_thickness = anatomy.uniform(0.012, 0.024)
    brain_depth = depth - skull_thickness  # below the inner table

    # White matter with a faint texture, then the grey matter of the cortical ribbon.
    white, grey = anatomy.uniform(25.0, 31.0), anatomy.uniform(35.0, 42.0)
    csf = anatomy.uniform(2.0, 10.0)
    hu = white + 1.5 * smooth_noise(anatomy, size, 64)
    atrophy = anatomy.uniform(0.0, 1.0)  # older brains: wider sulci and ventricles
    convexity_csf = 0.004 + 0.010 * atrophy
    ribbon = 0.035 + 0.025 * np.clip(smooth_noise(anatomy, size, 20), -1.2, 1.2)
    hu = _blend(hu, np.clip((convexity_csf + ribbon - brain_depth) / (2 * pixel), 0.0, 1.0), grey)
    # Sulci: thin CSF clefts running into the ribbon.
    sulci = np.abs(smooth_noise(anatomy, size, 36)) < (0.06 + 0.08 * atrophy)
    sulci &= brain_depth < convexity_csf + ribbon * 1.1
    hu[sulci] += 0.8 * (csf - hu[sulci])
    # CSF over the convexity, between the brain and the inner table.
    hu = _blend(hu, np.clip((convexity_csf - brain_depth) / pixel, 0.0, 1.0), csf)

    # Mass effect: a large bleed pushes the ventricles and the falx towards the other side.
    shift = 0.0
    if lesion is not None:
        if lesion["kind"] == "intraparenchymal":
            side, extent = np.sign(lesion["center"][0]) or 1.0, lesion["radius"] * 1.2
        else:
            side, extent = np.sign(np.cos(lesion["center_angle"])) or 1.0, lesion["thickness"] * lesion["half_span"]
        shift = float(-side * min(0.6 * extent, 0.06))

    # Deep structures all lie within the middle of the brain: draw them on that part of the image only.
    rows, cols = _box(*to_image(0.0, 0.0), 0.62, size)
    bu, bv = u[rows, cols] / brain_width, v[rows, cols] / brain_length
    su = bu - shift / brain_width
    deep = hu[rows, cols]
    ventricle_size = anatomy.uniform(0.8, 1.2) + 0.5 * atrophy
    for side in (-1.0, 1.0):
        # Basal ganglia and thalamus: grey matter.
        nuclei = _ellipse(su, bv, side * 0.2, 0.02, 0.11, 0.2, side * 0.3)
        deep = _blend(deep, np.clip((1.0 - nuclei) / 0.3, 0.0, 1.0), grey - 2.0)
    # Lateral ventricles (frontal horn, body, occipital horn per side) and the third ventricle.
    ventricles = _ellipse(su, bv, 0.0, 0.02, 0.018 * ventricle_size, 0.09, 0.0)
    for side in (-1.0, 1.0):
        for cu, cv, au, av, tilt in (
            (0.10, -0.3, 0.07, 0.19, 0.35),
            (0.11, -0.02, 0.045, 0.25, 0.0),
            (0.14, 0.24, 0.055, 0.2, -0.25),
        ):
            np.minimum(
                ventricles, _ellipse(su, bv, side * cu, cv, au * ventricle_size, av, side * tilt), out=ventricles
            )
    hu[rows, cols] = _blend(deep, np.clip((1.0 - ventricles) / 0.25, 0.0, 1.0), csf)

    # Falx cerebri: a thin dense line in the midline, in front of and behind the ventricles.
    falx = np.clip(1.0 - np.abs(u - shift) / pixel, 0.0, 1.0) * (np.abs(v) > 0.5 * brain_length)
    hu = _blend(hu, 0.6 * falx, grey + 12.0)

    if lesion is not None:
        _draw_hemorrhage(
            hu,
            lesion,
            u=u,
            v=v,
            brain_depth=brain_depth,
            brain_size=(brain_width, brain_length),
            to_image=to_image,
            pixel=pixel,
            rng=anatomy,
        )

    # Skull: dense inner and outer tables around the less dense diploe, with partial volume at its edges.
    table, diploe = anatomy.uniform(1250.0, 1480.0), anatomy.uniform(680.0, 950.0)
    through = np.clip(depth / skull_thickness, 0.0, 1.0)
    bone = diploe + (table - diploe) * np.sqrt(np.abs(2.0 * through - 1.0))
    hu = _blend(hu, np.clip(0.5 - brain_depth / pixel, 0.0, 1.0), bone)
    # Scalp soft tissue (skin, galea, a little fat), then air.
    hu = _blend(hu, np.clip(0.5 - depth / pixel, 0.0, 1.0), anatomy.uniform(15.0, 45.0))
    hu = _blend(hu, np.clip(0.5 - (depth + scalp_thickness) / pixel, 0.0, 1.0), -1000.0)

    hu += noise_rng.uniform(4.0, 8.0) * noise_rng.standard_normal((size, size), dtype=np.float32)
    return np.clip(np.rint(hu), MIN_HU, MAX_HU).astype(np.int16)


def _draw_hemorrhage(
    hu: np.ndarray,
    lesion: dict[str, Any],
    *,
    u: np.ndarray,
    v: np.ndarray,
    brain_depth: np.ndarray,
    brain_size: tuple[float, float],
    to_image: Any,
    pixel: float,
    rng: np.random.Generator,
) -> None:
    """Blood (and, around a hematoma, edema) over the brain, in place; extra-axial blood hugs the inner table."""
    brain_width, brain_length = brain_size
    if lesion["kind"] == "intraparenchymal":
        cu, cv = lesion["center"]
        second, third, phase = lesion["lobulation"]
        radius = lesion["radius"] * min(brain_width, brain_length)  # normalized image units
        reach = lesion["edema_extent"] * radius * (1.0 + second + third)
        rows, cols = _box(*to_image(cu, cv), reach, hu.shape[0])
        du = u[rows, cols] - cu * brain_width
        dv = v[rows, cols] - cv * brain_length
        distance = np.sqrt(du * du + dv * dv)
        psi = np.arctan2(dv, du)
        outline = radius * (1.0 + second * np.cos(2 * psi + phase) + third * np.cos(3 * psi - phase))
        intracranial = np.clip(brain_depth[rows, cols] / pixel, 0.0, 1.0)
        edema = np.clip((lesion["edema_extent"] * outline - distance) / (0.6 * outline), 0.0, 1.0)
        region = hu[rows, cols] - lesion["edema_drop"] * edema * intracranial
        blood = np.clip((outline - distance) / (1.5 * pixel), 0.0, 1.0) * intracranial
        # Clot is not uniform: retraction and serum make it mottled.
        mottle = 3.0 * np.clip(smooth_noise(rng, hu.shape[0], 48)[rows, cols], -2.0, 2.0)
        hu[rows, cols] = _blend(region, blood, lesion["density"] + mottle)
        return
    # Extra-axial: only the band just inside the inner table can hold it.
    band = (brain_depth > -pixel) & (brain_depth < lesion["thickness"] + pixel)
    phi = np.arctan2(v[band], u[band])
    offset = np.abs(_wrap(phi - lesion["center_angle"])) / lesion["half_span"]
    if lesion["kind"] == "subdural":
        # Crescent: nearly full thickness over most of the arc, tapering at its ends.
        profile = np.sqrt(np.clip(3.0 * (1.0 - offset), 0.0, 1.0) * np.clip(1.0 - offset**4, 0.0, 1.0))
    else:
        # Lens: thickest in the middle, biconvex.
        profile = np.sqrt(np.clip(1.0 - offset**2, 0.0, 1.0))
    depth = brain_depth[band]
    thickness = lesion["thickness"] * profile
    blood = np.clip((thickness - depth) / pixel, 0.0, 1.0) * np.clip(depth / pixel, 0.0, 1.0) * (thickness > 0)
    hu[band] = _blend(hu[band], blood, lesion["density"])


def _maybe(rng: np.random.Generator, value: float, missing_probability: float) -> float | None:
    return None if rng.random() < missing_probability else float(value)


def sample_case(rng: np.random.Generator) -> dict[str, Any]:
    """Draw one emergency head CT patient: the label and the clinical values recorded before the scan.

    Hemorrhage is more likely in older, hypertensive and anticoagulated patients and lowers the Glasgow coma
    score, but neither is decisive: many bleeds present alert and normotensive, and many patients without one
    are confused (intoxication, seizure, syncope). The INR is measured in about 60% of patients, more often in
    those on anticoagulants; the GCS is missing from about 20% of records.

    Args:
        rng: the random generator.

    Returns:
        Keys ``hemorrhage`` (bool), ``age`` (a), ``systolic_bp`` (mm[Hg]), ``inr`` (LOINC 6301-6, {INR})
        and ``gcs`` (LOINC 9269-2, {score}); a vital sign or lab that was not recorded is None.
    """
    hemorrhage = bool(rng.random() < HEMORRHAGE_PREVALENCE)
    age = float(np.clip(rng.normal(58.0 + 6.0 * hemorrhage, 17.0), 18.0, 97.0))
    anticoagulated = rng.random() < (0.18 if hemorrhage else 0.08)
    if anticoagulated:
        inr = rng.lognormal(np.log(2.6 if hemorrhage else 2.3), 0.3)
    else:
        inr = max(rng.normal(1.02, 0.08), 0.8)
    systolic_bp = rng.normal(132.0 + 0.3 * (age - 55.0), 20.0) + (rng.normal(14.0, 12.0) if hemorrhage else 0.0)
    systolic_bp = float(np.clip(systolic_bp, 70.0, 250.0))
    if hemorrhage:
        gcs = 15.0 if rng.random() < 0.45 else float(np.clip(15 - np.ceil(rng.gamma(2.0, 2.2)), 3, 14))
    else:
        gcs = 15.0 if rng.random() < 0.78 else float(np.clip(15 - np.ceil(rng.gamma(1.2, 1.8)), 3, 14))
    return {
        "hemorrhage": hemorrhage,
        "age": age,
        "systolic_bp": _maybe(rng, round(systolic_bp), 0.05),
        "inr": _maybe(rng, round(float(inr), 1), 0.15 if anticoagulated else 0.43),
        "gcs": _maybe(rng, gcs, 0.20),
    }
