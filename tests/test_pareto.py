import json
import math
import random

import pytest

from archopt.pareto import pareto_front, pareto_front_brute_force, plot_front

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("n_obj", [1, 2, 3, 4])
def test_matches_brute_force_on_random_points_with_ties(n_obj):
    rng = random.Random(n_obj)
    for trial in range(150):
        n = rng.randint(0, 40)
        # Few distinct values: many ties and exact duplicates.
        spread = rng.choice([2, 3, 5, 1000])
        points = [[rng.randint(0, spread) for _ in range(n_obj)] for _ in range(n)]
        if trial % 3 == 0:
            points = [[v + rng.random() for v in p] for p in points]  # floats, no ties
        objectives = [rng.choice(["min", "max"]) for _ in range(n_obj)]
        expected = pareto_front_brute_force(points, objectives)
        assert pareto_front(points, objectives) == expected, (points, objectives)


def test_large_two_objective_front_matches_brute_force():
    rng = random.Random(7)
    points = [(rng.randint(0, 300), rng.randint(0, 300)) for _ in range(2000)]
    assert pareto_front(points, ["min", "max"]) == pareto_front_brute_force(points, ["min", "max"])


def test_ties_and_duplicates():
    pts = [(1, 5), (1, 5), (1, 4), (2, 6), (3, 6), (0, 1)]
    # max both: (1,5) twice is dominated by (2,6); (3,6) beats (2,6) on x with a tie on y.
    assert pareto_front(pts, ["max", "max"]) == [4]
    # min x, max y: (0,1) is cheapest; both (1,5) kept (duplicates); (2,6) wins y at cost 2.
    assert pareto_front(pts, ["min", "max"]) == [0, 1, 3, 5]
    assert pareto_front([(2, 2)] * 3, ["min", "min"]) == [0, 1, 2]
    assert pareto_front([(1.0,), (0.5,), (0.5,)], ["min"]) == [1, 2]
    assert pareto_front([], ["min", "max"]) == []


def test_records_and_the_older_maximize_spelling():
    rows = [
        {"name": "a", "macs": 10, "top1": 0.9, "latency_ms": 5.0},
        {"name": "b", "macs": 20, "top1": 0.95, "latency_ms": 2.0},
        {"name": "c", "macs": 30, "top1": 0.94, "latency_ms": 1.0},
        {"name": "d", "macs": 40, "top1": 0.8, "latency_ms": 3.0},
    ]
    assert pareto_front(rows, {"macs": "min", "top1": "max"}) == [0, 1]
    assert pareto_front(rows, {"latency_ms": "min", "top1": "max"}) == [1, 2]
    three = {"macs": "min", "latency_ms": "min", "top1": "max"}
    assert pareto_front(rows, three) == [0, 1, 2]
    pts = [(r["macs"], r["top1"]) for r in rows]
    assert pareto_front(pts, maximize=(False, True)) == [0, 1]


