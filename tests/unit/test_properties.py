"""Property-based tests (Hypothesis) for the pure parts whose inputs are a space, not a few cases
(issue 14): envelope parsing, commit offsets, tiling and merging, threshold calibration, metrics.

Budgets are small (tens of examples, no deadline) so the file runs in seconds; raise them locally with
`--hypothesis-seed` / `HYPOTHESIS_PROFILE=thorough` when changing these modules.
"""

from __future__ import annotations

import math
import os
import string

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.evaluation.metrics import PixelAccumulator, f1_max, float_keys, image_metrics, keys_to_float
from pipeline.inspection.imaging import model_input_size
from pipeline.inspection.thresholds import LineThresholds
from pipeline.model import TileLayout
from pipeline.model.anoclip import AnoCLIP
from pipeline.settings import ThresholdSettings
from pipeline.streaming import envelope as env
from pipeline.streaming.envelope import EnvelopeError, FrameMeta
from pipeline.streaming.offsets import OffsetBook, PartitionOffsets

settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("mutation", max_examples=20, deadline=None,  # tests/mutation/mutate.py
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------------
# the envelope: any headers -> a valid FrameMeta or a named EnvelopeError, never another exception
# --------------------------------------------------------------------------------------------------
def _valid_value(name: str) -> st.SearchStrategy[bytes]:
    ok_id = st.text(string.ascii_letters + string.digits + "._:-", min_size=1, max_size=30)
    return {
        env.H_FRAME_ID: ok_id.filter(lambda s: ".." not in s),
        env.H_LINE_ID: ok_id,
        env.H_CAMERA_ID: ok_id,
        env.H_CAPTURE_TS: st.integers(10**18, 10**19).map(str),
        env.H_CONTENT_TYPE: st.sampled_from(["image/jpeg", "image/png", "IMAGE/PNG"]),
        env.H_SCHEMA: st.just(env.SCHEMA_VERSION),
    }[name].map(str.encode)


_junk = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b" x", b"x\n", b"\xff\xfe", "²³".encode(), "١٢٣٤٥٦٧٨٩٠١٢٣٤٥٦٧٨٩".encode(),
                     b"1" * 2000, b"0" * 19, b"9" * 20, b"1790000000000000000", b"-1790000000000000000",
                     "1790000000000000000\u00a0".encode(), "x\u200by".encode()]),
)


@st.composite
def _headers(draw: st.DrawFn) -> list[tuple[str, bytes | None]]:
    """Mostly-valid headers with some values replaced by junk, some dropped, duplicated or reordered."""
    out: list[tuple[str, bytes | None]] = []
    for name in env.REQUIRED_HEADERS:
        kind = draw(st.sampled_from(["valid", "valid", "valid", "junk", "missing", "twice"]))
        if kind == "missing":
            continue
        value = draw(_junk) if kind == "junk" else draw(_valid_value(name))
        out.append((name, value))
        if kind == "twice":
            out.append((name, draw(st.one_of(_valid_value(name), _junk))))
    extra = draw(st.lists(st.tuples(st.sampled_from([env.H_SYNTHETIC_DEFECT, "x-other", "error"]), _junk),
                          max_size=3))
    out += extra
    return draw(st.permutations(out))


def _check_meta(meta: FrameMeta) -> None:
    assert 1 <= len(meta.frame_id) <= env.MAX_ID_LEN and meta.frame_id.isascii()
    for text in (meta.frame_id, meta.line, meta.camera, meta.content_type, meta.schema):
        assert text and text == text.strip() and text.isprintable()
    assert 10**18 <= meta.capture_ts_ns <= 10**19 and isinstance(meta.capture_ts_ns, int)
    assert meta.schema in env.SUPPORTED_SCHEMAS and meta.content_type == meta.content_type.lower()


@given(_headers())
def test_parse_meta_gives_a_valid_frame_or_a_named_envelope_error(headers: list) -> None:
    try:
        meta = env.parse_meta(headers)
    except EnvelopeError as e:
        assert e.stage == env.STAGE_HEADERS and e.reason and str(e) == e.reason
        return
    _check_meta(meta)
    names = [k for k, _ in headers]
    assert all(names.count(h) == 1 for h in env.REQUIRED_HEADERS), "a duplicated required header is refused"


