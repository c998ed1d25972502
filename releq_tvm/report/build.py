"""One report run: choose the bits, compute every table and figure, stage them, move them in at the end.

:func:`build_report` is what ``releq-tvm report`` calls (and what a demo or a test calls with a
fake CPU measurement). Everything it writes lands in :class:`StagedOutput` first, so an error
anywhere leaves the previous ``results/`` whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from releq_tvm.bits import parse_action_set
from releq_tvm.config_fields import check_model_shape, check_settings, command_args, setting
from releq_tvm.report.accuracy import AccuracyConfig, AccuracyOracle
from releq_tvm.report.choices import (
    BitChoice,
    activation_run_choices,
    admm_choice,
    choose_bits,
    primary_runs,
    published_choice,
    with_act_bits,
)
from releq_tvm.report.cpu_report import MeasureFn
from releq_tvm.report.output import StagedOutput
from releq_tvm.report.pareto import DEFAULT_PARETO_BITS, PARETO_NETWORKS, SeparableCost
from releq_tvm.report.provenance import Provenance
from releq_tvm.report.stripes_report import stripes_row
from releq_tvm.report.tables import csv_text


def network_list(text: str) -> tuple[str, ...] | None:
    """``--networks`` text: ``"lenet,vgg11"`` -> the names; ``"all"`` -> None (every network)."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    return None if names == ("all",) else names


def pareto_network_list(text: str) -> tuple[str, ...]:
    """``--pareto-networks`` text: the names; ``"none"`` -> none; ``"all"`` (or nothing) -> :data:`PARETO_NETWORKS`."""
    if text.strip() == "none":
        return ()
    return network_list(text) or PARETO_NETWORKS


@dataclass
class ReportOptions:
    """What to report and how: one field per option of ``releq-tvm report`` (they are generated
    from these fields and :class:`AccuracyConfig`'s), plus what tests inject."""

    bits_from: Sequence[str] = setting(
        ("published",), multiple=True, metavar="published|RUN_DIR",
        help="Where the bits come from: 'published' (METHOD.md section 6) and/or search run directories "
             "(or folders of runs); repeat the option. Networks with a weight-only run use its choice; each run "
             "that searched activation bits adds a row of its own to fig8 and bitwidths.csv.",
    )
    act_bits: str | None = setting(
        None, metavar="BITS",
        help="Activation bits of the published and weight-only choices: one value for all layers or one per weight "
             "layer (each layer's input, the first layer's being the image), checked like --bits; runs that "
             "searched activation bits keep theirs (default: 8).",
    )
    networks: Sequence[str] | None = setting(
        None, parse=network_list, metavar="NET,NET|all",
        help="Networks to report (default: all registered, or those of the runs).",
    )
    # The user's own model (issue 14). A search run of one registers it from its config.json, with its
    # data: --model is for a model no run of which is given.
    model: str | None = setting(
        None, metavar="SOURCE",
        help="Your own model (a .onnx or .pt2 file, or an entry point package.module:function). It has no published "
             "bits: report it at a search run's with --bits-from RUN_DIR (a run of it registers it by itself).",
    )
    input_shape: tuple[int, ...] | None = setting(
        None, min=1, metavar="C,H,W", help="Input shape of a --model that does not state one."
    )
    data: str | None = setting(
        None, metavar="SPEC",
        help="Images of your own model's accuracy (fine-tune on train, report on test): imagefolder:DIR, npz:FILE or "
             "a dataset name. Default: the data its search run used; none: its accuracy cells stay empty.",
    )
    out_dir: str | Path = setting("results", cli="--out", path="dir", help="Folder the files are written to.")
    skip_cpu: bool = setting(
        False, help="Do not build and time TVM networks: fig8 is not rewritten, CPU columns stay empty."
    )
    fresh_cpu: bool = setting(
        False, help="Re-measure CPU latencies instead of reusing the cached ones of this machine."
    )
    cpu_repeats: int = setting(7, min=1, help="Timed samples per CPU measurement.")
    accuracy: bool = setting(True, help="Skip every accuracy (bitwidths.csv costs only, Pareto cost-only).")
    accuracy_config: AccuracyConfig = field(default_factory=AccuracyConfig)  # its fields are options too
    pareto_bits: tuple[int, ...] = setting(
        DEFAULT_PARETO_BITS, min=1, max=8, parse=parse_action_set, metavar="BITS",
        help="Bit set enumerated for the Pareto files.",
    )
    pareto_networks: Sequence[str] = setting(
        PARETO_NETWORKS, parse=pareto_network_list, show=lambda names: ",".join(names) or "none", metavar="NET,NET|none",
        help="Networks that get a Pareto file."
    )
    threads: int | None = setting(
        None, min=1,
        help="torch threads for training and evaluation (default: torch's choice; 1 is fastest on a busy machine).",
    )
    accuracy_cache: str | Path | None = None  # folder of the accuracy and CPU caches (None: the shared store)
    #: The command line recorded in every file (None: the ``releq-tvm report`` line of these options).
    command: str | None = None
    #: Injected CPU backends (tests): the network measurement and the per-layer Pareto cost.
    cpu_measure: MeasureFn | None = None
    cpu_pareto_cost: Callable[[str, Sequence[int]], SeparableCost] | None = None

    def __post_init__(self) -> None:
        check_settings(self)


