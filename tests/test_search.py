"""Architecture search: StageNet and PixelLongformer, spaces, the latency table, the search."""

import json

import numpy as np
import pytest
import torch

import archopt
from archopt.measure import count_macs, count_params
from archopt.models.stagenet import LAYOUTS
from archopt.search import LatencyPredictor, LatencyTable, check_predictions, get_space
from archopt.search.predictor import kernel_calls
from archopt.search.space import SearchSpace
from archopt.search.spaces import SPACES

# A space small enough to train a handful of candidates in seconds: three narrow stages at
# 32x32 (the network's total stride), one hand-designed model beside it.
TINY = {
    "name": "tiny",
    "model": "stagenet",
    "resolution": [32],
    "fixed": {"act": "relu6"},
    "stem_channels": 8,
    "stages": [
        {"block": ["ds", "ir", "conv"], "channels": 16, "width": [0.5, 1.0], "stride": 2},
        {
            "block": ["ds", "ir"],
            "channels": 32,
            "width": [0.5, 1.0],
            "stride": 2,
            "expand_ratio": [2, 4],
        },
        {"block": "ds", "channels": 32, "depth": [1, 2], "stride": 2, "kernel_size": [3, 5]},
        {"block": "ds", "channels": 32, "stride": 2},
    ],
    "recipe": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.05},
    "hand_designed": [
        {
            "label": "MobileNet v1 0.25-32",
            "model": "mobilenet_v1_100",
            "overrides": {"width_mult": 0.25},
            "resolution": 32,
        },
    ],
}
FAST = dict(train_size=48, repeats=2, calibration_size=2, progress=False, verbose=False)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """One latency table for this module, in a temporary cache folder."""
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# ------------------------------------------------------------------------------- the models


def test_stagenet_default_is_mobilenet_v1_and_layouts_are_mobilevit():
    ours, ref = archopt.create_model("stagenet"), archopt.create_model("mobilenet_v1_100")
    assert count_params(ours) == count_params(ref) == 4_231_976
    assert count_macs(ours, (1, 3, 224, 224)) == 568_740_352
    for name, params in (
        ("mobilevit_xxs", 1_272_024),
        ("mobilevit_xs", 2_317_848),
        ("mobilevit_s", 5_578_632),
    ):
        ours, ref = archopt.create_model("stagenet", **LAYOUTS[name]), archopt.create_model(name)
        assert count_params(ours) == count_params(ref) == params
        assert count_macs(ours, (1, 3, 64, 64)) == count_macs(ref, (1, 3, 64, 64))


def test_stagenet_blocks_and_bad_stages():
    stages = [
        {"block": "conv", "channels": 8, "stride": 2, "kernel_size": 5},
        {"block": "ir", "channels": 16, "depth": 2, "stride": 2, "expand_ratio": 3},
        {"block": "mvit", "channels": 16, "depth": 1, "stride": 2, "dim": 32},
    ]
    model = archopt.create_model("stagenet", stages=stages, num_features=24, num_classes=5)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    with pytest.raises(ValueError, match="input resolution must be at least 16x16"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"stage block must be one of .* got 'dense'"):
        archopt.create_model("stagenet", stages=[{"block": "dense", "channels": 8}])
    with pytest.raises(ValueError, match="kernel_size must be an odd positive int, got 4"):
        archopt.create_model("stagenet", stages=[{"block": "ds", "channels": 8, "kernel_size": 4}])
    with pytest.raises(ValueError, match=r"unknown Stage field\(s\) \['width'\]"):
        archopt.create_model("stagenet", stages=[{"block": "ds", "channels": 8, "width": 1}])


def test_pixel_longformer_backends_agree_and_globals_matter():
    torch.manual_seed(0)
    kw = dict(
        img_size=8,
        in_chans=1,
        num_classes=10,
        hidden_size=32,
        window=2,
        dilation=[1, 2, 4, 1],
        num_global=2,
    )
    blocked = archopt.create_model("pixel_longformer", **kw, backend="blocked").eval()
    reference = archopt.create_model("pixel_longformer", **kw, backend="reference").eval()
    reference.load_state_dict(blocked.state_dict())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(blocked(x), reference(x), rtol=1e-5, atol=1e-5)
    # Without global tokens (and with a window of 1) the first output row sees 2 of 64 pixels.
    local = archopt.create_model("pixel_longformer", **{**kw, "num_global": 0, "window": 1})
    assert local(x).shape == (3, 10)
    with pytest.raises(ValueError, match=r"dilation must be an int or one int per head \(4\)"):
        archopt.create_model("pixel_longformer", dilation=[1, 2])
    with pytest.raises(ValueError, match="expected 8x8 images"):
        blocked(torch.randn(1, 1, 16, 16))


