"""Reports: hand-computed means and fronts, all-or-nothing output, run readers, CLI errors.

No TVM build runs here: the CPU backend is a fake measure function with known latencies.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from releq_tvm.bits import format_bits
from releq_tvm.cli import main
from releq_tvm.networks import layer_table
from releq_tvm.report.accuracy import AccuracyConfig, AccuracyOracle
from releq_tvm.report.bitwidths import BITWIDTH_COLUMNS
from releq_tvm.report.build import ReportOptions, build_report
from releq_tvm.report.choices import BitChoice, published_choice
from releq_tvm.report.compare import COMPARE_COLUMNS
from releq_tvm.report.convergence import ABLATION_COLUMNS, convergence_columns
from releq_tvm.report.cpu_report import FIG8_COLUMNS, CpuLatency, fig8_rows
from releq_tvm.report.pareto import (
    PARETO_COLUMNS,
    SeparableCost,
    enumerate_bits,
    pareto_front,
    stripes_separable_cost,
)
from releq_tvm.report.provenance import Provenance, merge_readme, parse_readme
from releq_tvm.report.runs import choice_fixed_episode, load_run, moving_average, search_converged_episode
from releq_tvm.report.stripes_report import FIG9_COLUMNS
from releq_tvm.report.tables import geometric_mean, read_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: Fake CPU latencies (ms): mixed, 8-bit bit-serial, int8, fp32 per network.
FAKE_LATENCY = {"lenet": (2.0, 4.0, 3.0, 6.0, 1.5, 2.25), "lenet4": (1.0, 8.0, 2.0, 4.0, 0.5, 2.0)}


def fake_measure(network, w_bits, a_bits):
    mixed, eight, int8, fp32, auto, ort_int8 = FAKE_LATENCY[network]
    return CpuLatency(mixed_ms=mixed, bitserial8_ms=eight, int8_ms=int8, fp32_ms=fp32, auto_ms=auto,
                      ort_int8_ms=ort_int8, repeats=3)


def fake_pareto_cost(network, bit_set):
    """A CPU cost where every layer costs its bits (us): ratio = mean bits / 8."""
    n = len(layer_table(network))
    values = tuple(sorted(set(bit_set) | {8}))
    layer = np.tile(np.array(values, dtype=float), (n, 1))
    return SeparableCost("cpu_latency", values, layer, reference=8.0 * n)


def options(tmp_path, **kw) -> ReportOptions:
    base = dict(
        networks=["lenet", "lenet4"],
        out_dir=tmp_path / "results",
        accuracy=False,
        pareto_networks=("lenet4",),
        cpu_measure=fake_measure,
        cpu_pareto_cost=fake_pareto_cost,
        accuracy_cache=tmp_path / "cache",
        command="releq-tvm report --test",
    )
    base.update(kw)
    return ReportOptions(**base)


# ------------------------------------------------------------------------ means and fronts


def test_geometric_mean_by_hand():
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)
    assert geometric_mean([2.0, 0.5]) == pytest.approx(1.0)
    assert geometric_mean([3.0, None]) == pytest.approx(3.0)
    assert geometric_mean([None]) is None


def test_fig8_mean_row_is_geometric_mean_of_two_networks():
    choices = {n: published_choice(n) for n in ("lenet", "lenet4")}
    rows = fig8_rows(choices, fake_measure)
    assert [r["network"] for r in rows] == ["lenet", "lenet4", "GEOMEAN"]
    assert rows[0]["speedup"] == pytest.approx(4.0 / 2.0)
    assert rows[1]["speedup"] == pytest.approx(8.0 / 1.0)
    # geometric mean of 2x and 8x is 4x (the arithmetic mean would be 5x)
    assert rows[2]["speedup"] == pytest.approx(math.sqrt(2.0 * 8.0)) == pytest.approx(4.0)
    assert rows[2]["speedup_vs_int8"] == pytest.approx(math.sqrt(1.5 * 2.0))
    assert rows[2]["speedup_vs_fp32_tvm_untuned"] == pytest.approx(math.sqrt(3.0 * 4.0))
    # auto against our int8 (3.0 / 1.5, 2.0 / 0.5) and onnxruntime int8 (2.25 / 1.5, 2.0 / 0.5)
    assert rows[2]["auto_speedup_vs_int8"] == pytest.approx(math.sqrt(2.0 * 4.0))
    assert rows[0]["auto_speedup_vs_ort_int8"] == pytest.approx(1.5)
    assert rows[2]["auto_speedup_vs_ort_int8"] == pytest.approx(math.sqrt(1.5 * 4.0))
    assert rows[0]["latency_openvino_int8_ms"] is None and rows[2]["auto_speedup_vs_openvino_int8"] is None
    assert rows[0]["a_bits"] == "8,8,8,8,8"


def test_pareto_front_on_hand_made_points():
    # (cost, accuracy): lower cost and higher accuracy are better
    points = [
        (1.0, 50.0),  # 0 front: cheapest
        (2.0, 70.0),  # 1 front
        (2.0, 60.0),  # 2 dominated by 1 (same cost, less accurate)
        (3.0, 65.0),  # 3 dominated by 1
        (4.0, 90.0),  # 4 front
        (4.0, 90.0),  # 5 front: identical to 4
        (5.0, 90.0),  # 6 dominated by 4 (costlier, same accuracy)
        (0.5, 10.0),  # 7 front: cheapest of all
    ]
    mask = pareto_front([p[0] for p in points], [p[1] for p in points])
    assert mask.tolist() == [True, True, False, False, True, True, False, True]


def test_enumeration_and_stripes_sums_match_the_simulator():
    from releq_tvm.sim import stripes_cost_ratio

    combos = enumerate_bits(5, (2, 4, 8))
    assert combos.shape == (243, 5)
    assert len({tuple(r) for r in combos}) == 243
    cost = stripes_separable_cost("lenet", (2, 4, 8))
    ratios = cost.ratio(combos)
    table = layer_table("lenet")
    rng = np.random.default_rng(0)
    for i in rng.choice(len(combos), size=12, replace=False):
        assert ratios[i] == pytest.approx(stripes_cost_ratio(table, list(combos[i])), rel=1e-12)
    assert ratios[-1] == pytest.approx(1.0)  # all 8 bits


# ------------------------------------------------------------------------ the whole report


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One report of lenet + lenet4 (fake CPU, no accuracy) into a results/ that other stages
    already wrote to: a hand-written README section, a folder with its own README, a CSV
    with its own provenance header."""
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "results"
    (out / "stripes").mkdir(parents=True)
    (out / "stripes" / "README.md").write_text("# stripes\n")
    (out / "stripes" / "lenet.csv").write_text("# command: releq-tvm simulate lenet\nnetwork\nlenet\n")
    (out / "kernels.csv").write_text("# command: releq-tvm bench kernels\n# made: 2026-01-01\nk\n1\n")
    (out / "README.md").write_text(merge_readme(None, {"kernels.csv": KERNELS_SECTION}))
    written = build_report(options(tmp))
    return tmp, out, written


