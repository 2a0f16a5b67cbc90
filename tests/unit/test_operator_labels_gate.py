"""Operator labels in the adaptation gate (issue 11 item 2, issue 12 item 1), the pure parts: which labels the
worker reads and how often it decodes them (`operator_frames`, fake store), how `BufferedTTA` hands them to
the gate without duplicates, and that a false alarm counts as normal pixels, so a candidate that raises it is
refused. The same path on a real Redis: tests/integration/test_labels_gate.py."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.adaptation.tta.buffered import BufferedTTA, positive_counts
from pipeline.adaptation.tta.service import operator_frames
from pipeline.inspection.render import encode_png, mask_png
from pipeline.model.tta_gate import GateFrame, validate_adapter
from pipeline.model.tta_train import TokenSet
from pipeline.operators.labels import CONFIRMED, FALSE_ALARM, UNSURE, AlertLabel
from pipeline.settings import TTASettings
from tests.unit.test_tta import C, Line, P

pytestmark = pytest.mark.usefixtures("one_torch_thread")

W, H = 80, 60


class FakeStore:
    """`LabelStore.newest` / `blob` over a list, counting blob reads."""

    def __init__(self) -> None:
        self.labels: dict[str, AlertLabel] = {}
        self.blobs: dict[tuple[str, str], bytes] = {}
        self.reads: list[tuple[str, str]] = []

    def add(self, fid: str, ts: int, label: str, *, image: bytes | None = None, mask: bytes | None = None,
            endorsed: bool = False) -> None:
        self.labels[fid] = AlertLabel(fid, "bottle", alert_ts_ms=ts, label=label, labelled_ms=ts + 1,
                                      mask_is_defect=endorsed, has_image=image is not None,
                                      has_mask=mask is not None)
        for kind, data in (("image", image), ("mask", mask)):
            if data is not None:
                self.blobs[(fid, kind)] = data

    def newest(self, line: str, label: str, *, limit: int,
               where: Callable[[AlertLabel], bool] | None = None) -> list[AlertLabel]:
        labs = sorted(self.labels.values(), key=lambda x: -x.alert_ts_ms)
        return [x for x in labs if x.line == line and x.label == label and (where is None or where(x))][:limit]

    def blob(self, frame_id: str, kind: str) -> bytes | None:
        self.reads.append((frame_id, kind))
        return self.blobs.get((frame_id, kind))


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8)


def _mask() -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[10:30, 20:60] = True
    return m


def _to_input(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR))


def test_the_newest_usable_labels_are_decoded_once_and_follow_relabels() -> None:
    store = FakeStore()
    for i in (1, 2, 3):
        store.add(f"c{i}", i, CONFIRMED, image=encode_png(_image(i)), mask=mask_png(_mask()), endorsed=True)
    store.add("c4", 4, CONFIRMED, image=encode_png(_image(4)), mask=mask_png(_mask()))  # outline not endorsed
    store.add("fa6", 6, FALSE_ALARM, image=encode_png(_image(6)))
    store.add("fa7", 7, FALSE_ALARM, image=encode_png(_image(7)))
    store.add("fa8", 8, FALSE_ALARM)  # its image had expired before it was labelled
    store.add("u9", 9, UNSURE, image=encode_png(_image(9)))
    cache: dict = {}

    got = operator_frames(store, "bottle", 2, cache, _to_input)
    assert [fid for fid, _, _ in got] == ["c2", "c3", "fa6", "fa7"]  # newest 2 of each, oldest first
    fid, image, mask = got[0]
    assert image.shape == (32, 32, 3) and mask is not None and mask.shape == (32, 32) and mask.dtype == bool
    assert mask[6:15, 9:23].all() and not mask[18:].any() and not mask[:, :7].any()  # scaled with the image
    assert got[2][2] is None and got[3][2] is None  # false alarms: no defect anywhere
    reads = len(store.reads)
    assert reads == 6  # 2 images + 2 masks + 2 images

    again = operator_frames(store, "bottle", 2, cache, _to_input)
    assert [f for f, _, _ in again] == ["c2", "c3", "fa6", "fa7"] and len(store.reads) == reads  # all cached
    assert all(a[1] is b[1] for a, b in zip(got, again, strict=True))

    store.add("c3", 3, FALSE_ALARM, image=encode_png(_image(3)))  # relabelled: no longer a defect
    store.labels["c3"].labelled_ms = 99
    store.add("c11", 11, CONFIRMED, image=encode_png(_image(11)), mask=mask_png(_mask()), endorsed=True)
    third = operator_frames(store, "bottle", 3, cache, _to_input)
    assert [(f, m is None) for f, _, m in third] == [("c1", False), ("c2", False), ("c3", True), ("fa6", True),
                                                     ("fa7", True), ("c11", False)]
    assert len(store.reads) == reads + 5  # c1 and c11 (image, mask), c3 again as a false alarm (image)
    assert len(cache) == 6
    assert [f for f, _, _ in operator_frames(store, "bottle", 1, cache, _to_input)] == ["fa7", "c11"]
    assert len(cache) == 2  # what left the newest is forgotten

    assert operator_frames(store, "bottle", 0, cache, _to_input) == [] and cache == {}


def test_an_unusable_label_is_left_out_without_failing_the_refresh_and_not_read_again() -> None:
    store = FakeStore()
    store.add("junk", 1, CONFIRMED, image=b"not an image", mask=mask_png(_mask()), endorsed=True)
    store.add("empty", 2, CONFIRMED, image=encode_png(_image(2)), mask=mask_png(np.zeros((H, W), bool)),
              endorsed=True)
    store.add("ok", 3, FALSE_ALARM, image=encode_png(_image(3)))
    cache: dict = {}
    assert [f for f, _, _ in operator_frames(store, "bottle", 5, cache)] == ["ok"]
    reads = len(store.reads)
    assert [f for f, _, _ in operator_frames(store, "bottle", 5, cache)] == ["ok"] and len(store.reads) == reads


def _fake_tta() -> BufferedTTA:
    line = Line(seed=1)

    def score(images: list[np.ndarray]) -> list[SimpleNamespace]:
        return [SimpleNamespace(tokens=torch.zeros(1), input_hw=im.shape[:2]) for im in images]

    return BufferedTTA("bottle", line.text, "text", TTASettings(), score_fn=score)  # type: ignore[arg-type]


def test_operator_frames_join_the_gate_once_per_refresh_and_false_alarms_are_all_normal() -> None:
    tta = _fake_tta()
    img, mask = _image(0), _mask()
    tta.set_operator_frames([("c1", img, mask), ("fa1", _image(1), None)])
    first = tta.make_positives([], {})
    assert positive_counts(first) == {"synthetic": 0, "operator": 1, "false_alarm": 1}
    assert first[0].source == "operator" and torch.equal(first[0].mask, torch.from_numpy(mask))
    assert first[1].source == "false_alarm" and not first[1].mask.any() and first[1].input_hw == (H, W)
    tta.set_operator_frames([("c1", img, mask), ("fa1", _image(1), None)])  # the next refresh: the same labels
    assert positive_counts(tta.make_positives([], {})) == {"synthetic": 0, "operator": 1, "false_alarm": 1}
    tta.add_known_normal(_image(2))  # by hand (replay, evaluation): kept alongside
    assert positive_counts(tta.make_positives([], {})) == {"synthetic": 0, "operator": 1, "false_alarm": 2}
    tta.set_operator_frames([])
    assert positive_counts(tta.make_positives([], {})) == {"synthetic": 0, "operator": 0, "false_alarm": 1}
    with pytest.raises(ValueError, match="non-empty"):
        tta.set_operator_frames([("c2", img, np.zeros((H, W), bool))])
    with pytest.raises(ValueError, match="HxWx3"):
        tta.add_known_normal(np.zeros((H, W), np.uint8))


def test_a_candidate_that_raises_a_false_alarm_is_refused_against_the_serving_version() -> None:
    line = Line(seed=7)
    g = torch.Generator().manual_seed(3)
    # a benign pattern (a label, a reflection) orthogonal to the text and the line's mean: the false alarm
    basis = torch.stack([line.text.class_embeddings[0], line.text.class_embeddings[1], line.mean])
    b = torch.randn(C, generator=g)
    q, _ = torch.linalg.qr(basis.T)
    b = F.normalize(b - q @ (q.T @ b), dim=-1)
    fa_tokens = line.frame()
    fa_tokens[20:44] += 3 * b
    side = int(P**0.5)
    false_alarm = GateFrame(fa_tokens, torch.zeros(side, side, dtype=torch.bool), "false_alarm")
    defect = F.normalize(line.defect, dim=-1)

    def raises_the_false_alarm(x: torch.Tensor) -> torch.Tensor:  # identical wherever the pattern is absent
        return x + 4 * (x @ b - 1.5).clamp(min=0)[..., None] * defect

    val = TokenSet.from_frames(line.frames(10))
    positives = line.positives(4)
    without = validate_adapter(raises_the_false_alarm, val, line.text, positives=positives)
    assert without.accepted, without.reasons  # the defects alone cannot tell it from the serving version
    with_fa = validate_adapter(raises_the_false_alarm, val, line.text, positives=[*positives, false_alarm])
    assert not with_fa.accepted
    assert with_fa.figures["pixel_auroc_candidate"] < with_fa.figures["pixel_auroc_serving"] - 0.02
    assert any("pixel AUROC" in r for r in with_fa.reasons), with_fa.reasons
    same = validate_adapter(lambda x: x, val, line.text, positives=[*positives, false_alarm])
    assert same.accepted, same.reasons  # a false alarm alone refuses nothing that leaves it as it was