# ------------------------------------------------------------------------------- the spaces


def test_builtin_spaces_are_valid_and_decode_to_registry_models():
    assert {"mobilenet", "mobilevit", "attention"} <= set(SPACES)
    rng = np.random.default_rng(0)
    for space in SPACES.values():
        space.validate()
        assert space.size > 1000 and space.hand_designed
        for _ in range(3):
            cand = space.decode(space.sample(rng))
            with torch.device("meta"):
                model = cand.build(10, 3)
            assert isinstance(model, torch.nn.Module)
    # The attention space searches one dilation per head, the window and the global tokens.
    names = [g.name for g in SPACES["attention"].genes()]
    assert {"window", "num_global", "dilation.h0", "dilation.h3"} <= set(names)


def test_canonical_genomes_and_json_round_trip(tmp_path):
    space = get_space(TINY)
    genes = space.genes()
    expand = next(i for i, g in enumerate(genes) if g.name == "stage2.expand_ratio")
    block = next(i for i, g in enumerate(genes) if g.name == "stage2.block")
    x = [0] * len(genes)
    x[expand] = 1  # a depthwise separable stage has no expansion: the gene is dropped
    assert space.canonical(x)[expand] == 0
    x[block] = 1  # an inverted residual has one: kept
    assert space.canonical(x)[expand] == 1
    assert space.decode(x).overrides["stages"][1] == {
        "block": "ir",
        "channels": 16,
        "depth": 1,
        "stride": 2,
        "kernel_size": 3,
        "expand_ratio": 4,
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(space.as_dict()))
    again = get_space(str(path))
    assert again.as_dict() == space.as_dict() and again.size == space.size == 3 * 2**6


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stages": []}, "a stagenet space needs 'stages'"),
        ({"resolution": [], "stages": TINY["stages"]}, r"resolution lists no choices"),
        (
            {"stages": [{"block": "ds", "channels": 16, "stride": 2}] * 4, "stem_channels": 8},
            "is empty: every field is fixed",
        ),
        ({"stages": [{"block": ["ds", "ds"], "channels": 16}]}, "stage 1 block repeats a choice"),
        (
            {"stages": [{"block": "ds", "channels": 16, "kernel_size": [3, 4]}]},
            "stage 1 kernel_size must be odd",
        ),
        (
            {"stages": [{"block": ["ir", "mvit"], "channels": 16, "dim": [30, 32]}]},
            r"stage 1 dim must be multiples of num_heads=4",
        ),
        ({"resolution": [16, 32]}, "resolution must be >= the network's total stride 32, got 16"),
        ({"fixed": {"stages": []}}, r"\['stages'\] come from 'stages'"),
        ({"fixed": {"act": "relu6", "widht": 1}}, r"unknown StageNetConfig field\(s\) \['widht'\]"),
        ({"model": "smollm2-135m"}, "model must be an image classifier"),
        ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ],
)
def test_empty_or_contradictory_spaces_are_one_line_errors(change, message):
    with pytest.raises(ValueError, match=message) as err:
        SearchSpace.from_dict({**TINY, **change})
    assert "\n" not in str(err.value) and str(err.value).startswith("search space")


def test_attention_space_contradictions():
    base = SPACES["attention"].as_dict()
    with pytest.raises(ValueError, match=r"\['window'\] are both fixed and searched"):
        SearchSpace.from_dict({**base, "fixed": {**base["fixed"], "window": 4}})
    with pytest.raises(ValueError, match="hidden_size must be multiples of num_heads=4, got 30"):
        SearchSpace.from_dict({**base, "fields": {**base["fields"], "hidden_size": [30, 32]}})


# ------------------------------------------------------------------------ the latency table