@pytest.mark.parametrize(
    "call,msg",
    [
        (lambda: pareto_front([(1, 2)]), "exactly one of objectives"),
        (lambda: pareto_front([(1, 2)], ["min"], maximize=[True]), "exactly one of"),
        (lambda: pareto_front([(1, 2)], ["min", "best"]), "'min' or 'max', got 'best'"),
        (lambda: pareto_front([(1, 2)], "min"), "got the string 'min'"),
        (lambda: pareto_front([(1, 2), (1,)], ["min", "max"]), "point 1 has 1"),
        (lambda: pareto_front([(1, math.nan)], ["min", "max"]), "point 0 has NaN"),
        (
            lambda: pareto_front([{"macs": 1, "top1": 0.5}], {"macs": "min", "acc": "max"}),
            "objective 'acc' is not a column of point 0",
        ),
        (
            lambda: pareto_front([{"macs": 1, "top1": math.nan}], {"macs": "min", "top1": "max"}),
            "point 0 has NaN for top1",
        ),
        (lambda: pareto_front([(1, "x")], ["min", "max"]), "non-numeric"),
        (lambda: pareto_front([(1,)], []), "at least one objective"),
    ],
)
def test_bad_input_is_a_clear_error(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


def test_plot_front_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"name": "small", "macs": 1e6, "top1": 0.8},
        {"name": "mid", "macs": 1e7, "top1": 0.9},
        {"name": "wasteful", "macs": 5e7, "top1": 0.85},
        {"name": "big", "macs": 1e8, "top1": 0.93},
    ]
    path = plot_front(rows, "macs", "top1", tmp_path / "front.png", logx=True)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    # Maximized x: the step goes the other way; still a valid plot.
    path = plot_front(
        rows, "top1", "macs", tmp_path / "f2.png", x_objective="max", y_objective="min"
    )
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="log-scale y axis needs positive values"):
        plot_front([{"a": 1, "b": 0}], "a", "b", tmp_path / "x.png", logy=True)
    with pytest.raises(ValueError, match="'latency' is not a column"):
        plot_front(rows, "latency", "top1", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_pareto_study_trains_measures_and_reuses_runs(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from archopt.train.study import format_study, pareto_study

    kw = dict(
        data="digits",
        epochs=1,
        x="params",
        out_dir=tmp_path,
        batch_size=32,
        bf16="off",
        repeats=3,
        progress=False,
        verbose=False,
    )
    models = ["mobilenet_v1_025", "conv_mobilenet_v1_100:width_mult=0.25"]
    report = pareto_study(models, **kw)
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == set(models)
    conv, dw = rows[models[1]], rows[models[0]]
    assert conv["macs"] > 3 * dw["macs"] and conv["params"] > 3 * dw["params"]
    assert all(0 <= r["top1"] <= 1 and r["latency_ms"] > 0 for r in rows.values())
    assert set(report["fronts"]) == {"params", "macs", "latency"}
    assert dw["name"] in report["fronts"]["macs"]  # the cheapest in MACs is always on it
    for axis in ("params", "macs", "latency"):
        assert (tmp_path / f"pareto_{axis}.png").read_bytes().startswith(PNG_SIGNATURE)
    csv_lines = (tmp_path / "pareto.csv").read_text().splitlines()
    assert csv_lines[0].startswith("name,model,top1,params,macs,latency_ms") and len(csv_lines) == 3
    assert json.loads((tmp_path / "pareto.json").read_text())["fronts"] == report["fronts"]
    text = format_study(report)
    assert "front under macs:" in text and "front under latency:" in text

    # Finished runs are read back: same accuracy, no new training.
    result_file = tmp_path / "runs" / "mobilenet_v1_025" / "result.json"
    trained_for = json.loads(result_file.read_text())["time_s"]
    again = pareto_study(models, **kw)
    assert [r["top1"] for r in again["rows"]] == [r["top1"] for r in report["rows"]]
    assert json.loads(result_file.read_text())["time_s"] == trained_for

    with pytest.raises(ValueError, match="unknown model 'mobilenet_v9'"):
        pareto_study(["mobilenet_v1_025", "mobilenet_v9"], **kw)
    with pytest.raises(ValueError, match="x must be one of"):
        pareto_study(models, **{**kw, "x": "flops"})
    # A study that fails part-way leaves no table that looks like its result.
    with pytest.raises(ValueError, match="width_mult must be > 0, got -1"):
        pareto_study(["mobilenet_v1_025", "mobilenet_v1_050:width_mult=-1"], **kw)
    assert not (tmp_path / "pareto.json").exists() and not (tmp_path / "pareto.csv").exists()


def test_front_equals_the_definition_with_infinities_and_duplicates():
    pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from archopt.pareto import pareto_front, pareto_front_brute_force

    value = st.sampled_from([-math.inf, -2.0, -0.5, 0.0, 0.0, 1.0, 3.0, math.inf])

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(
        st.integers(1, 3).flatmap(
            lambda k: st.tuples(
                st.lists(st.sampled_from(["min", "max"]), min_size=k, max_size=k),
                st.lists(st.lists(value, min_size=k, max_size=k), min_size=0, max_size=12),
            )
        )
    )
    def check(case):
        objectives, points = case
        assert pareto_front(points, objectives) == pareto_front_brute_force(points, objectives)

    check()
    # the case that was wrong: an infinite y with the smallest x is not dominated
    assert pareto_front([(0.0, math.inf), (1.0, 5.0)], ["min", "min"]) == [0, 1]