def register_report_model(opts: ReportOptions) -> str | None:
    """Register ``--model`` (checked as ``search --model`` checks it); returns its network name, or
    None without one. A search run of a user's model registers its own (:func:`releq_tvm.report.runs.load_run`)."""
    from releq_tvm.search.config import SearchConfig
    from releq_tvm.search.run import register_search_model

    if opts.model is None:
        check_model_shape(None, opts.input_shape)
        return None
    config = SearchConfig(model=opts.model, input_shape=opts.input_shape)
    register_search_model(config)
    return config.network


def resolve_inputs(opts: ReportOptions) -> tuple[list[str], list, dict[str, BitChoice], list[BitChoice]]:
    """(networks, search runs, primary bits per network, the choices of the other runs that searched
    activation bits) from the options; bad input (``--act-bits`` included) is a one-line error.
    ``--model`` and the models of the runs are registered first."""
    from releq_tvm.errors import ReleqError
    from releq_tvm.networks import get_network_spec, list_networks
    from releq_tvm.report.runs import discover_runs

    model = register_report_model(opts)
    sources = list(opts.bits_from) or ["published"]
    use_published = "published" in sources
    runs = discover_runs([s for s in sources if s != "published"])
    run_networks = list(dict.fromkeys(r.network for r in runs))
    if opts.networks:
        networks = list(dict.fromkeys(opts.networks))
    elif model is not None:
        networks = list(dict.fromkeys([model, *run_networks]))
    elif use_published:  # the registered networks, and the user's models that runs were given of
        networks = [n for n in list_networks() if get_network_spec(n).source is None or n in run_networks]
    else:
        networks = run_networks
    for net in [*networks, *opts.pareto_networks, *opts.accuracy_config.checkpoints]:
        get_network_spec(net)  # UnknownNetworkError lists the registered names
    if not networks:
        raise ReleqError("nothing to report: pass --networks or --bits-from published or a run directory")
    choices = choose_bits(networks, runs, use_published)
    if opts.act_bits is not None:
        choices = {net: with_act_bits(choice, opts.act_bits) for net, choice in choices.items()}
    return networks, runs, choices, activation_run_choices(runs, choices)


def user_model_data(opts: ReportOptions, networks: Sequence[str], runs: Sequence) -> dict[str, str]:
    """The images of each of the report's own models (``--data`` spec by network name): ``--data``,
    else the data its primary search run used. Registered networks use their own dataset."""
    from releq_tvm.errors import ReleqError
    from releq_tvm.networks import get_network_spec

    own = [net for net in networks if get_network_spec(net).source is not None]
    if opts.data is not None:
        if len(own) != 1:
            raise ReleqError(
                f"--data is the images of your own model, one per report; this report has {', '.join(own)}: report "
                "them one at a time" if own else
                "--data goes with your own model (--model, or --bits-from a run of one); registered networks use "
                "their own dataset (--data-dir)"
            )
        return {own[0]: opts.data}
    primary = primary_runs(runs)
    return {net: primary[net].config["data"] for net in own if net in primary and primary[net].config.get("data")}