def test_latency_table_is_kept_in_the_cache_and_reused():
    space = get_space(TINY)
    cand = space.decode([1] * len(space.genes()))
    model = cand.build(10, 1).eval()
    x = (torch.randn(1, 1, 32, 32),)
    calls = kernel_calls(model, x)
    # stem, 4 stages' blocks, pool, classifier: outermost kernels only, every MAC inside one
    assert [type(c.module).__name__ for c in calls[:2]] == ["ConvNormAct", "InvertedResidual"]
    assert type(calls[-1].module).__name__ == "Linear"
    first = LatencyPredictor(threads=1)
    p1 = first.kernel_sum(model, x)
    assert p1.kernels == len(calls) and p1.new_entries > 0 and p1.kernel_sum_ms > 0
    assert first.table.path is not None and first.table.path.is_file()
    assert "latency" in str(first.table.path.parent)
    second = LatencyPredictor(LatencyTable(1))  # a new process: read back, nothing measured
    p2 = second.kernel_sum(cand.build(10, 1).eval(), x)
    assert p2.new_entries == 0 and p2.kernel_sum_ms == pytest.approx(p1.kernel_sum_ms)
    # A later round times every kernel again; each entry keeps its fastest, on disk too.
    p3 = second.add_round(model, x)
    assert p3.kernel_sum_ms <= p2.kernel_sum_ms
    entries = LatencyTable(1).kernels
    for c in calls:
        rounds = entries[c.key]["rounds"]
        assert len(rounds) >= 2 and entries[c.key]["ms"] == min(rounds)
    # A window or a dilation changes the key even where the module's repr does not show it.
    a = archopt.create_model("pixel_longformer", img_size=8, window=2).eval()
    b = archopt.create_model("pixel_longformer", img_size=8, window=4).eval()
    xa = (torch.randn(1, 3, 8, 8),)
    keys_a = {c.key for c in kernel_calls(a, xa)}
    keys_b = {c.key for c in kernel_calls(b, xa)}
    # the two layers (one key: same config) differ; patch embedding, norm, classifier do not
    assert len(keys_a) == len(keys_b) == 4 and len(keys_a & keys_b) == 3


