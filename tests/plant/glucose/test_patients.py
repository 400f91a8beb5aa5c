import pytest

from twinloop.plant.errors import UnknownPatientError
from twinloop.plant.glucose.patients import cohort, get_patient, patient_names, resolve_patients


def test_thirty_patients_in_three_cohorts():
    names = patient_names()
    assert len(names) == 30
    assert names[0] == "adolescent#001" and names[-1] == "child#010"
    assert [len(cohort(c)) for c in ("adolescents", "adults", "children", "all")] == [
        10,
        10,
        10,
        30,
    ]
    assert {p.cohort for p in cohort("adults")} == {"adults"}


def test_parameters_are_typed_and_carry_the_clinical_profile():
    p = get_patient("adult#001")
    assert p.body_weight_kg == pytest.approx(102.32)
    assert p.carb_ratio_g_per_u == 10
    assert len(p.x0) == 13
    # basal u2ss·BW/6000 U/min (the reference's basal column for adult#001)
    assert p.basal_u_per_min == pytest.approx(0.021122675, rel=1e-8)
    assert p.initial_bg_mg_dl == pytest.approx(138.56, abs=1e-6)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UnknownPatientError, match="adult#001") as info:
        get_patient("adult#11")
    assert "adult#11" in str(info.value)
    with pytest.raises(UnknownPatientError, match="adolescents, adults, children, all"):
        cohort("elderly")


def test_resolve_keeps_order_without_repeats():
    got = resolve_patients(["adult#002", "child#001"], ["children"])
    assert len(got) == 11  # child#001 appears once
    assert [p.name for p in got][:2] == ["child#001", "child#002"]
    assert got[-1].name == "adult#002"
