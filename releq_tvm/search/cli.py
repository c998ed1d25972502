"""`releq-tvm search NET`: the ReLeQ bitwidth search (and `search-efficiency`, its comparison to baselines).

Their options are generated from :class:`SearchConfig`'s fields (:mod:`releq_tvm.config_cli`):
a new setting is one new field, and reaches config.json and the command line alike.
"""

from __future__ import annotations

import click

from releq_tvm.cli_options import checkpoint_option, data_dir_option
from releq_tvm.config_cli import option_fields, settings_from, settings_options
from releq_tvm.search.config import RESUME_SETTINGS, SearchConfig

#: Options of `search` that still count on --resume (the rest come from the run's config.json;
#: NET or --model only name the default --run-dir).
_RESUME_OPTIONS = ("network", "model", "run_dir", "resume", "episodes", *RESUME_SETTINGS)
#: The settings `search-seeds` passes on to every seed's search: all of them but the seed and the folder.
_SEEDS_SETTINGS = tuple(f.name for f, _ in option_fields(SearchConfig) if f.name not in ("seed", "run_dir"))
#: The settings `search-efficiency` offers: the model and its data (as `search` takes them) and what
#: changes its methods' shared reward.
_EFFICIENCY_SETTINGS = ("model", "input_shape", "data", "measure", "cpu_kernels", "reward", "accuracy", "short_steps",
                        "seed", "threads")


def _action_set(ctx, param, value):
    from releq_tvm.bits import parse_action_set

    return None if value is None else parse_action_set(value)


@click.command("search")
@click.argument("network", metavar="[NET]", required=False)
@settings_options(SearchConfig)
@click.option("--resume", is_flag=True,
              help="Continue the run in --run-dir from its last checkpoint (--episodes: a new budget).")
@click.option("--overwrite", is_flag=True, help="Replace a run already in --run-dir.")
@checkpoint_option
@data_dir_option
def search_cmd(resume: bool, overwrite: bool, **settings) -> None:
    """Search per-layer bitwidths of NET (or of your own --model, on --data) with ReLeQ
    (RecurrentPPO); files go to --run-dir.

    Writes config.json, episodes.csv, action_probs.csv, best.json (with the long fine-tune's
    test accuracy of the chosen bits) and checkpoint.pt (for --resume; `--resume --run-dir RUN`
    alone continues any run, its model and data included).
    """
    from releq_tvm.errors import ReleqError
    from releq_tvm.search.run import run_search
    from releq_tvm.search.run_files import saved_config

    if settings["acc_limit"] is not None and settings["reward"] != "hardware":
        click.echo("note: --acc-limit only changes --reward hardware", err=True)
    if resume and settings["network"] is None and settings["model"] is None:
        if settings["run_dir"] is None:
            raise ReleqError("--resume needs the run: pass --run-dir RUN (or NET or --model, for its default folder)")
        config = saved_config(settings["run_dir"])
    else:
        config = settings_from(SearchConfig, settings, long_finetune=settings["long_steps"] > 0)
    ctx = click.get_current_context()
    given = {p.name for p in ctx.command.params if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE}
    if resume:
        ignored = [p.name for p in ctx.command.params if p.name in given - set(_RESUME_OPTIONS)]
        if ignored:
            click.echo(f"note: --resume uses the run's saved settings; ignoring {', '.join(ignored)}", err=True)
    resume_episodes = settings["episodes"] if resume and "episodes" in given else None
    anew = {name: settings[name] for name in RESUME_SETTINGS if resume and name in given}
    try:
        run_search(config, resume=resume, overwrite=overwrite, echo=click.echo, resume_episodes=resume_episodes,
                   resume_settings=anew)
    except KeyboardInterrupt:  # run_search saved the run and said how to resume it
        ctx.exit(130)


@click.command("search-efficiency")
@click.argument("network", metavar="[NET]", required=False)
@click.option("--budget", type=click.IntRange(1), default=None,
              help="Distinct configurations each method may evaluate (default: |exhaustive set|^L).")
@click.option("--methods", default="ppo,random,exhaustive", show_default=True)
@click.option("--exhaustive-set", default="2,4,8", show_default=True, callback=_action_set,
              help="The smaller bit set exhaustive enumeration covers.")
@settings_options(SearchConfig, only=_EFFICIENCY_SETTINGS)
@click.option("-o", "--out", type=click.Path(dir_okay=False), default="results/search_efficiency.csv", show_default=True)
@checkpoint_option
@data_dir_option
def search_efficiency_cmd(budget, methods, exhaustive_set, out, **settings) -> None:
    """Compare PPO, random search and exhaustive enumeration on NET (or your own --model, on --data)
    at the same configuration budget."""
    import sys
    from pathlib import Path

    from releq_tvm.io import atomic_write_bytes
    from releq_tvm.report.search_efficiency import efficiency_png, write_efficiency_csv
    from releq_tvm.search.efficiency import compare_search_methods
    from releq_tvm.search.run import check_search_inputs

    config = settings_from(SearchConfig, settings)
    check_search_inputs(config)  # NET or --model, and data for accuracy: before any method runs
    names = [m.strip() for m in methods.split(",") if m.strip()]
    rows = compare_search_methods(config.network, budget=budget, methods=names, exhaustive_set=exhaustive_set,
                                  config=config, echo=click.echo)
    write_efficiency_csv(rows, out, " ".join(["releq-tvm"] + sys.argv[1:]), config)
    png = Path(out).with_suffix(".png")
    atomic_write_bytes(png, efficiency_png(rows))
    click.echo(f"wrote {out} and {png}")
    winner = [r["method"] for r in rows if r["winner"]]
    click.echo(f"best accuracy/cost point (highest reward): {', '.join(winner)} -> {out}")