@given(st.lists(st.tuples(st.text(max_size=12), st.one_of(st.none(), st.binary(max_size=30))), max_size=10))
def test_parse_meta_on_arbitrary_header_lists(headers: list) -> None:
    try:
        _check_meta(env.parse_meta(headers))
    except EnvelopeError as e:
        assert e.stage == env.STAGE_HEADERS


@given(st.sampled_from(env.REQUIRED_HEADERS), st.binary(max_size=40))
def test_any_bytes_in_any_required_header(name: str, value: bytes) -> None:
    hs = dict(env.build_headers("f-1", "bottle", "cam-1", 1_790_000_000_000_000_000, "image/png"))
    hs[name] = value
    try:
        _check_meta(env.parse_meta(list(hs.items())))
    except EnvelopeError as e:
        assert e.stage == env.STAGE_HEADERS


_DIGITLIKE = [chr(i) for i in range(0x3000) if chr(i).isdigit() or chr(i).isnumeric()]  # every script's digits
_numberish = st.text(st.sampled_from(_DIGITLIKE) | st.sampled_from("0123456789 +-_.e"), min_size=1, max_size=22)


@given(st.one_of(_numberish, st.text(max_size=22)))
def test_any_text_as_capture_ts_is_a_timestamp_or_refused(text: str) -> None:
    """Found by this test: '²' passed `str.isdigit` and then crashed `int()` with a ValueError (the worker's
    poll loop catches only EnvelopeError: a poison frame); other scripts' digits were read as nanoseconds."""
    hs = dict(env.build_headers("f-1", "bottle", "cam-1", 1_790_000_000_000_000_000, "image/png"))
    hs[env.H_CAPTURE_TS] = text.encode("utf-8", "surrogatepass")
    try:
        meta = env.parse_meta(list(hs.items()))
    except EnvelopeError as e:
        assert e.stage == env.STAGE_HEADERS
        return
    _check_meta(meta)
    assert text.isascii() and text.isdigit() and meta.capture_ts_ns == int(text)


@given(st.text(string.ascii_letters + string.digits + "._:-", min_size=1, max_size=200).filter(lambda s: ".." not in s),
       st.text(min_size=1, max_size=20).filter(lambda s: s == s.strip() and s.isprintable()),
       st.integers(10**18, 10**19), st.sampled_from(["image/jpeg", "image/png"]))
def test_what_build_headers_writes_parse_meta_reads_back(frame_id: str, line: str, ts: int, ctype: str) -> None:
    meta = env.parse_meta(env.build_headers(frame_id, line, "cam", ts, ctype))
    assert (meta.frame_id, meta.line, meta.capture_ts_ns, meta.content_type) == (frame_id, line, ts, ctype)


@given(st.lists(st.tuples(st.text(max_size=10), st.one_of(st.none(), st.binary(max_size=10))), max_size=6),
       st.text(max_size=50), st.sampled_from(["headers", "size", "decode", "line", "inspect"]),
       st.integers(0, 2**31), st.integers(0, 2**62))
def test_dlq_headers_are_bytes_and_carry_exactly_one_reason(original: list, reason: str, stage: str, part: int,
                                                            offset: int) -> None:
    hs = env.dlq_headers(original, reason, stage, "frames", part, offset)
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in hs)
    names = [k for k, _ in hs]
    for k in (env.H_ERROR, env.H_ERROR_STAGE, env.H_SOURCE_TOPIC, env.H_SOURCE_PARTITION, env.H_SOURCE_OFFSET):
        assert names.count(k) == 1
    d = dict(hs)
    assert int(d[env.H_SOURCE_OFFSET]) == offset and int(d[env.H_SOURCE_PARTITION]) == part


