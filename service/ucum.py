"""UCUM, the Unified Code for Units of Measure: parse case-sensitive unit expressions and convert values.

FHIR Quantities carry their unit as a UCUM code (``system`` http://unitsofmeasure.org). This module reads such a
code by the UCUM grammar and converts between commensurable units, so that a value sent in "mg/dL", "[degF]" or
"10*9/L" reaches a model in the unit its manifest names. It has no dependency, and imports nothing from the
service (it sits with :mod:`service.schemas` in the lowest layer).

What it implements, in UCUM's terms:

- the case-sensitive syntax: terms joined by ``.`` (multiplication) and ``/`` (division), evaluated left to right
  (``mg/kg/d`` is mg/(kg.d)); a leading ``/`` (``/min`` is 1/min); parentheses; integer exponents, signed or not
  (``m2``, ``s-1``, ``10*-3``); integer factors (``1000/L``); annotations in curly braces, which are
  dimensionless and do not change a value (``{beats}/min`` is ``/min``); square-bracket atoms (``[degF]``,
  ``mm[Hg]``, ``[in_i]``);
- the metric prefixes (Y Z E P T G M k h da d c m u n p f a z y, and Ki Mi Gi Ti), only on metric atoms;
- the base units m, s, g, rad, K, C and cd, and the atoms of UCUM's tables with their definitions: the SI and CGS
  units, time (min h d wk mo a), the international, US and British customary units, clinical units (mm[Hg],
  cm[H2O], eq, osm, U, kat, [iU], g%, [drp], [MET] ...), dimensionless ones (%, [ppm], 10*, [pi]). ``mol`` is, as
  UCUM defines it, the number 6.0221367e23, so amounts of substance are numbers;
- arbitrary units ([iU], [arb'U], [CFU] ...): each is commensurable only with itself;
- the special temperature units Cel, [degF] and [degRe], converted through kelvin. They are affine, so they are
  converted only when a unit is the special unit alone (optionally prefixed or annotated): "Cel/h" is refused.
  The logarithmic and other non-ratio special units ([pH], B, dB, Np, [p'diop], ...) are refused.

Magnitudes are exact rationals (:class:`fractions.Fraction`), so ``convert(1.2, "mg/dL", "mg/L")`` is 12.0 and
not 11.999999999999998; only the result is rounded to a float.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, NamedTuple

__all__ = ["BASE_UNITS", "PREFIXES", "Unit", "UcumError", "commensurable", "convert", "parse"]

MAX_EXPRESSION_LENGTH = 128
MAX_EXPONENT = 99
_MAX_NESTING = 16

BASE_UNITS = ("m", "s", "g", "rad", "K", "C", "cd")
_BASE_NAMES = ("length", "time", "mass", "angle", "temperature", "charge", "luminous intensity")
_NO_DIMENSION = (0,) * len(BASE_UNITS)

PREFIXES: dict[str, Fraction] = {
    "Y": Fraction(10) ** 24,
    "Z": Fraction(10) ** 21,
    "E": Fraction(10) ** 18,
    "P": Fraction(10) ** 15,
    "T": Fraction(10) ** 12,
    "G": Fraction(10) ** 9,
    "M": Fraction(10) ** 6,
    "k": Fraction(10) ** 3,
    "h": Fraction(10) ** 2,
    "da": Fraction(10),
    "d": Fraction(10) ** -1,
    "c": Fraction(10) ** -2,
    "m": Fraction(10) ** -3,
    "u": Fraction(10) ** -6,
    "n": Fraction(10) ** -9,
    "p": Fraction(10) ** -12,
    "f": Fraction(10) ** -15,
    "a": Fraction(10) ** -18,
    "z": Fraction(10) ** -21,
    "y": Fraction(10) ** -24,
    "Ki": Fraction(1024),
    "Mi": Fraction(1024) ** 2,
    "Gi": Fraction(1024) ** 3,
    "Ti": Fraction(1024) ** 4,
}
# Two-letter prefixes first: "da" before "d".
_PREFIX_ORDER = sorted(PREFIXES, key=len, reverse=True)


class UcumError(ValueError):
    """A unit that is not valid UCUM, or a conversion UCUM does not allow.

    Attributes:
        problem: What is wrong, without the unit expressions (e.g. ``"mass/volume vs number/volume"``); the message
            names the units and the problem.
    """

    def __init__(self, message: str, *, problem: str | None = None) -> None:
        super().__init__(message)
        self.problem = problem or message


_AtomKind = Literal["base", "ratio", "arbitrary", "temperature", "non-ratio"]


class _Atom(NamedTuple):
    """One UCUM atom: ``1 symbol = value × definition`` (a UCUM expression) for ratio units."""

    symbol: str
    name: str
    metric: bool
    value: str = "1"
    definition: str = "1"
    kind: _AtomKind = "ratio"


def _base(symbol: str, name: str) -> _Atom:
    return _Atom(symbol, name, True, kind="base")


def _metric(symbol: str, name: str, value: str, definition: str) -> _Atom:
    return _Atom(symbol, name, True, value, definition)


def _other(symbol: str, name: str, value: str, definition: str) -> _Atom:
    return _Atom(symbol, name, False, value, definition)


def _arbitrary(symbol: str, name: str, *, metric: bool = False) -> _Atom:
    return _Atom(symbol, name, metric, kind="arbitrary")


def _non_ratio(symbol: str, name: str, *, metric: bool = False) -> _Atom:
    return _Atom(symbol, name, metric, kind="non-ratio")


# Kelvin at the zero of each special temperature unit; its scale is the atom's value × definition.
_TEMPERATURE_ZEROS: dict[str, Fraction] = {
    "Cel": Fraction("273.15"),
    "[degF]": Fraction("459.67") * Fraction(5, 9),
    "[degRe]": Fraction("273.15"),
}

# The atoms of the UCUM tables (section numbers of the UCUM specification), with their definitions.
_ATOM_LIST: tuple[_Atom, ...] = (
    # §28 base units
    _base("m", "meter"),
    _base("s", "second"),
    _base("g", "gram"),
    _base("rad", "radian"),
    _base("K", "kelvin"),
    _base("C", "coulomb"),
    _base("cd", "candela"),
    # §29 dimensionless
    _other("10*", "the number ten for arbitrary powers", "10", "1"),
    _other("10^", "the number ten for arbitrary powers", "10", "1"),
    _other("[pi]", "the number pi", "3.14159265358979323846264338327950288", "1"),
    _other("%", "percent", "1", "10*-2"),
    _other("[ppth]", "parts per thousand", "1", "10*-3"),
    _other("[ppm]", "parts per million", "1", "10*-6"),
    _other("[ppb]", "parts per billion", "1", "10*-9"),
    _other("[pptr]", "parts per trillion", "1", "10*-12"),
    # §30 SI units
    _metric("mol", "mole", "6.0221367", "10*23"),
    _metric("sr", "steradian", "1", "rad2"),
    _metric("Hz", "hertz", "1", "s-1"),
    _metric("N", "newton", "1", "kg.m/s2"),
    _metric("Pa", "pascal", "1", "N/m2"),
    _metric("J", "joule", "1", "N.m"),
    _metric("W", "watt", "1", "J/s"),
    _metric("A", "ampere", "1", "C/s"),
    _metric("V", "volt", "1", "J/C"),
    _metric("F", "farad", "1", "C/V"),
    _metric("Ohm", "ohm", "1", "V/A"),
    _metric("S", "siemens", "1", "Ohm-1"),
    _metric("Wb", "weber", "1", "V.s"),
    _Atom("Cel", "degree Celsius", True, "1", "K", kind="temperature"),
    _metric("T", "tesla", "1", "Wb/m2"),
    _metric("H", "henry", "1", "Wb/A"),
    _metric("lm", "lumen", "1", "cd.sr"),
    _metric("lx", "lux", "1", "lm/m2"),
    _metric("Bq", "becquerel", "1", "s-1"),
    _metric("Gy", "gray", "1", "J/kg"),
    _metric("Sv", "sievert", "1", "J/kg"),
    # §31 other units from ISO 1000, ISO 2955 and ANSI X3.50
    _other("gon", "gon", "0.9", "deg"),
    _other("deg", "degree", "2", "[pi].rad/360"),
    _other("'", "minute of arc", "1", "deg/60"),
    _other("''", "second of arc", "1", "'/60"),
    _metric("l", "liter", "1", "dm3"),
    _metric("L", "liter", "1", "l"),
    _metric("ar", "are", "100", "m2"),
    _other("min", "minute", "60", "s"),
    _other("h", "hour", "60", "min"),
    _other("d", "day", "24", "h"),
    _other("a_t", "tropical year", "365.24219", "d"),
    _other("a_j", "mean Julian year", "365.25", "d"),
    _other("a_g", "mean Gregorian year", "365.2425", "d"),
    _other("a", "year", "1", "a_j"),
    _other("wk", "week", "7", "d"),
    _other("mo_s", "synodal month", "29.53059", "d"),
    _other("mo_j", "mean Julian month", "1", "a_j/12"),
    _other("mo_g", "mean Gregorian month", "1", "a_g/12"),
    _other("mo", "month", "1", "mo_j"),
    _metric("t", "tonne", "1e3", "kg"),
    _metric("bar", "bar", "1e5", "Pa"),
    _metric("u", "unified atomic mass unit", "1.6605402e-24", "g"),
    _metric("eV", "electronvolt", "1", "[e].V"),
    _other("AU", "astronomic unit", "149597.870691", "Mm"),
    _metric("pc", "parsec", "3.085678e16", "m"),
    # §32 natural units
    _metric("[c]", "velocity of light", "299792458", "m/s"),
    _metric("[h]", "Planck constant", "6.6260755e-34", "J.s"),
    _metric("[k]", "Boltzmann constant", "1.380658e-23", "J/K"),
    _metric("[eps_0]", "permittivity of vacuum", "8.854187817e-12", "F/m"),
    _metric("[mu_0]", "permeability of vacuum", "1", "4.[pi].10*-7.N/A2"),
    _metric("[e]", "elementary charge", "1.60217733e-19", "C"),
    _metric("[m_e]", "electron mass", "9.1093897e-28", "g"),
    _metric("[m_p]", "proton mass", "1.6726231e-24", "g"),
    _metric("[G]", "Newtonian constant of gravitation", "6.67259e-11", "m3.kg-1.s-2"),
    _metric("[g]", "standard acceleration of free fall", "9.80665", "m/s2"),
    _other("atm", "standard atmosphere", "101325", "Pa"),
    _metric("[ly]", "light-year", "1", "[c].a_j"),
    _metric("gf", "gram-force", "1", "g.[g]"),
    _other("[lbf_av]", "pound force", "1", "[lb_av].[g]"),
    # §33 CGS units
    _metric("Ky", "Kayser", "1", "cm-1"),
    _metric("Gal", "Gal", "1", "cm/s2"),
    _metric("dyn", "dyne", "1", "g.cm/s2"),
    _metric("erg", "erg", "1", "dyn.cm"),
    _metric("P", "Poise", "1", "dyn.s/cm2"),
    _metric("Bi", "Biot", "10", "A"),
    _metric("St", "Stokes", "1", "cm2/s"),
    _metric("Mx", "Maxwell", "1e-8", "Wb"),
    _metric("G", "Gauss", "1e-4", "T"),
    _metric("Oe", "Oersted", "250", "/[pi].A/m"),
    _metric("Gb", "Gilbert", "1", "Oe.cm"),
    _metric("sb", "stilb", "1", "cd/cm2"),
    _metric("Lmb", "Lambert", "1", "cd/cm2/[pi]"),
    _metric("ph", "phot", "1e-4", "lx"),
    _metric("Ci", "Curie", "37e9", "Bq"),
    _metric("R", "Roentgen", "2.58e-4", "C/kg"),
    _metric("RAD", "radiation absorbed dose", "100", "erg/g"),
    _metric("REM", "radiation equivalent man", "1", "RAD"),
    # §34 international customary units
    _other("[in_i]", "inch", "2.54", "cm"),
    _other("[ft_i]", "foot", "12", "[in_i]"),
    _other("[yd_i]", "yard", "3", "[ft_i]"),
    _other("[mi_i]", "statute mile", "5280", "[ft_i]"),
    _other("[fth_i]", "fathom", "6", "[ft_i]"),
    _other("[nmi_i]", "nautical mile", "1852", "m"),
    _other("[kn_i]", "knot", "1", "[nmi_i]/h"),
    _other("[sin_i]", "square inch", "1", "[in_i]2"),
    _other("[sft_i]", "square foot", "1", "[ft_i]2"),
    _other("[syd_i]", "square yard", "1", "[yd_i]2"),
    _other("[cin_i]", "cubic inch", "1", "[in_i]3"),
    _other("[cft_i]", "cubic foot", "1", "[ft_i]3"),
    _other("[cyd_i]", "cubic yard", "1", "[yd_i]3"),
    _other("[bf_i]", "board foot", "144", "[in_i]3"),
    _other("[cr_i]", "cord", "128", "[ft_i]3"),
    _other("[mil_i]", "mil", "1e-3", "[in_i]"),
    _other("[cml_i]", "circular mil", "1", "[pi]/4.[mil_i]2"),
    _other("[hd_i]", "hand", "4", "[in_i]"),
    # §35 U.S. survey lengths
    _other("[ft_us]", "foot (US survey)", "1200", "m/3937"),
    _other("[yd_us]", "yard (US survey)", "3", "[ft_us]"),
    _other("[in_us]", "inch (US survey)", "1", "[ft_us]/12"),
    _other("[rd_us]", "rod", "16.5", "[ft_us]"),
    _other("[ch_us]", "Gunter's chain", "4", "[rd_us]"),
    _other("[lk_us]", "link for Gunter's chain", "1", "[ch_us]/100"),
    _other("[rch_us]", "Ramden's chain", "100", "[ft_us]"),
    _other("[rlk_us]", "link for Ramden's chain", "1", "[rch_us]/100"),
    _other("[fth_us]", "fathom (US survey)", "6", "[ft_us]"),
    _other("[fur_us]", "furlong", "40", "[rd_us]"),
    _other("[mi_us]", "mile (US survey)", "8", "[fur_us]"),
    _other("[acr_us]", "acre", "160", "[rd_us]2"),
    _other("[srd_us]", "square rod", "1", "[rd_us]2"),
    _other("[smi_us]", "square mile", "1", "[mi_us]2"),
    _other("[sct]", "section", "1", "[mi_us]2"),
    _other("[twp]", "township", "36", "[sct]"),
    _other("[mil_us]", "mil (US survey)", "1e-3", "[in_us]"),
    # §36 British imperial lengths
    _other("[in_br]", "inch (British)", "2.539998", "cm"),
    _other("[ft_br]", "foot (British)", "12", "[in_br]"),
    _other("[rd_br]", "rod (British)", "16.5", "[ft_br]"),
    _other("[ch_br]", "Gunter's chain (British)", "4", "[rd_br]"),
    _other("[lk_br]", "link for Gunter's chain (British)", "1", "[ch_br]/100"),
    _other("[fth_br]", "fathom (British)", "6", "[ft_br]"),
    _other("[pc_br]", "pace", "2.5", "[ft_br]"),
    _other("[yd_br]", "yard (British)", "3", "[ft_br]"),
    _other("[mi_br]", "mile (British)", "5280", "[ft_br]"),
    _other("[nmi_br]", "nautical mile (British)", "6080", "[ft_br]"),
    _other("[kn_br]", "knot (British)", "1", "[nmi_br]/h"),
    _other("[acr_br]", "acre (British)", "4840", "[yd_br]2"),
    # §37 U.S. volumes
    _other("[gal_us]", "Queen Anne's wine gallon", "231", "[in_i]3"),
    _other("[bbl_us]", "barrel", "42", "[gal_us]"),
    _other("[qt_us]", "quart", "1", "[gal_us]/4"),
    _other("[pt_us]", "pint", "1", "[qt_us]/2"),
    _other("[gil_us]", "gill", "1", "[pt_us]/4"),
    _other("[foz_us]", "fluid ounce", "1", "[gil_us]/4"),
    _other("[fdr_us]", "fluid dram", "1", "[foz_us]/8"),
    _other("[min_us]", "minim", "1", "[fdr_us]/60"),
    _other("[crd_us]", "cord (US)", "128", "[ft_i]3"),
    _other("[bu_us]", "bushel", "2150.42", "[in_i]3"),
    _other("[gal_wi]", "historical winchester gallon", "1", "[bu_us]/8"),
    _other("[pk_us]", "peck", "1", "[bu_us]/4"),
    _other("[dqt_us]", "dry quart", "1", "[pk_us]/8"),
    _other("[dpt_us]", "dry pint", "1", "[dqt_us]/2"),
    _other("[tbs_us]", "tablespoon", "1", "[foz_us]/2"),
    _other("[tsp_us]", "teaspoon", "1", "[tbs_us]/3"),
    _other("[cup_us]", "cup", "16", "[tbs_us]"),
    _other("[foz_m]", "metric fluid ounce", "30", "mL"),
    _other("[cup_m]", "metric cup", "240", "mL"),
    _other("[tsp_m]", "metric teaspoon", "5", "mL"),
    _other("[tbs_m]", "metric tablespoon", "15", "mL"),
    # §38 British imperial volumes
    _other("[gal_br]", "gallon (British)", "4.54609", "l"),
    _other("[pk_br]", "peck (British)", "2", "[gal_br]"),
    _other("[bu_br]", "bushel (British)", "4", "[pk_br]"),
    _other("[qt_br]", "quart (British)", "1", "[gal_br]/4"),
    _other("[pt_br]", "pint (British)", "1", "[qt_br]/2"),
    _other("[gil_br]", "gill (British)", "1", "[pt_br]/4"),
    _other("[foz_br]", "fluid ounce (British)", "1", "[gil_br]/5"),
    _other("[fdr_br]", "fluid dram (British)", "1", "[foz_br]/8"),
    _other("[min_br]", "minim (British)", "1", "[fdr_br]/60"),
    # §39-41 avoirdupois, troy and apothecaries' weights, metric ounce
    _other("[gr]", "grain", "64.79891", "mg"),
    _other("[lb_av]", "pound", "7000", "[gr]"),
    _other("[oz_av]", "ounce", "1", "[lb_av]/16"),
    _other("[dr_av]", "dram", "1", "[oz_av]/16"),
    _other("[scwt_av]", "short hundredweight", "100", "[lb_av]"),
    _other("[lcwt_av]", "long hundredweight", "112", "[lb_av]"),
    _other("[ston_av]", "short ton", "20", "[scwt_av]"),
    _other("[lton_av]", "long ton", "20", "[lcwt_av]"),
    _other("[stone_av]", "stone", "14", "[lb_av]"),
    _other("[pwt_tr]", "pennyweight", "24", "[gr]"),
    _other("[oz_tr]", "troy ounce", "20", "[pwt_tr]"),
    _other("[lb_tr]", "troy pound", "12", "[oz_tr]"),
    _other("[sc_ap]", "scruple", "20", "[gr]"),
    _other("[dr_ap]", "apothecaries' dram", "3", "[sc_ap]"),
    _other("[oz_ap]", "apothecaries' ounce", "8", "[dr_ap]"),
    _other("[lb_ap]", "apothecaries' pound", "12", "[oz_ap]"),
    _other("[oz_m]", "metric ounce", "28", "g"),
    # §43 legacy units for heat and temperature
    _Atom("[degF]", "degree Fahrenheit", False, "5", "K/9", kind="temperature"),
    _other("[degR]", "degree Rankine", "5", "K/9"),
    _Atom("[degRe]", "degree Réaumur", False, "5", "K/4", kind="temperature"),
    _metric("cal_[15]", "calorie at 15 °C", "4.18580", "J"),
    _metric("cal_[20]", "calorie at 20 °C", "4.18190", "J"),
    _metric("cal_m", "mean calorie", "4.19002", "J"),
    _metric("cal_IT", "international table calorie", "4.1868", "J"),
    _metric("cal_th", "thermochemical calorie", "4.184", "J"),
    _metric("cal", "calorie", "1", "cal_th"),
    _other("[Cal]", "nutrition label Calories", "1", "kcal_th"),
    _other("[Btu_39]", "British thermal unit at 39 °F", "1.05967", "kJ"),
    _other("[Btu_59]", "British thermal unit at 59 °F", "1.05480", "kJ"),
    _other("[Btu_60]", "British thermal unit at 60 °F", "1.05468", "kJ"),
    _other("[Btu_m]", "mean British thermal unit", "1.05587", "kJ"),
    _other("[Btu_IT]", "international table British thermal unit", "1.05505585262", "kJ"),
    _other("[Btu_th]", "thermochemical British thermal unit", "1.054350", "kJ"),
    _other("[Btu]", "British thermal unit", "1", "[Btu_th]"),
    _other("[HP]", "horsepower", "550", "[ft_i].[lbf_av]/s"),
    _metric("tex", "tex", "1", "g/km"),
    _other("[den]", "Denier", "1", "g/9/km"),
    # §44 clinical medicine
    _metric("m[H2O]", "meter of water column", "9.80665", "kPa"),
    _metric("m[Hg]", "meter of mercury column", "133.3220", "kPa"),
    _other("[in_i'H2O]", "inch of water column", "1", "m[H2O].[in_i]/m"),
    _other("[in_i'Hg]", "inch of mercury column", "1", "m[Hg].[in_i]/m"),
    _other("[PRU]", "peripheral vascular resistance unit", "1", "mm[Hg].s/ml"),
    _other("[wood'U]", "Wood unit", "1", "mm[Hg].min/L"),
    _other("[diop]", "diopter", "1", "/m"),
    _non_ratio("[p'diop]", "prism diopter"),
    _non_ratio("%[slope]", "percent of slope"),
    _other("[mesh_i]", "mesh", "1", "/[in_i]"),
    _other("[Ch]", "Charrière", "1", "mm/3"),
    _other("[drp]", "drop", "1", "ml/20"),
    _other("[hnsf'U]", "Hounsfield unit", "1", "1"),
    _other("[MET]", "metabolic equivalent", "3.5", "mL/min/kg"),
    _non_ratio("[hp'_X]", "homeopathic potency of decimal series (retired)"),
    _non_ratio("[hp'_C]", "homeopathic potency of centesimal series (retired)"),
    _non_ratio("[hp'_M]", "homeopathic potency of millesimal series (retired)"),
    _non_ratio("[hp'_Q]", "homeopathic potency of quintamillesimal series (retired)"),
    _arbitrary("[hp_X]", "homeopathic potency of decimal hahnemannian series"),
    _arbitrary("[hp_C]", "homeopathic potency of centesimal hahnemannian series"),
    _arbitrary("[hp_M]", "homeopathic potency of millesimal hahnemannian series"),
    _arbitrary("[hp_Q]", "homeopathic potency of quintamillesimal hahnemannian series"),
    _arbitrary("[kp_X]", "homeopathic potency of decimal korsakovian series"),
    _arbitrary("[kp_C]", "homeopathic potency of centesimal korsakovian series"),
    _arbitrary("[kp_M]", "homeopathic potency of millesimal korsakovian series"),
    _arbitrary("[kp_Q]", "homeopathic potency of quintamillesimal korsakovian series"),
    _metric("eq", "equivalents", "1", "mol"),
    _metric("osm", "osmole", "1", "mol"),
    _non_ratio("[pH]", "pH"),
    _metric("g%", "gram percent", "1", "g/dl"),
    _other("[S]", "Svedberg unit", "1", "10*-13.s"),
    _other("[HPF]", "high power field", "1", "1"),
    _other("[LPF]", "low power field", "100", "1"),
    _metric("kat", "katal", "1", "mol/s"),
    _metric("U", "enzyme unit", "1", "umol/min"),
    _arbitrary("[iU]", "international unit", metric=True),
    _metric("[IU]", "international unit", "1", "[iU]"),
    _arbitrary("[arb'U]", "arbitrary unit"),
    _arbitrary("[USP'U]", "United States Pharmacopeia unit"),
    _arbitrary("[GPL'U]", "GPL unit"),
    _arbitrary("[MPL'U]", "MPL unit"),
    _arbitrary("[APL'U]", "APL unit"),
    _arbitrary("[beth'U]", "Bethesda unit"),
    _arbitrary("[anti'Xa'U]", "anti factor Xa unit"),
    _arbitrary("[todd'U]", "Todd unit"),
    _arbitrary("[dye'U]", "Dye unit"),
    _arbitrary("[smgy'U]", "Somogyi unit"),
    _arbitrary("[bdsk'U]", "Bodansky unit"),
    _arbitrary("[ka'U]", "King-Armstrong unit"),
    _arbitrary("[knk'U]", "Kunkel unit"),
    _arbitrary("[mclg'U]", "Mac Lagan unit"),
    _arbitrary("[tb'U]", "tuberculin unit"),
    _arbitrary("[CCID_50]", "50% cell culture infectious dose"),
    _arbitrary("[TCID_50]", "50% tissue culture infectious dose"),
    _arbitrary("[EID_50]", "50% embryo infectious dose"),
    _arbitrary("[PFU]", "plaque forming units"),
    _arbitrary("[FFU]", "focus forming units"),
    _arbitrary("[CFU]", "colony forming units"),
    _arbitrary("[IR]", "index of reactivity"),
    _arbitrary("[BAU]", "bioequivalent allergen unit"),
    _arbitrary("[AU]", "allergen unit"),
    _arbitrary("[Amb'a'1'U]", "allergen unit for Ambrosia artemisiifolia"),
    _arbitrary("[PNU]", "protein nitrogen unit"),
    _arbitrary("[Lf]", "limit of flocculation"),
    _arbitrary("[D'ag'U]", "D-antigen unit"),
    _arbitrary("[FEU]", "fibrinogen equivalent unit"),
    _arbitrary("[ELU]", "ELISA unit"),
    _arbitrary("[EU]", "Ehrlich unit"),
    # §45 levels (logarithmic)
    _non_ratio("Np", "neper", metric=True),
    _non_ratio("B", "bel", metric=True),
    _non_ratio("B[SPL]", "bel sound pressure", metric=True),
    _non_ratio("B[V]", "bel volt", metric=True),
    _non_ratio("B[mV]", "bel millivolt", metric=True),
    _non_ratio("B[uV]", "bel microvolt", metric=True),
    _non_ratio("B[10.nV]", "bel 10 nanovolt", metric=True),
    _non_ratio("B[W]", "bel watt", metric=True),
    _non_ratio("B[kW]", "bel kilowatt", metric=True),
    # §46 miscellaneous
    _metric("st", "stere", "1", "m3"),
    _other("Ao", "Ångström", "0.1", "nm"),
    _other("b", "barn", "100", "fm2"),
    _other("att", "technical atmosphere", "1", "kgf/cm2"),
    _metric("mho", "mho", "1", "S"),
    _other("[psi]", "pound per square inch", "1", "[lbf_av]/[in_i]2"),
    _other("circ", "circle", "2", "[pi].rad"),
    _other("sph", "sphere", "4", "[pi].sr"),
    _other("[car_m]", "metric carat", "2e-1", "g"),
    _other("[car_Au]", "carat of gold alloys", "1", "/24"),
    _other("[smoot]", "Smoot", "67", "[in_i]"),
    _non_ratio("[m/s2/Hz^(1/2)]", "meter per square seconds per square root of hertz"),
    # §47 information technology
    _non_ratio("bit_s", "bit (logarithmic)"),
    _metric("bit", "bit", "1", "1"),
    _metric("By", "byte", "8", "bit"),
    _metric("Bd", "baud", "1", "/s"),
)
_ATOMS: dict[str, _Atom] = {atom.symbol: atom for atom in _ATOM_LIST}

# Spellings senders use that are not UCUM, and what UCUM writes instead (only offered for unknown symbols).
_NOT_UCUM_HINTS = {
    "mmHg": "mm[Hg]",
    "cmH2O": "cm[H2O]",
    "degC": "Cel",
    "degF": "[degF]",
    "IU": "[IU]",
    "bpm": "/min",
    "beats": "{beats}",
    "breaths": "{breaths}",
    "cells": "{cells}",
    "lb": "[lb_av]",
    "lbs": "[lb_av]",
    "oz": "[oz_av]",
    "in": "[in_i]",
    "ft": "[ft_i]",
    "sec": "s",
    "hr": "h",
    "hrs": "h",
    "mcg": "ug",
    "cc": "mL",
}


@dataclass(frozen=True)
class _Value:
    """A magnitude and dimension during parsing; ``special`` is set only for a lone special temperature unit."""

    factor: Fraction
    dimension: tuple[int, ...] = _NO_DIMENSION
    arbitrary: tuple[tuple[str, int], ...] = ()
    special: str | None = None
    zero: Fraction = Fraction(0)

    def combine(self, other: _Value, operator: str) -> _Value:
        sign = 1 if operator == "." else -1
        arbitrary = dict(self.arbitrary)
        for symbol, exponent in other.arbitrary:
            arbitrary[symbol] = arbitrary.get(symbol, 0) + sign * exponent
        return _Value(
            factor=self.factor * other.factor if sign == 1 else self.factor / other.factor,
            dimension=tuple(a + sign * b for a, b in zip(self.dimension, other.dimension, strict=True)),
            arbitrary=tuple(sorted((s, e) for s, e in arbitrary.items() if e)),
        )

    def power(self, exponent: int) -> _Value:
        if exponent == 1:
            return self
        return _Value(
            factor=self.factor**exponent,
            dimension=tuple(d * exponent for d in self.dimension),
            arbitrary=tuple((s, e * exponent) for s, e in self.arbitrary if e * exponent),
        )

    def scaled(self, factor: Fraction) -> _Value:
        return _Value(self.factor * factor, self.dimension, self.arbitrary, self.special, self.zero)


_ONE = _Value(Fraction(1))


@dataclass(frozen=True)
class Unit:
    """A parsed UCUM unit.

    Attributes:
        expression: The unit as given, e.g. ``"mg/dL"``.
        factor: The magnitude of one unit in UCUM's base units (m, s, g, rad, K, C, cd), exactly:
            ``Fraction(10)`` for mg/dL (g/m3). For a special temperature unit, its scale in kelvin.
        dimension: Exponents of the base units, in the order of :data:`BASE_UNITS`.
        arbitrary: ``(symbol, exponent)`` of each arbitrary unit in the expression ([iU], [arb'U] ...).
        special: For a special temperature unit on its own, its atom ("Cel", "[degF]", "[degRe]"); otherwise None.
        zero: For a special temperature unit, kelvin at its zero (273.15 for Cel); otherwise 0.
    """

    expression: str
    factor: Fraction
    dimension: tuple[int, ...]
    arbitrary: tuple[tuple[str, int], ...] = ()
    special: str | None = None
    zero: Fraction = Fraction(0)

    @property
    def is_special(self) -> bool:
        return self.special is not None

    @property
    def is_arbitrary(self) -> bool:
        return bool(self.arbitrary)

    @property
    def kind(self) -> str:
        """The dimension in words, e.g. ``"mass/volume"``, ``"number/volume"``, ``"pressure"``."""
        return _describe(self.dimension, self.arbitrary)

    def commensurable_with(self, other: Unit) -> bool:
        return self.dimension == other.dimension and self.arbitrary == other.arbitrary


def parse(unit: str) -> Unit:
    """Parse a case-sensitive UCUM expression.

    Args:
        unit: The expression, e.g. ``"mg/dL"``, ``"10*3/uL"``, ``"{beats}/min"``, ``"[degF]"``.

    Returns:
        Its magnitude and dimension.

    Raises:
        UcumError: The expression is not valid UCUM (the message names the unit, the problem and where), or it
            uses a special unit that cannot be converted (a logarithmic one, or Cel/[degF] inside a compound).
    """
    if not isinstance(unit, str):
        raise UcumError(f"a UCUM unit must be a string, not {type(unit).__name__}")
    return _parse_cached(unit)


def commensurable(a: str, b: str) -> bool:
    """Whether values in unit ``a`` can be converted to unit ``b`` (same dimension and arbitrary units).

    Raises:
        UcumError: Either unit is not valid UCUM.
    """
    return parse(a).commensurable_with(parse(b))


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """Convert a value between two commensurable UCUM units.

    Args:
        value: The value, in ``from_unit``.
        from_unit: Its UCUM unit, e.g. ``"mg/dL"``.
        to_unit: The unit wanted, e.g. ``"mg/L"``.

    Returns:
        The value in ``to_unit``, rounded once to a float (e.g. ``convert(1.2, "mg/dL", "mg/L") == 12.0``,
        ``convert(98.6, "[degF]", "Cel") == 37.0``).

    Raises:
        UcumError: A unit is not valid UCUM, the units are not commensurable (``'"mg/dL" and "mmol/L" are not
            commensurable (mass/volume vs number/volume)'``), the value is not finite, or the result is out of
            a float's range.
    """
    source, target = parse(from_unit), parse(to_unit)
    if not source.commensurable_with(target):
        problem = f"{source.kind} vs {target.kind}"
        raise UcumError(f'"{from_unit}" and "{to_unit}" are not commensurable ({problem})', problem=problem)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UcumError(f"cannot convert {value!r}: not a finite number", problem="not a finite number")
    if source == target or (source.factor == target.factor and source.zero == target.zero):
        return float(value)
    in_base = Fraction(value) * source.factor + source.zero
    result = (in_base - target.zero) / target.factor
    try:
        return float(result)
    except OverflowError as e:
        problem = "the result is out of range"
        raise UcumError(f'{value!r} "{from_unit}" in "{to_unit}": {problem}', problem=problem) from e


@functools.lru_cache(maxsize=1024)
def _parse_cached(unit: str) -> Unit:
    value = _Parser(unit).parse()
    return Unit(unit, value.factor, value.dimension, value.arbitrary, value.special, value.zero)


class _Parser:
    """Recursive descent over UCUM's grammar (main-term, term, component, annotatable, simple-unit)."""

    def __init__(self, text: str, *, definition: bool = False) -> None:
        self.text = text
        self.pos = 0
        self.definition = definition

    def error(self, problem: str) -> UcumError:
        return UcumError(f'"{self.text}" is not valid UCUM: {problem}', problem=f"not valid UCUM: {problem}")

    def parse(self) -> _Value:
        text = self.text
        if not text:
            raise self.error("the unit is empty (UCUM writes the unity as 1)")
        if len(text) > MAX_EXPRESSION_LENGTH and not self.definition:
            raise self.error(f"longer than {MAX_EXPRESSION_LENGTH} characters")
        for index, char in enumerate(text):
            if char.isspace():
                raise self.error(f"whitespace at position {index}")
            if not " " < char <= "~":
                hint = ' (UCUM writes micro as "u")' if char in "µμ" else ""
                raise self.error(f"character {char!r} at position {index} is not printable ASCII{hint}")
        leading_division = text.startswith("/")
        self.pos = 1 if leading_division else 0
        value = self.term(depth=0, leading_division=leading_division)
        if self.pos < len(text):
            raise self.error(f'unexpected "{text[self.pos]}" at position {self.pos}')
        return value

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def term(self, depth: int, leading_division: bool = False) -> _Value:
        """Components joined by "." and "/", left to right; a leading "/" divides 1 by what follows."""
        value = self.component(depth)
        if leading_division:
            value = self.combine(_ONE, value, "/")
        while self.peek() in (".", "/"):
            operator = self.peek()
            self.pos += 1
            value = self.combine(value, self.component(depth), operator)
        return value

    def combine(self, left: _Value, right: _Value, operator: str) -> _Value:
        for operand in (left, right):
            if operand.special is not None:
                raise _special_in_compound(self.text, operand.special)
        return left.combine(right, operator)

    def component(self, depth: int) -> _Value:
        start = self.pos
        char = self.peek()
        if not char:
            raise self.error(f"a unit is missing at the end (position {start})")
        if char == "(":
            if depth >= _MAX_NESTING:
                raise self.error(f"parentheses nested deeper than {_MAX_NESTING}")
            self.pos += 1
            value = self.term(depth + 1)
            if self.peek() != ")":
                raise self.error(f'"(" at position {start} is not closed')
            self.pos += 1
            if self.peek() and self.peek() not in "./)":
                raise self.error(f'"{self.peek()}" at position {self.pos} cannot follow ")" (no exponent on a group)')
            return value
        if char == "{":
            self.annotation()
            return _ONE
        if char.isdigit() and not self.text.startswith(("10*", "10^"), self.pos):
            while self.peek().isdigit():
                self.pos += 1
            return _Value(Fraction(int(self.text[start : self.pos])))
        symbol = self.symbol()
        if not symbol:
            raise self.error(f'a unit is expected at position {start}, not "{char}"')
        exponent = self.exponent()
        value = _simple_unit(symbol, self.text, start)
        if value.special is not None and exponent != 1:
            raise _special_in_compound(self.text, value.special)
        value = value.power(exponent)
        if self.peek() == "{":
            self.annotation()
        return value

    def symbol(self) -> str:
        start = self.pos
        if self.text.startswith(("10*", "10^"), start):
            self.pos += 3
            return self.text[start : self.pos]
        while self.pos < len(self.text):
            char = self.text[self.pos]
            if char == "[":
                close = self.text.find("]", self.pos)
                if close < 0:
                    raise self.error(f'"[" at position {self.pos} is not closed')
                self.pos = close + 1
            elif char.isdigit() or char in "./(){}+-":
                break
            else:
                self.pos += 1
        return self.text[start : self.pos]

    def exponent(self) -> int:
        start = self.pos
        if self.peek() in ("+", "-"):
            self.pos += 1
        digits_start = self.pos
        while self.peek().isdigit():
            self.pos += 1
        if self.pos == start:
            return 1
        if self.pos == digits_start:
            raise self.error(f"the sign at position {start} is not followed by an exponent")
        exponent = int(self.text[start : self.pos])
        if abs(exponent) > MAX_EXPONENT:
            raise self.error(f"exponent {exponent} at position {start} is beyond ±{MAX_EXPONENT}")
        return exponent

    def annotation(self) -> None:
        start = self.pos
        close = self.text.find("}", start)
        if close < 0:
            raise self.error(f'"{{" at position {start} is not closed')
        if "{" in self.text[start + 1 : close]:
            raise self.error(f'"{{" inside the annotation at position {start}')
        self.pos = close + 1


def _special_in_compound(text: str, symbol: str) -> UcumError:
    atom = _ATOMS[symbol]
    problem = (
        f"{symbol} ({atom.name}) is a special unit with an offset; it converts only on its own, "
        "not raised to a power or inside a compound unit"
    )
    return UcumError(f'"{text}": {problem}', problem=problem)


def _simple_unit(symbol: str, text: str, position: int) -> _Value:
    """An atom, or a metric prefix and a metric atom."""
    atom = _ATOMS.get(symbol)
    if atom is not None:
        return _atom_value(atom.symbol, text)
    non_metric: _Atom | None = None
    for prefix in _PREFIX_ORDER:
        if not symbol.startswith(prefix) or len(symbol) == len(prefix):
            continue
        atom = _ATOMS.get(symbol[len(prefix) :])
        if atom is None:
            continue
        if not atom.metric:
            non_metric = non_metric or atom
            continue
        return _atom_value(atom.symbol, text).scaled(PREFIXES[prefix])
    if non_metric is not None:
        problem = f'{non_metric.symbol} ({non_metric.name}) is not metric and takes no prefix ("{symbol}")'
    else:
        problem = f'"{symbol}" at position {position} is not a UCUM unit{_hint(symbol)}'
    raise UcumError(f'"{text}" is not valid UCUM: {problem}', problem=f"not valid UCUM: {problem}")


def _hint(symbol: str) -> str:
    if symbol in _NOT_UCUM_HINTS:
        return f' (UCUM writes "{_NOT_UCUM_HINTS[symbol]}")'
    folded = symbol.casefold()
    for candidate in _ATOMS:
        if candidate.casefold() == folded:
            return f' (UCUM is case-sensitive: "{candidate}"?)'
    for prefix in _PREFIX_ORDER:
        for candidate, atom in _ATOMS.items():
            if atom.metric and (prefix + candidate).casefold() == folded:
                return f' (UCUM is case-sensitive: "{prefix + candidate}"?)'
    return ""


def _atom_value(symbol: str, text: str) -> _Value:
    atom = _ATOMS[symbol]
    if atom.kind == "non-ratio":
        problem = f"{atom.symbol} ({atom.name}) is a special non-ratio unit, which cannot be converted"
        raise UcumError(f'"{text}": {problem}', problem=problem)
    return _resolved(symbol)


@functools.cache
def _resolved(symbol: str) -> _Value:
    """The magnitude and dimension of one atom, from its definition (atoms are defined in terms of others)."""
    atom = _ATOMS[symbol]
    if atom.kind == "base":
        index = BASE_UNITS.index(symbol)
        return _Value(Fraction(1), tuple(1 if i == index else 0 for i in range(len(BASE_UNITS))))
    if atom.kind == "arbitrary":
        return _Value(Fraction(1), arbitrary=((symbol, 1),))
    definition = _Parser(atom.definition, definition=True).parse()
    value = definition.scaled(Fraction(atom.value))
    if atom.kind == "temperature":
        return _Value(value.factor, value.dimension, special=symbol, zero=_TEMPERATURE_ZEROS[symbol])
    return value


_NAMED_DIMENSIONS = {
    (-1, -2, 1, 0, 0, 0, 0): "pressure",
    (2, -2, 1, 0, 0, 0, 0): "energy",
    (2, -3, 1, 0, 0, 0, 0): "power",
    (1, -2, 1, 0, 0, 0, 0): "force",
}


def _describe(dimension: tuple[int, ...], arbitrary: tuple[tuple[str, int], ...]) -> str:
    if not arbitrary and dimension in _NAMED_DIMENSIONS:
        return _NAMED_DIMENSIONS[dimension]
    numerator: list[str] = []
    denominator: list[str] = []
    for name, exponent in [*zip(_BASE_NAMES, dimension, strict=True), *arbitrary]:
        if exponent == 0:
            continue
        size = abs(exponent)
        if name == "length" and size in (2, 3):
            word = "area" if size == 2 else "volume"
        else:
            word = name if size == 1 else f"{name}{size}"
        (numerator if exponent > 0 else denominator).append(word)
    if not numerator and not denominator:
        return "dimensionless"
    top = ".".join(numerator) or "number"
    if not denominator:
        return top
    bottom = denominator[0] if len(denominator) == 1 else f"({'.'.join(denominator)})"
    return f"{top}/{bottom}"