def build_report(opts: ReportOptions, progress: Callable[[str], None] | None = None) -> list[Path]:
    """Write every report file for ``opts`` into ``opts.out_dir``; returns the paths written."""
    say = progress or (lambda msg: None)
    networks, runs, choices, wa_runs = resolve_inputs(opts)
    model_data = user_model_data(opts, networks, runs)
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    prov = Provenance(command=opts.command or canonical_command(opts), seed=str(opts.accuracy_config.seed))
    with StagedOutput(opts.out_dir) as out:
        say("stripes: simulating " + ", ".join(networks))
        _fig9(out, prov, choices)
        measure = None
        if not opts.skip_cpu:
            measure = _cpu_measure(opts, say)
            _fig8(out, prov, choices, wa_runs, measure, say)
        oracle = None
        if opts.accuracy:
            oracle = AccuracyOracle(opts.accuracy_config, opts.accuracy_cache, say, model_data)
        _bitwidths(out, prov, choices, wa_runs, oracle, say)
        for net in networks:
            if net in opts.pareto_networks:
                _pareto(out, prov, net, choices[net], oracle, opts, say)
        if any(admm_choice(net) is not None for net in networks):
            _comparison(out, prov, choices, stripes_row, measure, oracle)
        if runs:
            _search_diagnostics(out, prov, runs, say)
        written = out.commit()
    return written


# ------------------------------------------------------------------------------ the pieces


def _fig9(out: StagedOutput, prov: Provenance, choices) -> None:
    from releq_tvm.report.stripes_report import FIG9_COLUMNS, fig9_png, fig9_rows

    rows, notes = fig9_rows(choices)
    notes = [
        "Stripes, weights serial, activations at a_bits (8 unless --act-bits or a run's own), stepped cycles; "
        "fc layers weights-serial "
        "(the *_fc_bitparallel columns: fc layers at the bit-parallel DaDN rate)",
        "speedup = cycles at 8-bit weights / cycles; energy_reduction = energy at 8 bits / energy (uJ per image)",
        "GEOMEAN row: geometric mean over the networks above",
        *notes,
    ]
    out.write_text("fig9_stripes.csv", csv_text(FIG9_COLUMNS, rows, prov.header_lines(notes)))
    out.write_bytes("fig9_stripes.png", fig9_png(rows))
    lines = [
        "Per network: the weight bits, Stripes speedup and energy reduction over the same accelerator",
        "at 8-bit weights (weights serial, 8-bit activations; STRIPES.md). Last row: geometric mean.",
        "Energy parts are in `compute_reduction`, `onchip_reduction`, `offchip_reduction` (empty:",
        "that part is 0 at the chosen bits). Per-layer numbers at the published bits: `stripes/<network>.csv`.",
    ]
    out.document("fig9_stripes.csv", "Stripes speedup and energy reduction (figure 9)", prov, lines)
    out.document("fig9_stripes.png", "bars of `fig9_stripes.csv`", prov, ["Left: speedup; right: energy reduction (log scale)."])


def _cpu_measure(opts: ReportOptions, say) -> MeasureFn:
    """The injected measure function as is, or TVM's behind the on-disk cache (and a per-run memo)."""
    from releq_tvm.report.cpu_report import disk_cached, host_machine_key, memoized, tvm_measure

    if opts.cpu_measure is not None:
        return memoized(opts.cpu_measure)
    real = tvm_measure(repeats=opts.cpu_repeats, progress=lambda m: say(f"cpu:   {m}"))
    # the accuracy cache folder, when given, holds this report's store (as AccuracyOracle's)
    store = Path(opts.accuracy_cache) / "cache.sqlite" if opts.accuracy_cache is not None else None
    return memoized(disk_cached(real, store, host_machine_key(), opts.cpu_repeats, opts.fresh_cpu))