# --------------------------------------------------------------------------------------------------
# offsets: the commit point never passes an unfinished frame, whatever the completion order
# --------------------------------------------------------------------------------------------------
@given(st.data())
def test_commit_never_passes_an_unfinished_frame(data: st.DataObject) -> None:
    po = PartitionOffsets()
    start = data.draw(st.integers(0, 10**6), label="first offset")
    gaps = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=40), label="offset gaps")
    offsets = list(np.cumsum([start, *gaps[:-1]]))  # increasing, possibly with gaps (compacted topics)
    unfinished: set[int] = set()
    polled: list[int] = []
    last_committed = None
    todo = list(offsets)
    while todo or unfinished:
        actions = (["poll"] if todo else []) + (["finish", "finish_twice"] if unfinished else []) + ["commit"]
        action = data.draw(st.sampled_from(actions))
        if action == "poll":
            n = data.draw(st.integers(1, len(todo)))
            for off in todo[:n]:
                po.add(int(off))
                unfinished.add(int(off))
                polled.append(int(off))
            todo = todo[n:]
        elif action.startswith("finish"):
            off = data.draw(st.sampled_from(sorted(unfinished)))
            po.done(off)
            if action == "finish_twice":
                po.done(off)
            unfinished.discard(off)
        elif action == "commit":
            c = po.to_commit()
            if c is not None:
                assert all(off >= c for off in unfinished), f"commit {c} passes unfinished {sorted(unfinished)}"
                assert c <= max(polled) + 1
                assert last_committed is None or c > last_committed, "commits only move forward"
                po.mark_committed(c)
                last_committed = c
                if data.draw(st.booleans()):
                    po.mark_committed(c - 1)  # a late, older commit result never moves it back
                assert po.committed == c
        if unfinished:
            assert po.committable() == min(unfinished)
        assert len(po.pending) == len(unfinished)
    if polled:
        assert po.committable() == max(polled) + 1 == po.next_offset


@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["poll", "done", "rebalance"]), st.integers(0, 30)),
                max_size=60))
def test_offset_book_ignores_completions_from_an_older_assignment(ops: list[tuple[int, str, int]]) -> None:
    book = OffsetBook()
    model: dict[int, tuple[int, set[int], int | None]] = {}  # partition -> (epoch, pending, next)
    epochs_seen: dict[int, list[int]] = {}
    for part, op, off in ops:
        if op == "rebalance":
            book.forget([part])
            model.pop(part, None)
            continue
        po = book.track(part)
        epochs_seen.setdefault(part, [])
        if not epochs_seen[part] or epochs_seen[part][-1] != po.epoch:
            assert po.epoch not in epochs_seen[part], "a re-assignment gets a fresh epoch"
            epochs_seen[part].append(po.epoch)
        epoch, pending, nxt = model.get(part, (po.epoch, set(), None))
        if op == "poll":
            po.add(off)
            pending = pending | {off}
            nxt = off + 1 if nxt is None else max(nxt, off + 1)
        else:
            off = sorted(pending)[off % len(pending)] if pending else off  # mostly a frame still in flight
            stale = epochs_seen[part][0] if len(epochs_seen[part]) > 1 else po.epoch - 1
            book.done(part, stale, off)  # from an older assignment: ignored
            assert book.partitions[part].pending == pending
            book.done(part, po.epoch, off)
            pending = pending - {off}
        model[part] = (po.epoch, pending, nxt)
        expect = (min(pending) if pending else nxt) if nxt is not None else None
        assert book.partitions[part].committable() == expect
    assert book.in_flight() == sum(len(p) for _, p, _ in model.values())


# --------------------------------------------------------------------------------------------------
# tiling and merging: any H x W
# --------------------------------------------------------------------------------------------------
def _reference_merge(tiles: np.ndarray, starts: list[int], h: int, w: int) -> np.ndarray:
    """Per pixel, the mean of the tiles covering it (independent of `merge_tiles`' slicing)."""
    size = tiles.shape[-1]
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            along = y if h > w else x
            vals = [t[y - s, x] if h > w else t[y, x - s] for t, s in zip(tiles, starts, strict=True)
                    if s <= along < s + size]
            out[y, x] = np.mean(vals)
    return out