KERNELS_SECTION = "### `kernels.csv`: hand-written by the kernels stage\n\nkeep me"


def test_report_files_columns_pngs_and_readme(built):
    _, out, written = built
    names = sorted(p.name for p in written)
    expected = {
        "fig8_tvm_cpu.csv": FIG8_COLUMNS,
        "fig9_stripes.csv": FIG9_COLUMNS,
        "bitwidths.csv": BITWIDTH_COLUMNS,
        "pareto_lenet4.csv": PARETO_COLUMNS,
        "admm_comparison.csv": COMPARE_COLUMNS,
    }
    assert set(names) == set(expected) | {n.replace(".csv", ".png") for n in expected} | {"README.md"}
    for name, columns in expected.items():
        header, rows = read_csv(out / name)
        assert list(rows[0].keys()) == list(columns), name
        assert header[0] == "command: releq-tvm report --test"
        assert any(h.startswith("machine:") and "cores:" in h for h in header)
        assert any(h.startswith("versions:") and "tvm" in h and "torch" in h for h in header)
        png = out / name.replace(".csv", ".png")
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000, png
    _, sections = parse_readme((out / "README.md").read_text())
    for name in names:
        if name != "README.md":
            assert name in sections and "releq-tvm report --test" in sections[name], name
    assert not [p for p in out.iterdir() if p.name.startswith(".report-staging")]

    _, fig9 = read_csv(out / "fig9_stripes.csv")
    assert [r["network"] for r in fig9] == ["lenet", "lenet4", "GEOMEAN"]
    mean = math.sqrt(float(fig9[0]["speedup"]) * float(fig9[1]["speedup"]))
    assert float(fig9[2]["speedup"]) == pytest.approx(mean, rel=1e-5)
    _, fig8 = read_csv(out / "fig8_tvm_cpu.csv")
    assert [(r["network"], r["speedup"]) for r in fig8] == [("lenet", "2"), ("lenet4", "8"), ("GEOMEAN", "4")]
    _, pareto = read_csv(out / "pareto_lenet4.csv")
    grid = [r for r in pareto if r["point"] == "grid"]
    assert len(grid) == 3**4
    placed = {r["point"]: r for r in pareto if r["point"] != "grid"}
    assert placed["choice (published)"]["w_bits"] == "2,2,3,2"
    assert placed["ADMM"]["w_bits"] == "5,3,2,3"
    assert float(placed["ADMM"]["cpu_latency_ratio"]) == pytest.approx(13 / 32, rel=1e-5)  # mean bits / 8
    # the fake CPU cost is mean bits / 8 for every grid point
    for r in grid[:20]:
        assert float(r["cpu_latency_ratio"]) == pytest.approx(float(r["mean_bits"]) / 8, rel=1e-5)
    # cost-only: the CPU front over (mean bits / 8, mean bits) is every vector at its lowest
    # cost for its mean bits, i.e. all of them (cost and score move together)
    assert {r["on_front_cpu"] for r in grid} == {"1"}
    _, admm = read_csv(out / "admm_comparison.csv")
    assert [(r["network"], r["method"]) for r in admm] == [("lenet4", "ReLeQ"), ("lenet4", "ADMM")]
    assert float(admm[0]["cpu_speedup"]) == pytest.approx(8.0)