def _fig8(out: StagedOutput, prov: Provenance, choices, wa_runs, measure: MeasureFn, say) -> None:
    from releq_tvm.report.cpu_report import FIG8_COLUMNS, FIG8_NOTES, FIG8_README_LINES, fig8_png, fig8_rows

    rows = fig8_rows(choices, measure, say, wa_runs)
    notes = [*FIG8_NOTES, *{n for c in [*choices.values(), *wa_runs] for n in c.notes}]
    out.write_text("fig8_tvm_cpu.csv", csv_text(FIG8_COLUMNS, rows, prov.header_lines(notes)))
    out.write_bytes("fig8_tvm_cpu.png", fig8_png(rows, f"{prov.cpu}, {prov.cores} cores"))
    out.document("fig8_tvm_cpu.csv", "TVM CPU latency (figure 8) beside int8 engines", prov, list(FIG8_README_LINES))
    out.document("fig8_tvm_cpu.png", "bars of `fig8_tvm_cpu.csv`", prov,
                 ["Left: speedup of the mixed bit-serial build over 8-bit bit-serial; right: every latency (log scale)."])


def _bitwidths(out: StagedOutput, prov: Provenance, choices, wa_runs, oracle, say) -> None:
    from releq_tvm.report.bitwidths import BITWIDTH_COLUMNS, bitwidth_rows, bitwidths_png

    rows = bitwidth_rows(choices, oracle, say, wa_runs)
    bits_notes = sorted({n for c in [*choices.values(), *wa_runs] for n in c.notes})
    notes = [
        "avg_bits: plain mean over layers; avg_bits_by_weights: mean weighted by each layer's weight count",
        "acc_*: top-1 % on the test split; quantized accuracy after finetune_steps fine-tune steps; "
        "empty where no data or trained model exists here (accuracy_note says why)",
        "acc_source_test_pct: the test accuracy the bits' source reports itself (a search run's long fine-tune in "
        "best.json, with its own learning-rate choice); empty for published bits",
        "variant: primary = the network's bits used by every report file; w+a run = another search run that searched "
        "activation bits (bits_source names it); a_bits: each weight layer's input bits (8: all 8-bit), the "
        "quantized accuracy is measured at them",
        *bits_notes,
    ]
    out.write_text("bitwidths.csv", csv_text(BITWIDTH_COLUMNS, rows, prov.header_lines(notes)))
    out.write_bytes("bitwidths.png", bitwidths_png(rows, bits_notes))
    lines = [
        "Per network: dataset, weight layers, the bits and their mean, float and quantized test accuracy",
        "after the long fine-tune (`DEFAULTS.finetune`) where data and a trained model exist. MNIST",
        "networks always (LeNet-5 from its shipped checkpoint; lenet4 trained by the report, seeded,",
        "with the LeNet-5 recipe, and cached); others with `--data-dir` and `--checkpoint NET=FILE`.",
        "Each search run that searched activation bits adds a row (`variant` w+a run) with its weight and",
        "activation bits per layer, measured at both.",
    ]
    out.document("bitwidths.csv", "bits per layer and accuracy", prov, lines)
    out.document("bitwidths.png", "heat map of `bitwidths.csv`", prov)


