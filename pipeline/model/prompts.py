"""Domain-aware contrastive state prompts (docs/algorithm.md §3).

Seven normal and seven abnormal state phrases, paired by meaning, placed in 22 templates per domain
phrase; three domain phrases per domain. Sentences are built template-major, as the official code
does, so the sentence order (and thus any cache key) is stable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

NORMAL_STATES: tuple[str, ...] = (
    "normal {}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}",
    "abnormal {}",
    "imperfect {}",
    "blemished {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

# `{art}` is "an" for phrases starting with a vowel sound ("industrial ..."), else "a"; `{}` is the state.
_TEMPLATES: tuple[str, ...] = (
    "a cropped {p} of the {}",
    "a cropped {p} of a {}",
    "a close-up {p} of a {}",
    "a close-up {p} of the {}",
    "a bright {p} of a {}",
    "a bright {p} of the {}",
    "a dark {p} of the {}",
    "a dark {p} of a {}",
    "a jpeg corrupted {p} of a {}",
    "a jpeg corrupted {p} of the {}",
    "a blurry {p} of the {}",
    "a blurry {p} of a {}",
    "{art} {p} of a {}",
    "{art} {p} of the {}",
    "{art} {p} of a small {}",
    "{art} {p} of the small {}",
    "{art} {p} of a large {}",
    "{art} {p} of the large {}",
    "{art} {p} of the {} for visual inspection",
    "{art} {p} of a {} for visual inspection",
    "{art} {p} of the {} for anomaly detection",
    "{art} {p} of a {} for anomaly detection",
)

DOMAIN_PHRASES: dict[str, tuple[str, ...]] = {
    "object": ("industrial photo", "industrial image", "manufacturing image"),
    "texture": ("industrial photo", "textural photo", "surface picture"),
}

Domain = Literal["object", "texture"]


def _article(phrase: str) -> str:
    return "an" if phrase.startswith("industrial") else "a"


def domain_templates(domain: Domain) -> list[str]:
    """The 66 templates of a domain; each keeps one `{}` for the state phrase."""
    if domain not in DOMAIN_PHRASES:
        raise ValueError(f"unknown domain {domain!r}; expected one of {sorted(DOMAIN_PHRASES)}")
    out = []
    for phrase in DOMAIN_PHRASES[domain]:
        for t in _TEMPLATES:
            out.append(t.replace("{p}", phrase).replace("{art}", _article(phrase)))
    return out


def class_prompt_name(class_name: str) -> str:
    """The class name as the official code puts it in prompts: only macaroni1/2 are mapped."""
    return "macaroni" if class_name in ("macaroni1", "macaroni2") else class_name


@dataclass(frozen=True)
class PromptSet:
    """The sentences of one line: all normal ones, then all abnormal ones."""

    normal: tuple[str, ...]
    abnormal: tuple[str, ...]

    @property
    def hash(self) -> str:
        """Stable id of the exact sentences; part of every text-cache and adapter key."""
        blob = json.dumps([self.normal, self.abnormal], separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def build_prompt_set(
    class_name: str,
    domain: Domain = "object",
    extra_normal_states: tuple[str, ...] | list[str] = (),
    extra_abnormal_states: tuple[str, ...] | list[str] = (),
) -> PromptSet:
    """Sentences for a class: for each template, for each state (template-major, as the official loop)."""
    name = class_prompt_name(class_name)
    templates = domain_templates(domain)

    def sentences(states: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(t.format(s.format(name)) for t in templates for s in states)

    return PromptSet(
        normal=sentences(NORMAL_STATES + tuple(extra_normal_states)),
        abnormal=sentences(ABNORMAL_STATES + tuple(extra_abnormal_states)),
    )
