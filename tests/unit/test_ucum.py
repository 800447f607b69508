"""UCUM: the case-sensitive grammar, prefixes, atoms with their definitions, special and arbitrary units."""

from __future__ import annotations

from fractions import Fraction

import pytest

from service.ucum import BASE_UNITS, UcumError, commensurable, convert, parse

# Conversions whose exact result is a float: the module computes in rationals and rounds once.
EXACT = [
    (1.2, "mg/dL", "mg/L", 12.0),
    (98.6, "[degF]", "Cel", 37.0),
    (37.0, "Cel", "[degF]", 98.6),
    (0.0, "Cel", "K", 273.15),
    (-40.0, "[degF]", "Cel", -40.0),
    (212.0, "[degF]", "K", 373.15),
    (14.2, "10*9/L", "10*3/uL", 14.2),
    (14.2, "10^9/L", "10*3/uL", 14.2),
    (14.2, "10*3/mm3", "10*3/uL", 14.2),
    (9800.0, "/uL", "10*3/uL", 9.8),
    (9.8, "/nL", "10*3/uL", 9.8),
    (14.0, "g/dL", "g/L", 140.0),
    (5.4, "mmol/L", "umol/L", 5400.0),
    (150.0, "[lb_av]", "kg", 68.0388555),
    (70.0, "[in_i]", "cm", 177.8),
    (1.0, "[ft_i]", "m", 0.3048),
    (2.0, "[oz_av]", "g", 56.69904625),
    (88.0, "{beats}/min", "/min", 88.0),
    (18.0, "{breaths}/min", "/min", 18.0),
    (90.0, "mL/min/{1.73_m2}", "mL/min", 90.0),
    (1.5, "ug/L", "ng/mL", 1.5),
    (1.5, "ng/mL", "pg/mL", 1500.0),
    (450.0, "ng/L", "pg/mL", 450.0),
    (60.0, "U/L", "ukat/L", 1.0),
    (3.0, "mg/dl", "mg/L", 30.0),  # l is the liter as much as L is
    (1.0, "L", "l", 1.0),
    (2.5, "dL", "mL", 250.0),
    (1.0, "mo", "d", 30.4375),  # the mean Julian month
    (1.0, "a", "d", 365.25),
    (1.0, "wk", "h", 168.0),
    (90.0, "min", "h", 1.5),
    (1.0, "[gal_us]", "L", 3.785411784),
    (1.0, "eq/L", "mmol/L", 1000.0),
    (1.0, "osm/kg", "mosm/kg", 1000.0),
    (1.0, "g%", "g/dL", 1.0),
    (1.0, "[IU]/L", "m[iU]/mL", 1.0),
    (1.0, "[ppm]", "%", 0.0001),
    (93.0, "%", "1", 0.93),
    (1.0, "mol", "10*23", 6.0221367),
    (1.0, "cal", "J", 4.184),
    (1.0, "[degRe]", "Cel", 1.25),
    (1.0, "mCel", "Cel", 0.001),
    (1.0, "Cel{oral}", "K", 274.15),
    (1.0, "Cel", "[degR]", 493.47),
    (1.0, "daL", "L", 10.0),
    (1.0, "KiBy", "bit", 8192.0),
    (1.0, "kg/m2", "g/cm2", 0.1),
    (100.0, "mg/kg/d", "mg/kg/wk", 700.0),  # left to right: mg/(kg.d)
    (1.0, "/min/h", "/s2", 1.0 / 216000.0),  # a leading "/" divides 1 by all that follows
    (1.0, "1000/L", "/mL", 1.0),
    (2.0, "m2", "cm2", 20000.0),
    (1.0, "s-1", "Hz", 1.0),
    (1.0, "(kg.m)/(s2)", "N", 1.0),
    (1.0, "10*-3.g", "mg", 1.0),
]


@pytest.mark.parametrize(("value", "source", "target", "expected"), EXACT)
def test_exact_conversions(value: float, source: str, target: str, expected: float) -> None:
    assert convert(value, source, target) == expected


