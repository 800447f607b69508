"""Pre-processing: pixel arrays and clinical facts -> the tensors a manifest asks for.

Pure numpy: the same functions run in the service and in training, so a model sees at serving time
exactly what it saw in training.
"""

from __future__ import annotations

import datetime as dt

import numpy as np

from service.inference.manifest import ClinicalFeature, ImagePreprocessing
from service.schemas import ClinicalContext, ClinicalValue, ObservationFact


def window_image(
    pixels: np.ndarray,
    *,
    photometric_interpretation: str,
    window: tuple[float, float] | None,
    spec: ImagePreprocessing,
) -> np.ndarray:
    """Window a modality-LUT-applied image to [0, 1], MONOCHROME1 inverted so that bright means dense.

    Args:
        pixels: 2-D array in modality units (after Rescale Slope/Intercept).
        photometric_interpretation: MONOCHROME1 or MONOCHROME2.
        window: (center, width) from the object's VOI attributes, or None.
        spec: the manifest's preprocessing.

    Returns:
        float32 array in [0, 1] with the input's shape.
    """
    image = pixels.astype(np.float32, copy=False)
    if spec.window == "dicom" and window is not None and window[1] > 1:
        center, width = window
        low, high = center - width / 2.0, center + width / 2.0
    else:
        low, high = (float(v) for v in np.percentile(image, spec.percentiles))
    if high <= low:
        high = low + 1.0
    out = np.clip((image - low) / (high - low), 0.0, 1.0)
    if spec.invert_monochrome1 and photometric_interpretation.strip().upper() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32, copy=False)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 2-D image with area averaging when shrinking by an integer factor, else bilinear."""
    in_h, in_w = image.shape
    if (in_h, in_w) == (height, width):
        return image.astype(np.float32, copy=False)
    if in_h % height == 0 and in_w % width == 0:
        fh, fw = in_h // height, in_w // width
        return image.reshape(height, fh, width, fw).mean(axis=(1, 3)).astype(np.float32)
    ys = (np.arange(height, dtype=np.float64) + 0.5) * in_h / height - 0.5
    xs = (np.arange(width, dtype=np.float64) + 0.5) * in_w / width - 0.5
    ys = np.clip(ys, 0, in_h - 1)
    xs = np.clip(xs, 0, in_w - 1)
    y0 = np.floor(ys).astype(np.int64)
    x0 = np.floor(xs).astype(np.int64)
    y1 = np.minimum(y0 + 1, in_h - 1)
    x1 = np.minimum(x0 + 1, in_w - 1)
    wy = (ys - y0)[:, None]
    wx = (xs - x0)[None, :]
    top = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx
    bottom = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def prepare_image(
    pixels: np.ndarray,
    *,
    photometric_interpretation: str,
    window: tuple[float, float] | None,
    spec: ImagePreprocessing,
) -> np.ndarray:
    """Window, invert, resize and normalize one image.

    Returns:
        float32 array of shape [1, height, width] (channels first, no batch axis).
    """
    windowed = window_image(pixels, photometric_interpretation=photometric_interpretation, window=window, spec=spec)
    height, width = spec.resize
    resized = resize_bilinear(windowed, height, width)
    normalized = (resized - spec.normalization.mean) / spec.normalization.std
    return normalized[None, :, :].astype(np.float32)


def age_in_years(birth_date: dt.date, on: dt.date) -> float:
    """Age at a date in years (UCUM ``a``), with the day fraction: 1.0 per full year."""
    years = on.year - birth_date.year - ((on.month, on.day) < (birth_date.month, birth_date.day))
    last_birthday = _add_years(birth_date, years)
    next_birthday = _add_years(birth_date, years + 1)
    return years + (on - last_birthday).days / max((next_birthday - last_birthday).days, 1)


def _add_years(day: dt.date, years: int) -> dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February in a common year
        return day.replace(year=day.year + years, day=28)


def _latest_in_window(
    observations: list[ObservationFact], feature: ClinicalFeature, study_at: dt.datetime
) -> tuple[ObservationFact | None, str]:
    codes = set(feature.source.loinc)
    candidates = [o for o in observations if o.loinc in codes and o.status not in ("entered-in-error", "cancelled")]
    if not candidates:
        return None, "no value"
    convertible = [o for o in candidates if o.ucum_unit == feature.unit]
    if not convertible:
        return None, "unit not convertible"
    window_start = study_at - dt.timedelta(hours=feature.lookback_hours) if feature.lookback_hours else None
    in_window = [
        o
        for o in convertible
        if o.effective_at is None
        or (
            (window_start is None or o.effective_at >= window_start)
            and o.effective_at <= study_at + dt.timedelta(hours=1)
        )
    ]
    dated = [o for o in in_window if o.effective_at is not None]
    if not in_window:
        return None, "outside lookback window"
    if dated:
        return max(dated, key=lambda o: o.effective_at or study_at), ""
    return (in_window[-1], "") if feature.lookback_hours is None else (None, "no effective time")


def clinical_vector(
    context: ClinicalContext, *, features: list[ClinicalFeature], study_at: dt.datetime
) -> tuple[np.ndarray, np.ndarray, list[ClinicalValue]]:
    """Build the clinical value vector and its missing-mask.

    A value that is absent, outside its lookback window, or in a unit we could not convert is masked
    (mask 0, value 0 after normalization) and reported as missing with the reason; never silently zero-filled.

    Args:
        context: the patient's demographics and normalized observations.
        features: the manifest's clinical features, in the model's order.
        study_at: the study's date and time (UTC), the reference for age and lookback windows.

    Returns:
        (values float32 [n], mask float32 [n] with 1 = present, the values used, one per feature).
    """
    values = np.zeros(len(features), dtype=np.float32)
    mask = np.zeros(len(features), dtype=np.float32)
    used: list[ClinicalValue] = []
    for i, feature in enumerate(features):
        raw: float | None = None
        reason = ""
        loinc: str | None = None
        effective: dt.datetime | None = None
        if feature.source.kind == "age_at_study":
            if context.birth_date is None:
                reason = "no birth date"
            else:
                raw = age_in_years(context.birth_date, study_at.date())
        elif feature.source.kind == "patient_gender":
            if context.gender in (None, "unknown"):
                reason = "no gender"
            else:
                raw = 1.0 if context.gender == feature.source.gender_value else 0.0
        else:
            found, reason = _latest_in_window(context.observations, feature, study_at)
            if found is not None:
                raw, loinc, effective = found.value, found.loinc, found.effective_at
        if raw is not None:
            values[i] = (raw - feature.mean) / feature.std
            mask[i] = 1.0
        used.append(
            ClinicalValue(
                feature=feature.name,
                loinc=loinc,
                value=raw,
                unit=feature.unit,
                effective_at=effective,
                missing=raw is None,
                reason=reason or None,
            )
        )
    return values, mask, used