def test_check_predictions():
    r = check_predictions([10, 21, 30, 50], [10, 20, 33, 40])
    assert r["n"] == 4 and r["within_10pct"] == 0.75 and r["spearman"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------ the search


def test_objectives_and_budget_are_checked(tmp_path):
    from archopt.search.loop import parse_objectives, search

    pytest.importorskip("pymoo")
    assert parse_objectives("accuracy, latency,macs") == ["accuracy", "latency", "macs"]
    with pytest.raises(ValueError, match=r"objectives must be measured quantities .* 'energy'"):
        search(TINY, budget=2, objectives="accuracy,energy", out_dir=tmp_path)
    with pytest.raises(ValueError, match="objectives must each appear once"):
        parse_objectives("accuracy,accuracy")
    with pytest.raises(ValueError, match="at least two quantities"):
        parse_objectives("accuracy")
    with pytest.raises(ValueError, match="budget must be an int >= 1, got 0"):
        search(TINY, budget=0, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written for a refused search


def _compare(entry: dict) -> tuple:
    return (
        entry["kind"],
        entry["key"],
        entry.get("top1"),
        entry["macs"],
        entry["params"],
        entry["predicted_latency_ms"],
    )


def test_search_writes_records_front_and_plots_and_resumes_identically(tmp_path):
    pytest.importorskip("pymoo")
    from archopt.search.loop import RECORDS, front_of, hypervolume, minimized, search

    kw = dict(budget=5, objectives="accuracy,latency,params", seed=3, pop_size=4, **FAST)
    kw["max_latency_ms"] = 1e6  # no rejections: every proposal is trained
    full = search(TINY, out_dir=tmp_path / "full", **kw)
    assert full["evaluations"] == 5 and len(full["candidates"]) == 5
    assert full["accuracy_proxy"].startswith("validation top-1 after 1 epoch(s) from scratch")
    for name in (
        "search.json",
        "search.csv",
        "search_front_latency.png",
        "search_front_params.png",
    ):
        assert (tmp_path / "full" / name).stat().st_size > 100, name
    saved = json.loads((tmp_path / "full" / "search.json").read_text())
    assert saved["hypervolume"] == pytest.approx(full["hypervolume"])
    assert set(saved["reference_point"]) == {"accuracy", "latency", "params"}
    names = full["objectives"]
    idx = front_of(full["candidates"], names)
    assert [full["candidates"][i]["index"] for i in idx] == full["front"]
    ref = [full["reference_point"][o] for o in names]
    pts = np.array([[minimized(full["candidates"][i], o) for o in names] for i in idx])
    assert full["hypervolume"] == pytest.approx(hypervolume(pts, ref)) and full["hypervolume"] > 0
    assert [h["label"] for h in full["hand_designed"]] == ["MobileNet v1 0.25-32"]
    for c in full["candidates"]:
        assert c["predicted_latency_ms"] > 0 and c["latency_ms"] > 0 and 0 <= c["top1"] <= 1
    assert full["predictor"]["n"] == 5
    rows = (tmp_path / "full" / "search.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 + 1

    # Interrupted after 2 candidates, then continued: the same proposals and figures.
    part = tmp_path / "part"
    first = search(TINY, out_dir=part, stop_after=2, **kw)
    assert first["evaluations"] == 2 and first["hand_designed"] == []
    lines = (part / RECORDS).read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "header"
    resumed = search(TINY, out_dir=part, **kw)
    a = [_compare(e) for e in full["candidates"] + full["rejected_candidates"]]
    b = [_compare(e) for e in resumed["candidates"] + resumed["rejected_candidates"]]
    assert sorted(a, key=str) == sorted(b, key=str)
    assert [e["key"] for e in resumed["candidates"]] == [e["key"] for e in full["candidates"]]

    # A larger budget extends the finished search; other settings are refused.
    with pytest.raises(ValueError, match=r"cannot continue the search .*seed: records have 3"):
        search(TINY, out_dir=part, **{**kw, "seed": 4})


def test_search_settles_latency_in_rounds_and_checks_the_predictor_on_them(tmp_path):
    pytest.importorskip("pymoo")
    from archopt.search.loop import format_search, search

    kw = dict(budget=2, hand_designed=False, max_latency_ms=None, round_gap_s=0.0, **FAST)
    one = search(TINY, out_dir=tmp_path / "one", algorithm="random", **kw)
    assert one["predictor_settled"] is None and "settled" not in one["candidates"][0]
    r = search(TINY, out_dir=tmp_path / "two", algorithm="random", rounds=2, **kw)
    assert r["predictor_settled"]["n"] == 2 and r["predictor_settled"]["rounds"] == 2
    for c in r["candidates"]:
        st = c["settled"]
        # the first round is the trained model's own measurement; the fastest round is kept
        assert st["latency_rounds_ms"][0] == c["latency_ms"] and len(st["latency_rounds_ms"]) == 2
        assert st["latency_ms"] == min(st["latency_rounds_ms"])
        assert 0 < st["kernel_sum_ms"] <= c["kernel_sum_ms"]  # every kernel at its fastest
    text = format_search(r)  # also with no latency bound (once a TypeError here)
    assert "fastest of 2 rounds" in text and "no latency bound" in text
    # Continued with the same rounds: nothing timed again; with more: timed again.
    again = search(TINY, out_dir=tmp_path / "two", algorithm="random", rounds=2, **kw)
    assert [c["settled"] for c in again["candidates"]] == [c["settled"] for c in r["candidates"]]
    more = search(TINY, out_dir=tmp_path / "two", algorithm="random", rounds=3, **kw)
    assert all(len(c["settled"]["latency_rounds_ms"]) == 3 for c in more["candidates"])
    with pytest.raises(ValueError, match="rounds must be"):
        search(TINY, out_dir=tmp_path / "bad", rounds=0, **kw)
    with pytest.raises(ValueError, match="threads must be an int >= 1, got 0"):
        search(TINY, out_dir=tmp_path / "bad", threads=0, **kw)  # not "torch's default"


def test_broken_record_file_is_an_error_and_is_kept(tmp_path):
    pytest.importorskip("pymoo")
    from archopt.search.loop import RECORDS, search

    kw = dict(budget=2, hand_designed=False, max_latency_ms=None, **FAST)
    search(TINY, out_dir=tmp_path, algorithm="random", **kw)
    path = tmp_path / RECORDS
    text = path.read_text()
    broken = text + '{"kind": "candidate", "index": 2, "ke\n'
    path.write_text(broken)
    with pytest.raises(ValueError, match=r"records\.jsonl is broken at line 4 .* left as it is"):
        search(TINY, out_dir=tmp_path, algorithm="random", **{**kw, "budget": 3})
    assert path.read_text() == broken  # no record lost, nothing rewritten


def test_cli_search_list_spaces_and_errors(capsys, tmp_path):
    from archopt.cli import main

    assert main(["search", "--list-spaces"]) == 0
    out = capsys.readouterr().out
    assert "mobilenet:" in out and "mobilevit:" in out and "attention:" in out
    space = tmp_path / "tiny.json"
    space.write_text(json.dumps(TINY))
    for argv, msg in (
        (["--space", str(space), "--budget", "0"], "--budget: must be in [1, 100000], got 0"),
        (["--space", str(space), "--budget", "2", "--objectives", "accuracy,joules"], "joules"),
        (["--space", "mobilenett", "--budget", "2"], "space must be one of"),
        (["--space", str(tmp_path / "none.json"), "--budget", "2"], "does not exist"),
    ):
        try:
            code = main(["search", *argv, "--out", str(tmp_path / "o")])
        except SystemExit as e:  # argparse's range checks exit from the parser
            code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err.startswith("archopt: error:") and msg in err and "\n" not in err


def test_bench_predictor_reports_held_out_candidates(tmp_path):
    from archopt.bench.predictor import main

    out = tmp_path / "p.json"
    r = main(["--candidates", "4", "--calibrate", "1", "--repeats", "2", "--rounds", "2",
              "--round-gap", "0", "--quiet", "--json", str(out)])  # fmt: skip
    assert r["held_out"] == 3 and len(r["rows"]) == 4 and r["rounds"] == 2
    for label in ("first_round", "fastest_of_2"):
        for fit in ("median_ratio", "affine"):
            assert 0.0 <= r[label][fit]["within_10pct"] <= 1.0 and r[label][fit]["n"] == 3
    for row in r["rows"]:
        # every kernel keeps its fastest round, so a model's kernel sum can only go down
        first, last = row["kernel_sum_rounds_ms"]
        assert last <= first and len(row["measured_rounds_ms"]) == 2
    row = r["rows"][0]
    assert r["first_round"]["median_ratio"]["a"] == pytest.approx(
        row["measured_rounds_ms"][0] / row["kernel_sum_rounds_ms"][0]
    )
    assert r["fastest_of_2"]["median_ratio"]["a"] == pytest.approx(
        min(row["measured_rounds_ms"]) / row["kernel_sum_rounds_ms"][1]
    )
    assert json.loads(out.read_text())["held_out"] == 3


def test_the_default_latency_bound_is_the_slowest_hand_designed_model_as_predicted(tmp_path):
    """The bound is compared with predictions, so it is one: the slowest hand-designed model's
    predicted latency (the same table and calibration), not its measured time, which a host
    that drifts between the calibration and the bound puts on another footing (a quick tour
    once rejected every candidate that way). Every candidate trained is predicted within it,
    every rejected one beyond."""
    pytest.importorskip("pymoo")
    from archopt.search.loop import search

    kw = dict(budget=2, seed=1, pop_size=4, rounds=1, **FAST)
    report = search(TINY, out_dir=tmp_path / "auto", **kw)
    bound = report["latency_bound_ms"]
    assert bound == max(h["predicted_latency_ms"] for h in report["hand_designed"])
    assert report["evaluations"] == 2 and report["latency_bound_rule"].endswith(
        "hand-designed models"
    )
    assert all(c["predicted_latency_ms"] <= bound for c in report["candidates"])
    assert all(c["predicted_latency_ms"] > bound for c in report["rejected_candidates"])


def test_a_search_that_trains_nothing_still_plots_the_hand_designed_models(tmp_path):
    """Every proposal predicted slower than the bound: no candidate, and the report and its
    plot still come out (the hand-designed models alone), with no front."""
    pytest.importorskip("pymoo")
    from archopt.search.loop import search

    kw = dict(budget=1, seed=1, pop_size=4, rounds=1, max_latency_ms=1e-6, **FAST)
    report = search(TINY, out_dir=tmp_path / "none", **kw)
    assert report["evaluations"] == 0 and report["front"] == [] and report["rejected"] > 0
    assert [h["label"] for h in report["hand_designed"]] == ["MobileNet v1 0.25-32"]
    assert (tmp_path / "none" / report["plots"]["latency"]).stat().st_size > 100