@pytest.mark.parametrize(
    ("value", "source", "target", "expected"),
    [
        (16.0, "kPa", "mm[Hg]", 16_000 / 133.322),
        (120.0, "mm[Hg]", "kPa", 120 * 133.322 / 1000),
        (10.0, "cm[H2O]", "mm[Hg]", 10 * 98.0665 / 133.322),
        (1.0, "atm", "mm[Hg]", 101_325 / 133.322),
        (1.0, "[psi]", "kPa", 0.45359237 * 9.80665 / 0.0254**2 / 1000),
        (310.15, "K", "Cel", 37.0),
        (100.0, "[degF]", "Cel", 37.77777777777778),
        (1.0, "[in_i'Hg]", "kPa", 133.322 * 0.0254),
        (5.0, "mmol/L", "/uL", 5e-3 * 6.0221367e23 / 1e6),
        (1.0, "[MET]", "mL/min/kg", 3.5),
        (1.0, "deg", "rad", 3.141592653589793 / 180),
    ],
)
def test_conversions_through_definitions(value: float, source: str, target: str, expected: float) -> None:
    assert convert(value, source, target) == pytest.approx(expected, rel=1e-12)


def test_parse_gives_the_magnitude_and_dimension_in_base_units() -> None:
    assert BASE_UNITS == ("m", "s", "g", "rad", "K", "C", "cd")
    crp = parse("mg/dL")
    assert (crp.factor, crp.dimension, crp.kind) == (Fraction(10), (-3, 0, 1, 0, 0, 0, 0), "mass/volume")
    assert parse("mm[Hg]").factor == Fraction("133.322") * 1000  # g.m-1.s-2: the base unit of mass is the gram
    assert parse("mm[Hg]").kind == "pressure"
    assert parse("10*3/uL").dimension == (-3, 0, 0, 0, 0, 0, 0) and parse("10*3/uL").kind == "number/volume"
    assert parse("/min").kind == "number/time"
    assert parse("%").kind == "dimensionless" and parse("%").factor == Fraction(1, 100)
    temperature = parse("[degF]")
    assert temperature.is_special and temperature.special == "[degF]" and temperature.kind == "temperature"
    assert (temperature.factor, temperature.zero) == (Fraction(5, 9), Fraction("459.67") * Fraction(5, 9))
    assert not parse("K").is_special and parse("K").zero == 0
    assert parse("[iU]/L").is_arbitrary and parse("[iU]/L").kind == "[iU]/volume"
    assert parse("{score}").factor == 1 and parse("{score}").dimension == (0,) * 7


def test_prefixes_apply_to_metric_atoms_only() -> None:
    assert parse("ug").factor == Fraction(1, 10**6)
    assert parse("Mg").factor == 10**6 and parse("dag").factor == 10
    assert parse("mmol").factor == Fraction("6.0221367e20")
    with pytest.raises(UcumError, match=r"\[lb_av\] \(pound\) is not metric and takes no prefix"):
        parse("k[lb_av]")
    with pytest.raises(UcumError, match=r"min \(minute\) is not metric"):
        parse("mmin")
    with pytest.raises(UcumError, match=r"% \(percent\) is not metric"):
        parse("m%")


def test_ucum_is_case_sensitive() -> None:
    # "MG" is a megagauss, not a milligram: valid, and not a mass
    assert parse("MG").kind != parse("mg").kind
    assert not commensurable("MG", "mg")
    # "mL" and "ml" are both the milliliter: UCUM has both L and l
    assert convert(5.0, "ml", "mL") == 5.0
    with pytest.raises(UcumError, match=r'"MMOL/L" is not valid UCUM: "MMOL" at position 0 is not a UCUM unit'):
        parse("MMOL/L")
    with pytest.raises(UcumError, match=r'case-sensitive: "Cel"\?'):
        parse("CEL")