_long_front_option = click.option(
    "--long-front", type=click.IntRange(0), default=0, show_default=True,
    help="Also long fine-tune up to this many configurations of the Pareto front the runs saw (cheapest first), "
         "for their test accuracy (settings of the first run; results cached).")


def _check_long_front(config: SearchConfig, long_front: int) -> None:
    if long_front and config.accuracy == "none":
        raise click.UsageError("--long-front needs runs that score accuracy (not --accuracy none)")
    if long_front and config.long_steps == 0:
        raise click.UsageError("--long-front long fine-tunes for the runs' --long-steps; these runs have 0")


def _write_runs(runs, out: str, long_front: int) -> None:
    """The per-run CSV, the front CSV and the figure of ``runs`` (with ``long_front`` front points fine-tuned)."""
    import sys

    from releq_tvm.report.seeds import front_of, long_results, seen_configurations, write_seed_files
    from releq_tvm.search.seeds import long_finetune_configurations

    long = long_results(runs)
    if long_front:
        config = SearchConfig.from_dict(runs[0].config)
        _check_long_front(config, long_front)
        front = [(s.w_bits, s.a_bits) for s in front_of(seen_configurations(runs))][:long_front]
        long.update(long_finetune_configurations(config, front, echo=click.echo))
    paths = write_seed_files(runs, out, " ".join(["releq-tvm"] + sys.argv[1:]), long)
    click.echo(f"wrote {', '.join(paths)}")


@click.command("search-seeds")
@click.argument("network", metavar="[NET]", required=False)
@click.option("--seeds", "n_seeds", type=click.IntRange(1), default=5, show_default=True,
              help="Number of searches: seeds 0 .. N-1.")
@click.option("--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Searches run at a time, each in its own process (one torch thread each by default).")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Folder of the runs, one seed<N> sub-folder each (default runs/seeds/<net>-<measure>-<reward>). "
                   "Runs already there are resumed, finished ones only read.")
@click.option("-o", "--out", type=click.Path(dir_okay=False), default=None,
              help="Per-seed CSV (default results/convergence_seeds_<net>.csv); <stem>_front.csv and <stem>.png beside it.")
@_long_front_option
@settings_options(SearchConfig, only=_SEEDS_SETTINGS)
@checkpoint_option
@data_dir_option
def search_seeds_cmd(n_seeds: int, jobs: int, root, out, long_front: int, **settings) -> None:
    """Run the search of NET once per seed and write how each ended (convergence episode or not, wall
    time, chosen bits, reward, long fine-tune) with the Pareto front of every configuration they saw."""
    from releq_tvm.report.runs import load_run
    from releq_tvm.search.run import check_search_inputs
    from releq_tvm.search.seeds import run_seeds, seed_run_dir

    config = settings_from(SearchConfig, settings, long_finetune=settings["long_steps"] > 0)
    check_search_inputs(config)  # NET or --model, and data for accuracy: before hours of searching
    _check_long_front(config, long_front)
    if jobs > 1 and (config.workers > 1 or config.ray_address):
        from releq_tvm.errors import ReleqError

        raise ReleqError("--jobs runs seeds side by side and --workers runs each seed's episodes side by side; "
                         "pass one of them (e.g. --jobs 1 --workers 2)")
    tag = "-wa" if config.search_activations else ""
    root = root or f"runs/seeds/{config.network}-{config.measure}-{config.reward}{tag}"
    seeds = list(range(n_seeds))
    run_seeds(config, seeds, root, jobs=jobs, echo=click.echo)
    _write_runs([load_run(seed_run_dir(root, s)) for s in seeds],
                out or f"results/convergence_seeds_{config.network}{tag}.csv", long_front)


@click.command("compare-runs")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--out", type=click.Path(dir_okay=False), required=True,
              help="Per-run CSV; <stem>_front.csv and <stem>.png beside it.")
@_long_front_option
def compare_runs_cmd(run_dirs, out, long_front: int) -> None:
    """Finished search runs of one network side by side (ablations, seeds): each run's variant (the
    settings that differ from the defaults), convergence, wall time, chosen bits and long fine-tune,
    and the Pareto front of every configuration they saw."""
    from releq_tvm.report.runs import discover_runs

    runs = discover_runs(run_dirs)
    networks = sorted({r.network for r in runs})
    if len(networks) > 1:
        raise click.UsageError(f"the runs are of several networks ({', '.join(networks)}); compare one network at a time")
    _write_runs(runs, out, long_front)