def test_failed_report_leaves_previous_files_whole(built, tmp_path):
    import shutil

    shutil.copytree(built[1], tmp_path / "results")
    out = tmp_path / "results"
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []

    def failing_measure(network, w_bits, a_bits):
        calls.append(network)
        raise RuntimeError("TVM build failed")  # fig9 is staged by now, fig8 half done

    with pytest.raises(RuntimeError, match="TVM build failed"):
        build_report(options(tmp_path, cpu_measure=failing_measure, command="releq-tvm report --second"))
    assert calls == ["lenet"]
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # same files, same bytes
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_orphaned_staging_folders_are_removed(tmp_path):
    import os

    from releq_tvm.report.output import STAGING_PREFIX, StagedOutput

    dead = tmp_path / f"{STAGING_PREFIX}999999999-abc"  # no such process
    alive = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-abc"  # this process: another report in flight
    dead.mkdir()
    alive.mkdir()
    with StagedOutput(tmp_path) as out:
        out.write_text("a.csv", "x\n")
        out.commit()
    assert not dead.exists() and alive.exists()
    assert (tmp_path / "a.csv").read_text() == "x\n"


def test_readme_keeps_sections_of_other_stages(built):
    _, out, _ = built
    _, sections = parse_readme((out / "README.md").read_text())
    assert sections["kernels.csv"] == KERNELS_SECTION  # another stage's words survive a report run
    assert "releq-tvm simulate lenet" in sections["stripes/lenet.csv"]  # drafted from the file's header
    assert "stripes/README.md" in sections
    assert "fig9_stripes.csv" in sections
    # a second merge with nothing new changes nothing
    text = (out / "README.md").read_text()
    assert merge_readme(text, {}, out) == text


def test_readme_redrafts_sections_copied_from_headers(tmp_path):
    (tmp_path / "sim.csv").write_text("# command: old command\nx\n1\n")
    first = merge_readme(None, {}, tmp_path)
    assert "old command" in parse_readme(first)[1]["sim.csv"]
    (tmp_path / "sim.csv").write_text("# command: new command\nx\n1\n")  # the stage rewrote its file
    second = merge_readme(first, {}, tmp_path)
    assert "new command" in parse_readme(second)[1]["sim.csv"]
    (tmp_path / "sim.csv").unlink()
    assert "sim.csv" not in parse_readme(merge_readme(second, {}, tmp_path))[1]


def test_readme_gives_a_plot_the_provenance_of_its_csv(tmp_path):
    (tmp_path / "eff.csv").write_text("# command: releq-tvm search-efficiency lenet\nx\n1\n")
    (tmp_path / "eff.png").write_bytes(PNG_MAGIC)
    (tmp_path / "lonely.png").write_bytes(PNG_MAGIC)
    sections = parse_readme(merge_readme(None, {}, tmp_path))[1]
    assert "Plot of `eff.csv`" in sections["eff.png"]
    assert "- command: `releq-tvm search-efficiency lenet`" in sections["eff.png"]
    assert "no `# command:` header" in sections["lonely.png"]


def test_provenance_lines():
    p = Provenance(command="releq-tvm report --out results", seed="0")
    lines = p.header_lines(["a note"])
    assert lines[0] == "# command: releq-tvm report --out results"
    assert lines[-1] == "# note: a note"
    assert p.cpu and p.cores >= 1