@pytest.mark.parametrize(
    ("unit", "message"),
    [
        ("", r"the unit is empty"),
        ("mg /dL", r"whitespace at position 2"),
        ("mg/dL ", r"whitespace at position 5"),
        ("µg/L", r'not printable ASCII \(UCUM writes micro as "u"\)'),
        ("mmHg", r'"mmHg" at position 0 is not a UCUM unit \(UCUM writes "mm\[Hg\]"\)'),
        ("beats/min", r'"beats" at position 0 is not a UCUM unit \(UCUM writes "\{beats\}"\)'),
        ("mg/", r"a unit is missing at the end"),
        ("mg//L", r'a unit is expected at position 3, not "/"'),
        (".mg", r'a unit is expected at position 0, not "."'),
        ("(mg/L", r'"\(" at position 0 is not closed'),
        ("mg/L)", r'unexpected "\)" at position 4'),
        ("(m)2", r'cannot follow "\)"'),
        ("mg{total", r'"\{" at position 2 is not closed'),
        ("{a{b}}", r'"\{" inside the annotation'),
        ("[degF", r'"\[" at position 0 is not closed'),
        ("2mg", r'unexpected "m" at position 1'),
        ("m-", r"the sign at position 1 is not followed by an exponent"),
        ("m100", r"exponent 100 at position 1 is beyond"),
        ("10*999/L", r"exponent 999"),
        ("x" * 129, r"longer than 128 characters"),
        ("((((((((((((((((((m))))))))))))))))))", r"nested deeper than 16"),
    ],
)
def test_invalid_syntax_is_refused_with_the_problem_and_where(unit: str, message: str) -> None:
    with pytest.raises(UcumError, match=message) as raised:
        parse(unit)
    assert str(raised.value).startswith(f'"{unit}"')


@pytest.mark.parametrize(
    ("source", "target", "kinds"),
    [
        ("mg/dL", "mmol/L", "mass/volume vs number/volume"),
        ("Cel", "mg/L", "temperature vs mass/volume"),
        ("%", "mg/L", "dimensionless vs mass/volume"),
        ("[iU]/L", "U/L", "[iU]/volume vs number/(volume.time)"),
        ("[arb'U]", "[iU]", "[arb'U] vs [iU]"),
        ("kPa", "mm", "pressure vs length"),
    ],
)
def test_incommensurable_units_are_refused(source: str, target: str, kinds: str) -> None:
    assert not commensurable(source, target)
    with pytest.raises(UcumError) as raised:
        convert(1.0, source, target)
    assert str(raised.value) == f'"{source}" and "{target}" are not commensurable ({kinds})'
    assert raised.value.problem == kinds


@pytest.mark.parametrize("unit", ["Cel/h", "[degF].m", "/Cel", "Cel2", "mg/Cel", "(Cel)/s"])
def test_special_units_are_refused_inside_compound_units(unit: str) -> None:
    with pytest.raises(UcumError, match=r"is a special unit with an offset; it converts only on its own"):
        parse(unit)


@pytest.mark.parametrize("unit", ["[pH]", "dB", "B[SPL]", "Np", "[p'diop]", "%[slope]", "bit_s"])
def test_non_ratio_special_units_are_refused(unit: str) -> None:
    with pytest.raises(UcumError, match=r"is a special non-ratio unit, which cannot be converted"):
        parse(unit)


def test_arbitrary_units_are_commensurable_only_with_themselves() -> None:
    assert commensurable("[IU]/L", "[iU]/mL"), "[IU] is defined as 1 [iU]"
    assert convert(250.0, "[IU]/L", "[iU]/mL") == 0.25
    assert not commensurable("[iU]", "1")
    assert not commensurable("[CFU]/mL", "/mL")


def test_values_that_are_not_finite_or_overflow_are_refused() -> None:
    with pytest.raises(UcumError, match="not a finite number"):
        convert(float("nan"), "mg/dL", "mg/L")
    with pytest.raises(UcumError, match="out of range"):
        convert(1e300, "10*99", "10*-99")
    with pytest.raises(UcumError, match="must be a string"):
        parse(None)  # type: ignore[arg-type]


def test_every_atom_definition_resolves() -> None:
    from service import ucum

    for atom in ucum._ATOM_LIST:
        if atom.kind == "non-ratio":
            continue
        unit = parse(atom.symbol)
        assert unit.factor > 0, atom.symbol
