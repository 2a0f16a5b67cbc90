"""Prompt construction: exact counts and exact sentences (docs/algorithm.md §3)."""

from __future__ import annotations

import pytest

from pipeline.model.prompts import ABNORMAL_STATES, NORMAL_STATES, build_prompt_set, domain_templates


@pytest.mark.parametrize("domain", ["object", "texture"])
def test_counts(domain: str) -> None:
    assert len(domain_templates(domain)) == 66
    ps = build_prompt_set("bottle", domain)
    assert len(ps.normal) == len(ps.abnormal) == 462
    assert len(set(ps.normal)) == 462


def test_exact_object_sentences_template_major() -> None:
    ps = build_prompt_set("metal_nut", "object")
    assert ps.normal[:8] == (
        "a cropped industrial photo of the normal metal_nut",
        "a cropped industrial photo of the flawless metal_nut",
        "a cropped industrial photo of the perfect metal_nut",
        "a cropped industrial photo of the unblemished metal_nut",
        "a cropped industrial photo of the metal_nut without flaw",
        "a cropped industrial photo of the metal_nut without defect",
        "a cropped industrial photo of the metal_nut without damage",
        "a cropped industrial photo of a normal metal_nut",
    )
    # template 13 ("ART P of a {}") with the article "an" for industrial phrases, "a" for the others
    assert ps.abnormal[12 * 7] == "an industrial photo of a damaged metal_nut"
    assert ps.abnormal[22 * 7 + 12 * 7] == "an industrial image of a damaged metal_nut"
    assert ps.abnormal[44 * 7 + 12 * 7 + 6] == "a manufacturing image of a metal_nut with damage"
    assert ps.normal[-1] == "a manufacturing image of a metal_nut without damage for anomaly detection"
    assert not any(s.endswith(".") for s in ps.normal + ps.abnormal)


def test_texture_domain_and_macaroni() -> None:
    ps = build_prompt_set("wood", "texture")
    assert ps.normal[22 * 7] == "a cropped textural photo of the normal wood"
    assert ps.normal[44 * 7 + 12 * 7] == "a surface picture of a normal wood"
    assert build_prompt_set("macaroni2").normal[0] == "a cropped industrial photo of the normal macaroni"
    assert build_prompt_set("pcb1").normal[0].endswith("normal pcb1")


def test_extra_states_and_hash() -> None:
    base = build_prompt_set("bottle")
    extra = build_prompt_set("bottle", extra_abnormal_states=["cracked {}"])
    assert len(extra.abnormal) == 66 * (len(ABNORMAL_STATES) + 1)
    assert len(extra.normal) == 66 * len(NORMAL_STATES)
    assert "a cropped industrial photo of the cracked bottle" in extra.abnormal
    assert base.hash != extra.hash and base.hash == build_prompt_set("bottle").hash