_frames = st.tuples(st.integers(2, 12), st.integers(0, 60), st.booleans()).map(
    lambda t: (t[0], t[0] + t[1], t[2]))  # (short side = tile size, long side, portrait)


@given(_frames)
def test_tile_layout_for_any_frame(frame: tuple[int, int, bool]) -> None:
    size, long, portrait = frame
    h, w = (long, size) if portrait else (size, long)
    lay = TileLayout(h, w, size)
    starts = lay.starts
    assert len(starts) == math.ceil(long / size), "the fewest tiles that cover the long side"
    assert starts[0] == 0 and starts[-1] == long - size
    gaps = np.diff(starts)
    assert (gaps > 0).all() and (gaps <= size).all(), "in order, no gap between tiles"
    assert gaps.size == 0 or gaps.max() - gaps.min() <= 1, "evenly spread"
    assert lay.axis == (2 if portrait and long > size else 3)


@given(_frames, st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_merge_tiles_for_any_frame_equals_the_per_pixel_mean(frame: tuple[int, int, bool], b: int, seed: int) -> None:
    size, long, portrait = frame
    h, w = (long, size) if portrait else (size, long)
    lay = TileLayout(h, w, size)
    n = len(lay.starts)
    tiles = np.random.default_rng(seed).random((b * n, size, size))
    merged = AnoCLIP.merge_tiles(None, torch.from_numpy(tiles), lay).numpy()  # type: ignore[arg-type]
    assert merged.shape == (b, h, w)
    for i in range(b):
        np.testing.assert_allclose(merged[i], _reference_merge(tiles[i * n : (i + 1) * n], lay.starts, h, w),
                                   rtol=0, atol=1e-12)
    const = AnoCLIP.merge_tiles(None, torch.full((b * n, size, size), 0.3, dtype=torch.float64), lay)  # type: ignore[arg-type]
    assert torch.allclose(const, torch.tensor(0.3, dtype=torch.float64))


@given(st.integers(1, 5000), st.integers(1, 5000), st.sampled_from([8, 64, 240]), st.sampled_from(["tile", "squash"]))
@example(16, 17, 8, "tile")  # 8 x 8.5 rounds to a square input: found by the mutation run's own draws
def test_model_input_size_keeps_the_short_side_at_the_model_size(h: int, w: int, size: int, resize: str) -> None:
    mh, mw = model_input_size(h, w, size, resize)
    if resize == "squash" or h == w:
        assert (mh, mw) == (size, size)
        return
    assert min(mh, mw) == size and max(mh, mw) >= size
    # the image's short side becomes the model size (a near-square frame may round to a square input, never flip)
    assert (mh if h < w else mw) == size, "orientation kept"
    long, short = max(h, w), min(h, w)
    assert abs(max(mh, mw) - long * size / short) <= 0.5 or max(mh, mw) == size, "aspect kept to the pixel"


# --------------------------------------------------------------------------------------------------
# threshold calibration
# --------------------------------------------------------------------------------------------------
@given(st.integers(1, 25), st.floats(0.01, 0.99), st.floats(0.01, 0.99), st.integers(0, 2**32 - 1),
       st.integers(1, 12))
def test_calibration_is_the_quantile_of_the_warmup_frames(n: int, q: float, pq: float, seed: int, side: int) -> None:
    rng = np.random.default_rng(seed)
    th = LineThresholds(ThresholdSettings(warmup_frames=n, quantile=q, pixel_quantile=pq))
    assert (th.image, th.pixel, th.source) == (0.5, th.cfg.default_pixel, "default") and th.calibrating
    scores = rng.random(n)
    maps = [rng.random((side, side)).astype(np.float32) for _ in range(n)]  # <= 1024 px: every pixel kept
    done = [th.observe(float(s), m) for s, m in zip(scores, maps, strict=True)]
    assert done == [False] * (n - 1) + [True], "calibrated exactly on the last warm-up frame"
    pixels = np.concatenate([m.ravel() for m in maps])
    assert th.source == "calibrated" and not th.calibrating and th.calibration.frames == n
    assert th.image == pytest.approx(np.quantile(scores, q), abs=1e-12)
    assert th.pixel == pytest.approx(float(np.quantile(pixels, pq)), abs=1e-6)
    assert th.calibration.pixel_median == pytest.approx(float(np.median(pixels)), abs=1e-6)
    assert not th.observe(0.99, maps[0]) and th.calibration.frames == n, "calibrated once"
    lo, hi = th.heatmap_range()
    assert lo < hi and hi - th.pixel == pytest.approx(th.pixel - lo)
    again = LineThresholds(ThresholdSettings(warmup_frames=n, quantile=q, pixel_quantile=pq))
    again.restore({k: str(v) for k, v in th.to_dict().items()})  # what Redis hands back: strings
    assert (again.image, again.pixel, again.source) == (th.image, th.pixel, "calibrated")


@given(st.one_of(st.none(), st.floats(0, 1)), st.one_of(st.none(), st.floats(0, 1)),
       st.one_of(st.none(), st.floats(0, 1)), st.booleans())
def test_threshold_precedence(manual: float | None, config: float | None, calibrated: float | None,
                              warm: bool) -> None:
    th = LineThresholds(ThresholdSettings(image=config, warmup_frames=1))
    if calibrated is not None:
        th.restore({"calibrated_image": calibrated, "calibrated_pixel": 0.5})
    th.set_override(image=manual)
    expected = next(v for v in (manual, config, calibrated, 0.5) if v is not None)
    assert th.image == expected
    source = "manual" if manual is not None else "config" if config is not None else (
        "calibrated" if calibrated is not None else "default")
    assert th.source == source


# --------------------------------------------------------------------------------------------------
# metrics against scikit-learn
# --------------------------------------------------------------------------------------------------
@given(st.integers(2, 60), st.integers(0, 2**32 - 1), st.sampled_from([None, 1, 2]))
def test_image_metrics_equal_sklearn(n: int, seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < rng.uniform(0.1, 0.9)
    s = rng.random(n) + 0.3 * y
    if decimals is not None:
        s = np.round(s, decimals)  # ties
    m = image_metrics(y.astype(int), s)
    if y.all() or not y.any():
        assert math.isnan(m.auroc) and math.isnan(m.ap)
        return
    assert m.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m.ap == pytest.approx(average_precision_score(y, s), abs=1e-12)
    brute = max(2 * (y & (s >= t)).sum() / (y.sum() + (s >= t).sum()) for t in np.unique(s))
    assert f1_max(y, s) == pytest.approx(brute, abs=1e-12)
    assert m.n_images == n and m.n_anomalous == int(y.sum())


@given(st.integers(1, 5), st.integers(2, 12), st.integers(0, 2**32 - 1), st.sampled_from([None, 1, 2]),
       st.sampled_from([10**9, 37]))
def test_pixel_metrics_equal_sklearn(n: int, side: int, seed: int, decimals: int | None, budget: int) -> None:
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for _ in range(n):
        mask = rng.random((side, side)) < rng.uniform(0, 0.5)
        amap = (rng.random((side, side)) + 0.4 * mask).astype(np.float32)
        maps.append(np.round(amap, decimals).astype(np.float32) if decimals is not None else amap)
        masks.append(mask)
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    assume(0 < y.sum() < y.size)
    with PixelAccumulator(memory_budget=budget) as acc:  # a budget of 37 scores spills to disk
        for amap, mask in zip(maps, masks, strict=True):
            acc.add(amap, mask)
        r = acc.result()
        assert acc.spilled == (budget < y.size)
    assert r.auroc == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert r.ap == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert r.f1_max == pytest.approx(f1_max(y, s), abs=1e-9)
    assert (r.n_pixels_anomalous, r.n_pixels_normal) == (int(y.sum()), int((~y).sum()))


@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=50))
def test_float_keys_preserve_order_and_round_trip(values: list[float]) -> None:
    v = np.array(values, dtype=np.float32)
    k = float_keys(v)
    order = np.argsort(v, kind="stable")
    assert (np.diff(k[order].astype(np.int64)) >= 0).all()
    assert np.array_equal(keys_to_float(k), v + np.float32(0.0))