# ------------------------------------------------------------------------ search runs


def make_run(root: Path, name: str, reward="asymmetric", clip=0.1, episodes=30, flip_at=12, network="lenet4",
             converged=None, final=(2, 4, 2, 8), a_bits=None, test_accuracy=98.5):
    """A run directory in the format of `releq-tvm search`: the policy's most likely bits flip
    from all-8 to the final bits at training episode ``flip_at``; two greedy episodes follow.
    With ``a_bits`` it is a W+A run (`search --search-activations`) that chose those activation bits."""
    from releq_tvm.search.run_files import EPISODE_COLUMNS

    run = root / name
    run.mkdir(parents=True)
    actions = (2, 4, 8)
    n = len(layer_table(network))
    (run / "config.json").write_text(json.dumps(
        {"command": f"releq-tvm search {network} --reward {reward}",
         "config": {"network": network, "reward": reward, "ppo_clip_range": clip, "seed": 0, "measure": "stripes",
                    "action_set": list(actions), "search_activations": a_bits is not None}}))
    final, early = tuple(final)[:n], (8,) * n
    text = lambda bits: ",".join(map(str, bits))  # noqa: E731
    ep_rows, prob_rows = [], []
    for e in range(1, episodes + 3):
        phase = "train" if e <= episodes else "greedy"
        likely = final if e >= flip_at else early
        sa, cost = 0.9 + 0.003 * e, 1.0 - 0.02 * e
        ep_rows.append({"episode": e, "phase": phase, "w_bits": text(likely), "a_bits": text(a_bits or ()),
                        "accuracy": 99.0 * sa, "sa": sa,
                        "sq": cost, "cost_ratio": cost, "reward": sa - cost, "greedy_bits": text(likely),
                        "greedy_prob": 0.8, "seconds": 0.1})
        for layer, b in enumerate(likely):
            p = {f"p_{a}": 0.8 if a == b else 0.1 for a in actions}
            prob_rows.append({"episode": e, "phase": phase, "step": layer, "layer": layer, "kind": "w", "bits": b, **p})
    import csv

    with open(run / "episodes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=EPISODE_COLUMNS, restval="")
        w.writeheader()
        w.writerows(ep_rows)
        f.write('31,train,"2,4,')  # an episode cut short by a kill: skipped
    with open(run / "action_probs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["episode", "phase", "step", "layer", "kind", "bits", "p_2", "p_4", "p_8"])
        w.writeheader()
        w.writerows(prob_rows)
    solution = {"w_bits": list(final), "a_bits": None if a_bits is None else list(a_bits), "sa": 0.98,
                "cost_ratio": 0.4, "reward": 0.5}
    (run / "best.json").write_text(json.dumps(
        {"network": network, "converged_episode": converged, "best": solution, "solution": solution,
         "long_finetune": {"steps": 3000, "test_accuracy_quantized": test_accuracy, "test_accuracy_full_precision": 99.0}}))
    return run


def test_run_reader_convergence_and_moving_average(tmp_path):
    run = load_run(make_run(tmp_path, "r1", converged=20))
    assert run.network == "lenet4" and run.clip_range == 0.1 and run.reward_name == "asymmetric"
    assert len(run.episodes) == 32 and len(run.train_episodes) == 30
    assert run.probs.shape == (32, 4, 3) and run.prob_episodes[0] == 1
    assert run.probs[0, 1].tolist() == [0.1, 0.1, 0.8]  # episode 1: 8 bits most likely
    assert run.choice() == BitChoice("lenet4", (2, 4, 2, 8), None, str(tmp_path / "r1"), source_accuracy=98.5)
    assert choice_fixed_episode(run) == 12
    assert search_converged_episode(run) == 20
    assert moving_average([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]


def test_report_from_runs_convergence_and_ablations(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "a_asym")
    make_run(runs, "b_ratio", reward="sa_over_sq", flip_at=20)
    make_run(runs, "c_diff", reward="sa_minus_sq", flip_at=5)
    make_run(runs, "d_clip2", clip=0.2)
    make_run(runs, "e_clip3", clip=0.3, flip_at=25)
    build_report(options(tmp_path, networks=None, bits_from=[str(runs)], pareto_networks=()))
    out = tmp_path / "results"
    _, bw = read_csv(out / "bitwidths.csv")
    assert [(r["network"], r["w_bits"]) for r in bw] == [("lenet4", "2,4,2,8")]  # the default-setting run
    assert bw[0]["acc_source_test_pct"] == "98.5" and bw[0]["bits_source"] == str(runs / "a_asym")
    header, conv = read_csv(out / "convergence_lenet4.csv")
    assert list(conv[0]) == list(convergence_columns(4))
    assert conv[15]["layer1_likely_bits"] == "4" and float(conv[15]["layer1_p"]) == pytest.approx(0.8)
    assert conv[0]["layer1_likely_bits"] == "8"
    assert [r["phase"] for r in conv[-2:]] == ["greedy", "greedy"] and conv[-1]["sa_ma"] == ""
    # moving average over 10 training episodes, by hand at episode 12: mean of sa at episodes 3..12
    assert float(conv[11]["sa_ma"]) == pytest.approx(np.mean([0.9 + 0.003 * e for e in range(3, 13)]), rel=1e-5)
    _, reward = read_csv(out / "reward_ablation.csv")
    assert list(reward[0]) == list(ABLATION_COLUMNS)
    assert sorted((r["reward"], r["choice_fixed_episode"]) for r in reward) == [
        ("asymmetric", "12"), ("sa_minus_sq", "5"), ("sa_over_sq", "20")]
    assert {r["test_acc_quant_pct"] for r in reward} == {"98.5"}
    _, clip = read_csv(out / "clip_sensitivity.csv")
    assert sorted((float(r["clip_range"]), r["choice_fixed_episode"]) for r in clip) == [
        (0.1, "12"), (0.2, "12"), (0.3, "25")]
    for name in ("convergence_lenet4.png", "reward_ablation.png", "clip_sensitivity.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    # clip 0.3 flips later than 0.1 / 0.2: the runs differ, so no "identical" note
    assert "identical choices" not in (out / "clip_sensitivity.csv").read_text()


def test_identical_clip_runs_are_said_to_be_identical(tmp_path):
    from releq_tvm.report.convergence import identical_trajectories

    runs = tmp_path / "runs"
    same = [load_run(make_run(runs, name, clip=c)) for name, c in (("c1", 0.1), ("c2", 0.2), ("c3", 0.3))]
    assert identical_trajectories(same)
    assert not identical_trajectories(same[:2] + [load_run(make_run(runs, "c4", clip=0.3, flip_at=25))])
    build_report(options(tmp_path, networks=None, bits_from=[str(runs / n) for n in ("c1", "c2", "c3")],
                         pareto_networks=()))
    assert "the clip never bound" in (tmp_path / "results" / "clip_sensitivity.csv").read_text()



def write_ppo_log(run: Path, clip_fractions, name="progress.csv"):
    """PPO's logger file as SB3 writes it: a first row before any update, then one row per update."""
    run.joinpath("ppo").mkdir(exist_ok=True)
    lines = ["time/iterations,train/clip_fraction,train/approx_kl,train/n_updates", "1,,,"]
    lines += [f"{i + 2},{c},{c / 10},{3 * (i + 1)}" for i, c in enumerate(clip_fractions)]
    run.joinpath("ppo", name).write_text("\n".join(lines) + "\n")


def test_clip_ablation_reads_the_clip_fraction_from_ppo_logs(tmp_path):
    from releq_tvm.report.runs import PpoStats, read_ppo_stats

    runs = tmp_path / "runs"
    dirs = [make_run(runs, name, clip=c) for name, c in (("c1", 0.1), ("c2", 0.2), ("c3", 0.3))]
    for d in dirs:
        write_ppo_log(d, [0.0] * 4)
        write_ppo_log(d, [0.0] * 2, name="progress-resume4.csv")  # a resume ...
        with open(d / "ppo" / "progress-resume4.csv", "a") as f:
            f.write("4,0.0")  # ... whose last row a kill cut short
    assert read_ppo_stats(dirs[0]) == PpoStats(updates=6, clipped_updates=0, max_clip_fraction=0.0, max_approx_kl=0.0)
    assert read_ppo_stats(tmp_path) is None
    build_report(options(tmp_path, networks=None, bits_from=[str(d) for d in dirs], pareto_networks=()))
    text = (tmp_path / "results" / "clip_sensitivity.csv").read_text()
    assert "at clip 0.1 the clip bound in 0 of 6 updates" in text and "the clip never bound" in text
    assert "inferred" not in text
    _, rows = read_csv(tmp_path / "results" / "clip_sensitivity.csv")
    assert [(r["ppo_updates"], r["clipped_updates"]) for r in rows] == [("6", "0")] * 3

    # the tightest clip bound in 2 of 3 updates: measured, and not said to have never bound
    write_ppo_log(dirs[0], [0.0, 0.25, 0.5])
    dirs[0].joinpath("ppo", "progress-resume4.csv").unlink()
    assert read_ppo_stats(dirs[0]) == PpoStats(3, 2, 0.5, pytest.approx(0.05))
    build_report(options(tmp_path, networks=None, bits_from=[str(d) for d in dirs], pareto_networks=()))
    text = (tmp_path / "results" / "clip_sensitivity.csv").read_text()
    assert "bound in 2 of 3 updates (largest clip fraction 0.5" in text and "never bound" not in text


# ------------------------------------------------------------------------ W+A runs and --act-bits


def bit_plane_measure(calls):
    """A fake CPU whose bit-serial build costs the mean of w x a over the layers (ms; 64 at 8/8 bits),
    so speedup = 64 / mean(w * a); ``calls`` records every (network, w_bits, a_bits) built."""

    def measure(network, w_bits, a_bits):
        calls.append((network, tuple(w_bits), tuple(a_bits)))
        planes = sum(w * a for w, a in zip(w_bits, a_bits)) / len(w_bits)
        return CpuLatency(mixed_ms=planes, bitserial8_ms=64.0, int8_ms=32.0, auto_ms=min(planes, 32.0), repeats=3)

    return measure


def test_wa_runs_get_rows_of_their_own_in_fig8_and_bitwidths(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "a_weights")  # weight-only: the network's primary row
    make_run(runs, "wa_seed0", final=(2, 4, 2, 8), a_bits=(8, 4, 2, 4), test_accuracy=98.25)
    make_run(runs, "wa_seed1", final=(8, 2, 2, 2), a_bits=(8, 2, 2, 2), test_accuracy=97.75)
    calls = []
    build_report(options(tmp_path, networks=None, bits_from=[str(runs)], pareto_networks=(),
                         cpu_measure=bit_plane_measure(calls)))
    out = tmp_path / "results"
    _, fig8 = read_csv(out / "fig8_tvm_cpu.csv")
    assert [(r["network"], r["variant"], r["bits_source"], r["w_bits"], r["a_bits"]) for r in fig8] == [
        ("lenet4", "primary", str(runs / "a_weights"), "2,4,2,8", "8,8,8,8"),
        ("lenet4", "w+a run", str(runs / "wa_seed0"), "2,4,2,8", "8,4,2,4"),
        ("lenet4", "w+a run", str(runs / "wa_seed1"), "8,2,2,2", "8,2,2,2"),
        ("GEOMEAN", "", "", "", ""),
    ]
    # every build at the row's own activation bits (then the ADMM comparison's)
    assert calls[:3] == [("lenet4", (2, 4, 2, 8), (8, 8, 8, 8)), ("lenet4", (2, 4, 2, 8), (8, 4, 2, 4)),
                     ("lenet4", (8, 2, 2, 2), (8, 2, 2, 2))]
    # speedup 64 / mean(w * a): 64 / 32, 64 / ((16 + 16 + 4 + 32) / 4), 64 / ((64 + 4 + 4 + 4) / 4)
    assert [float(r["speedup"]) for r in fig8[:3]] == pytest.approx([2.0, 64 / 17, 64 / 19], rel=1e-5)
    assert float(fig8[0]["auto_speedup_vs_int8"]) == pytest.approx(1.0)
    assert float(fig8[1]["auto_speedup_vs_int8"]) == pytest.approx(32 / 17, rel=1e-5)
    assert float(fig8[3]["speedup"]) == pytest.approx(2.0)  # the mean of the primary rows only
    _, bw = read_csv(out / "bitwidths.csv")
    assert [(r["variant"], r["w_bits"], r["a_bits"], r["acc_source_test_pct"]) for r in bw] == [
        ("primary", "2,4,2,8", "8", "98.5"), ("w+a run", "2,4,2,8", "8,4,2,4", "98.25"),
        ("w+a run", "8,2,2,2", "8,2,2,2", "97.75")]
    assert float(bw[2]["avg_bits"]) == pytest.approx(3.5)
    # fig9 and the ADMM comparison keep one row per network: the primary one
    _, fig9 = read_csv(out / "fig9_stripes.csv")
    assert [(r["network"], r["w_bits"]) for r in fig9] == [("lenet4", "2,4,2,8"), ("GEOMEAN", "")]
    for name in ("fig8_tvm_cpu.png", "bitwidths.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_primary_bits_prefer_weight_only_runs_then_published_then_wa_runs(tmp_path):
    from releq_tvm.report.choices import activation_run_choices, choose_bits
    from releq_tvm.report.runs import discover_runs

    wa = discover_runs([make_run(tmp_path / "wa", name, a_bits=(8, 4, 4, 4)) for name in ("s0", "s1")])
    weights = load_run(make_run(tmp_path, "w", final=(4, 4, 4, 4)))
    for runs, published, primary in (
        ([weights, *wa], True, "4,4,4,4"),  # a weight-only run stands for its network
        (wa, True, "2,2,3,2"),  # else the published bits
        (wa, False, "2,4,2,8"),  # else a W+A run (the last default-setting one)
    ):
        choices = choose_bits(["lenet4"], runs, published)
        assert format_bits(choices["lenet4"].w_bits) == primary
        assert [Path(c.source).name for c in activation_run_choices(runs, choices)] == (
            ["s0"] if primary == "2,4,2,8" else ["s0", "s1"])


def test_act_bits_reports_published_bits_at_those_activation_bits(tmp_path):
    calls = []
    build_report(options(tmp_path, act_bits="4", pareto_networks=(), cpu_measure=bit_plane_measure(calls),
                         command=None))
    out = tmp_path / "results"
    assert calls[:2] == [("lenet", (8, 2, 2, 3, 2), (4,) * 5), ("lenet4", (2, 2, 3, 2), (4,) * 4)]
    header, fig8 = read_csv(out / "fig8_tvm_cpu.csv")
    assert "--act-bits 4" in header[0]
    assert [(r["variant"], r["a_bits"]) for r in fig8[:2]] == [("primary", "4,4,4,4,4"), ("primary", "4,4,4,4")]
    assert float(fig8[0]["speedup"]) == pytest.approx(64 / (4 * 17 / 5), rel=1e-5)  # mean w = 17/5
    _, bw = read_csv(out / "bitwidths.csv")
    assert [r["a_bits"] for r in bw] == ["4,4,4,4,4", "4,4,4,4"]
    _, fig9 = read_csv(out / "fig9_stripes.csv")
    assert [r["a_bits"] for r in fig9[:2]] == ["4,4,4,4,4", "4,4,4,4"]
    _, admm = read_csv(out / "admm_comparison.csv")  # both methods at the same activation bits
    assert [(r["method"], r["a_bits"]) for r in admm] == [("ReLeQ", "4,4,4,4"), ("ADMM", "4,4,4,4")]

    build_report(options(tmp_path, networks=["lenet"], act_bits="8,4,4,2,4", pareto_networks=()))
    _, bw = read_csv(out / "bitwidths.csv")
    assert [(r["w_bits"], r["a_bits"]) for r in bw] == [("8,2,2,3,2", "8,4,4,2,4")]


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("", ["--act-bits is empty"]),
        ("8,4,4,2", ["--act-bits has 4 values", "lenet has 5 weight layers"]),
        ("8,4,9,2,4", ["--act-bits value 9 is outside the action set"]),
        ("8,four,4,2,4", ["--act-bits must be a comma list of integers"]),
    ],
)
def test_cli_bad_act_bits_is_one_line_and_exit_2(tmp_path, text, fragments):
    out = tmp_path / "results"
    result = CliRunner().invoke(main, ["report", "--networks", "lenet", "--out", str(out), "--skip-cpu",
                                       "--no-accuracy", "--pareto-networks", "none", "--act-bits", text])
    one_line_error(result, *fragments)
    assert not out.exists()


def test_cli_act_bits_must_fit_every_reported_network(tmp_path):
    result = CliRunner().invoke(main, ["report", "--networks", "lenet,lenet4", "--out", str(tmp_path / "results"),
                                       "--skip-cpu", "--no-accuracy", "--act-bits", "8,4,4,2,4"])
    one_line_error(result, "--act-bits has 5 values but lenet4 has 4 weight layers")


# ------------------------------------------------------------------------ accuracy


def test_accuracy_protocols_on_lenet(tmp_path):
    from dataclasses import replace

    from releq_tvm.data import TensorDataset, load_dataset
    from releq_tvm.quant import apply_bits
    from releq_tvm.store import Store
    from releq_tvm.train import evaluate, finetune_bits, load_model

    config = AccuracyConfig(val_images=300, finetune_steps=3, train_missing=False)
    oracle = AccuracyOracle(config, tmp_path)
    score = oracle.pareto_scorer("lenet")
    bits = (8, 2, 2, 3, 2)
    val = load_dataset("mnist", "val")
    subset = TensorDataset(val.images[:300], val.labels[:300])
    expected = evaluate(apply_bits(load_model("lenet"), bits, (1, 28, 28)), subset)
    assert score(bits) == pytest.approx(expected)
    assert score((8, 8, 8, 8, 8)) > expected  # the same model copy, re-quantized in place
    assert score(bits) == pytest.approx(expected)
    score.flush()
    stored = Store(tmp_path / "cache.sqlite").items(AccuracyOracle.NAMESPACE)  # what another process reads
    assert any("no fine-tune, first 300 val images" in k for k in stored)
    assert oracle.missing_reason("lenet4").startswith("no trained checkpoint of lenet4")
    assert "--data-dir" in oracle.missing_reason("simplenet")

    # a short fine-tune per point: the same numbers as fine-tuning by hand, and a cache entry of its own
    tuned = AccuracyOracle(replace(config, pareto_finetune_steps=2), tmp_path).pareto_scorer("lenet")
    by_hand = finetune_bits(load_model("lenet"), bits, (1, 28, 28), load_dataset("mnist", "train"), 2,
                            lr=config.finetune_lr, batch_size=config.finetune_batch, seed=config.seed)
    assert tuned(bits) == pytest.approx(evaluate(by_hand, subset))
    assert "2 fine-tune steps" in tuned.protocol

    assert oracle.cached_finetuned("lenet", bits) is None
    q = oracle.finetuned("lenet", bits)
    assert 0.0 < q <= 100.0
    again = AccuracyOracle(config, tmp_path)  # served from the cache file, no fine-tune
    assert again.cached_finetuned("lenet", bits) == again.finetuned("lenet", bits) == q


def test_long_finetune_accuracy_at_activation_bits_matches_finetuning_by_hand(tmp_path):
    from releq_tvm.data import load_dataset
    from releq_tvm.report.accuracy import calibration_images
    from releq_tvm.train import evaluate, finetune_bits, load_model

    config = AccuracyConfig(finetune_steps=2, train_missing=False)
    oracle = AccuracyOracle(config, tmp_path)
    bits, a_bits = (8, 2, 2, 3, 2), (8, 4, 4, 2, 4)
    train = load_dataset("mnist", "train")
    by_hand = finetune_bits(load_model("lenet"), bits, (1, 28, 28), train, 2, lr=config.finetune_lr,
                            batch_size=config.finetune_batch, seed=config.seed, act_bits=a_bits,
                            calibration=train.images[:calibration_images()])
    expected = evaluate(by_hand, load_dataset("mnist", "test"))
    assert calibration_images() == 512  # the search's calibration set
    assert oracle.finetuned("lenet", bits, a_bits) == pytest.approx(expected)
    # cached under a key of its own: the weight-only accuracy is another number, not served from it
    assert oracle.cached_finetuned("lenet", bits) is None
    assert AccuracyOracle(config, tmp_path).cached_finetuned("lenet", bits, a_bits) == pytest.approx(expected)


# ------------------------------------------------------------------------ CLI errors


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for f in fragments:
        assert f in lines[0]


def test_cli_bad_input(tmp_path):
    out = str(tmp_path / "results")
    run = lambda *a: CliRunner().invoke(main, ["report", "--out", out, "--skip-cpu", "--no-accuracy", *a])  # noqa: E731
    one_line_error(run("--networks", "lenet7"), "unknown network 'lenet7'")
    one_line_error(run("--bits-from", str(tmp_path / "nowhere")), "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(run("--bits-from", str(tmp_path / "empty")), "holds no search run")
    one_line_error(run("--checkpoint", "lenet4"), "NET=FILE")
    one_line_error(run("--pareto-bits", "2,9"), "1..8")
    bad = make_run(tmp_path, "bad")
    (bad / "best.json").write_text("{not json")
    one_line_error(run("--bits-from", str(bad)), "best.json", "not valid JSON")
    assert not Path(out).exists() or not any(Path(out).glob("*.csv"))


def test_cli_writes_report(tmp_path):
    out = tmp_path / "results"
    result = CliRunner().invoke(
        main, ["report", "--networks", "lenet", "--out", str(out), "--skip-cpu", "--no-accuracy", "--pareto-networks", "none"]
    )
    assert result.exit_code == 0, result.output
    header, rows = read_csv(out / "fig9_stripes.csv")
    assert header[0] == (f"command: releq-tvm report --bits-from published --networks lenet --out {out} "
                         "--skip-cpu --no-accuracy --pareto-networks none")
    assert [r["network"] for r in rows] == ["lenet", "GEOMEAN"]
    assert not (out / "fig8_tvm_cpu.csv").exists()