def _pareto(out: StagedOutput, prov: Provenance, net: str, choice: BitChoice, oracle, opts, say) -> None:
    from releq_tvm.networks import get_network_spec
    from releq_tvm.report.pareto import PARETO_COLUMNS, pareto_png, pareto_result, pareto_rows

    placed = {f"choice ({'published' if choice.source == 'published' else 'search'})": choice}
    # a network without published bits simply has no such marker
    if choice.source != "published" and get_network_spec(net).published_bits is not None:
        placed["published"] = published_choice(net)
    admm = admm_choice(net)
    if admm is not None:
        placed["ADMM"] = admm
    scorer = long_accuracy = None
    if oracle is not None and oracle.missing_reason(net) is None:
        scorer = oracle.pareto_scorer(net)
        long_accuracy = lambda bits: oracle.finetuned(net, bits)  # noqa: E731
    cpu_cost = None
    if not opts.skip_cpu:
        factory = opts.cpu_pareto_cost or _tvm_pareto_cost
        # the placed points' bits too (e.g. the 3 of 8,2,2,3,2), so they get a CPU cost as well
        cpu_cost = factory(net, sorted(set(opts.pareto_bits).union(*(c.w_bits for c in placed.values()))))
    result = pareto_result(net, opts.pareto_bits, placed, scorer, cpu_cost, say, long_accuracy)
    bit_text = ",".join(map(str, result.bit_set))
    notes = [
        f"every weight bit vector over {{{bit_text}}} ({len(result.combos)} points), 8-bit activations; "
        "first rows: the placed points (search choice / published / ADMM), then the grid by cost",
        "stripes_cycles_ratio: Stripes cycles / cycles at 8-bit weights (stepped, weights serial, fc weights-serial)",
    ]
    if cpu_cost is not None:
        notes.append("cpu_latency_ratio: measured per-layer TVM bit-serial latencies summed (+ the network's "
                     "measured non-layer time) over the same at 8 bits (releq_tvm.compile.cpu_cost_ratio)")
    if result.score_is_accuracy:
        notes.append(
            f"accuracy_val_pct: top-1 % after {result.protocol} (model: {oracle.model_origin(net)}); "
            "cheap enough for every point, unlike the long fine-tune"
        )
        notes.append(
            f"acc_long_finetune_test_pct (placed points only): test top-1 % after the long fine-tune "
            f"({oracle.config.finetune_steps} steps), as in bitwidths.csv: another protocol, not used for the front"
        )
    else:
        notes.append(f"cost-only: {oracle.missing_reason(net) if oracle else 'accuracy disabled (--no-accuracy)'}; "
                     "the front is taken over mean weight bits instead of accuracy")
    notes.append("on_front: 1 when no grid point is as cheap (Stripes) and as accurate with one strictly better; "
                 "on_front_cpu: the same with the CPU cost; "
                 "front_accuracy_at_cost: best front accuracy at no more Stripes cost than the placed point")
    name = f"pareto_{net}"
    out.write_text(f"{name}.csv", csv_text(PARETO_COLUMNS, pareto_rows(result), prov.header_lines(notes)))
    out.write_bytes(f"{name}.png", pareto_png(result))
    placed_text = "; ".join(
        f"{p['point']} {p['w_bits']}: {'on' if p['on_front'] else 'off'} the front" for p in result.placed
    )
    lines = [
        f"Every weight bit vector of {net} over {{{bit_text}}} scored for Stripes cost"
        + (" and CPU latency-table cost" if cpu_cost is not None else "")
        + (f" and val accuracy ({result.protocol})." if result.score_is_accuracy
           else "; cost-only (no data here), scored by mean weight bits."),
        f"Front marked (`on_front`); placed points: {placed_text}.",
    ]
    out.document(f"{name}.csv", f"Pareto frontier of {net}", prov, lines)
    out.document(f"{name}.png", f"scatter of `{name}.csv`", prov)


def _tvm_pareto_cost(net: str, bit_set: Sequence[int]) -> SeparableCost:
    from releq_tvm.report.cpu_report import cpu_separable_cost

    return cpu_separable_cost(net, bit_set)


def _comparison(out: StagedOutput, prov: Provenance, choices, stripes_row, measure, oracle) -> None:
    from releq_tvm.report.compare import COMPARE_COLUMNS, comparison_png, comparison_rows
    from releq_tvm.report.cpu_report import cpu_row

    cpu = (lambda c: cpu_row(c, measure)) if measure is not None else None

    def accuracy(choice):
        if oracle is None or oracle.missing_reason(choice.network) is not None:
            return None
        return oracle.finetuned(choice.network, choice.w_bits, choice.a_bits)

    rows = comparison_rows(choices, stripes_row, cpu, accuracy)
    notes = [
        "ADMM bitwidths as given in METHOD.md section 6; ReLeQ: the bits of the other report files",
        "every ratio is against the same network at 8 bits on the same backend (CPU: bit-serial 8/8 build; "
        "Stripes: 8-bit weights); both methods at the ReLeQ row's activation bits (a_bits: 8 unless --act-bits)",
    ]
    if measure is None:
        notes.append("cpu_speedup empty: CPU not measured (--skip-cpu)")
    if oracle is not None:
        notes.append(f"acc_quant_test_pct: test top-1 % after the long fine-tune ({oracle.config.finetune_steps} steps), "
                     "as in bitwidths.csv; empty where no data or model exists here")
    out.write_text("admm_comparison.csv", csv_text(COMPARE_COLUMNS, rows, prov.header_lines(notes)))
    out.write_bytes("admm_comparison.png", comparison_png(rows))
    lines = ["ReLeQ's and the ADMM method's bitwidths (LeNet with 4 layers, AlexNet): CPU speedup, Stripes",
             "speedup and energy reduction, each over the same network at 8 bits."]
    out.document("admm_comparison.csv", "ReLeQ vs ADMM bitwidths", prov, lines)
    out.document("admm_comparison.png", "bars of `admm_comparison.csv`", prov)


def _search_diagnostics(out: StagedOutput, prov: Provenance, runs, say) -> None:
    from releq_tvm.report.convergence import (
        ABLATION_COLUMNS,
        MOVING_AVERAGE_EPISODES,
        ablation_groups,
        ablation_png,
        ablation_row,
        clip_note,
        convergence_columns,
        identical_trajectories,
        convergence_png,
        convergence_rows,
    )

    for net, run in primary_runs(runs).items():
        say(f"search: convergence of {net} from {run.path}")
        n_layers = len(run.choice().w_bits)
        notes = [
            f"run: {run.path} (made by: {run.meta.get('command', 'releq-tvm search')}); reward {run.reward_label}; "
            f"clip {run.clip_range:g}; cost backend {run.measure}; seed {run.seed}",
            f"*_ma: trailing moving average over {MOVING_AVERAGE_EPISODES} training episodes; phase greedy: the "
            "deterministic read-off episodes; layer<l>_likely_bits / layer<l>_p: the policy's most likely weight "
            "bitwidth of layer l and its probability",
            *run.choice().notes,
        ]
        name = f"convergence_{net}"
        out.write_text(f"{name}.csv", csv_text(convergence_columns(n_layers), convergence_rows(run), prov.header_lines(notes)))
        out.write_bytes(f"{name}.png", convergence_png(run))
        lines = [f"Search run `{run.path}`: SA, cost and reward per episode with a moving average, and per layer",
                 "the probability of each bitwidth over episodes."]
        out.document(f"{name}.csv", f"search convergence of {net}", prov, lines)
        out.document(f"{name}.png", f"plots of `{name}.csv` and the action probabilities", prov)
    for vary, name, title in (("reward", "reward_ablation", "the three reward forms"),
                              ("clip", "clip_sensitivity", "PPO clip range")):
        groups = ablation_groups(runs, vary)
        if not groups:
            say(f"search: {name}.csv not written (needs runs of one network covering two or more settings)")
            continue
        rows = [ablation_row(r) for group in groups.values() for r in group]
        notes = [
            "final_sa / final_cost: the run's solution (best.json, deterministic read-off); "
            f"final_reward_ma: moving average of the last {MOVING_AVERAGE_EPISODES} training episodes",
            "converged_episode: the search's own test (best.json; empty: not met); choice_fixed_episode: first "
            "training episode from which the policy's most likely bits never change (empty: still changing)",
            "test_acc_*: the run's long fine-tune (best.json), empty when the run scored no accuracy",
        ]
        notes += ["ppo_updates, clipped_updates (clip fraction > 0), max_clip_fraction, max_approx_kl: PPO's own "
                  "statistics over the run's updates (RUN/ppo/progress*.csv); empty for a run made before they were logged"]
        for net, group in groups.items():
            if vary == "clip":
                note = clip_note(net, group)
            elif identical_trajectories(group):
                note = f"{net}: the runs made identical choices and earned identical rewards in every episode"
            else:
                note = None
            notes += [note] if note else []
        out.write_text(f"{name}.csv", csv_text(ABLATION_COLUMNS, rows, prov.header_lines(notes)))
        out.write_bytes(f"{name}.png", ablation_png(groups, vary))
        out.document(f"{name}.csv", f"ablation over {title}", prov, [f"Runs: {', '.join(r['run'] for r in rows)}."])
        out.document(f"{name}.png", f"moving averages of the runs in `{name}.csv`", prov)


def canonical_command(opts: ReportOptions) -> str:
    """The ``releq-tvm report`` command line that rebuilds what ``opts`` asks for (from the same
    fields the options are generated from; ``--bits-from`` and ``--out`` always written)."""
    parts = ["releq-tvm", "report", *command_args(opts, always=("bits_from", "out_dir"))]
    if opts.accuracy_config.data_dir:  # the shared --data-dir option, not generated
        parts += ["--data-dir", str(opts.accuracy_config.data_dir)]
    return " ".join(parts)
